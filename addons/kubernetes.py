"""Kubernetes request classification: HTTP method + path + query + headers -> policy fields.

Pure functions over plain data (no mitmproxy, no asyncio), so the policy tooling, the HTTP
adapter and the tests share one implementation.

The classification follows the API server's own request-info rules (apiserver
`RequestInfoFactory`), with three deliberate differences for policy:
- exec, attach, portforward and proxy are *connect* subresources whose verb IS the subresource
  name (`verb: exec`), whatever the transport: WebSocket GET (`v5.channel.k8s.io`, `v4...`,
  base64 variants), SPDY/3.1 POST or a plain GET/POST. A denied exec over WebSocket is thus denied
  again when kubectl retries over SPDY.
- `command` is the exec argv (repeated `command=` values) joined by spaces; attach runs no command,
  so its `command` is always None (a `command=` on attach is ignored by the API server and must not
  let an attach pass as an allowed command).
- anything ambiguous (empty or dot segments, leftover percent escapes, mixed-case `/API`, unknown
  methods, a name-scoped `?watch=true`, repeated scalar parameters that disagree) raises
  `ValueError`; the adapter refuses the request.

Non-resource URLs (`/version`, `/api`, `/apis`, `/api/v1` discovery, `/openapi/...`, `/healthz`)
classify as `{"nonresource": True, "resource": None, "verb": <from method>}`; policies usually
allow them with `http:` conditions.

The second half of the file is the policy-test shorthand (`exec pods/x -n ns -- ls`): it builds
the request kubectl would send and runs it through `to_operation`, so it lives next to the
classifier it must stay in step with (hence the file's length).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from addons.model import BadRequest, Operation

Query = Mapping[str, list[str]] | Iterable[tuple[str, str]]

CONNECT_SUBRESOURCES = ("exec", "attach", "portforward", "proxy")
PROXY_RESOURCES = ("pods", "services", "nodes")
# Subresources a namespace object has; anything else after namespaces/NS is a resource.
NAMESPACE_SUBRESOURCES = ("status", "finalize")
RESOURCE_VERBS = {"POST": "create", "GET": "get", "HEAD": "get", "PUT": "update",
                  "PATCH": "patch", "DELETE": "delete"}
PROXY_METHODS = frozenset(RESOURCE_VERBS) | {"OPTIONS"}
NONRESOURCE_METHODS = frozenset(RESOURCE_VERBS) | {"OPTIONS"}
# Channel protocols of exec/attach/portforward over WebSocket (newest first).
CHANNEL_PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io", "v3.channel.k8s.io",
                     "v2.channel.k8s.io", "channel.k8s.io")
BASE64_PROTOCOLS = ("v5.base64.channel.k8s.io", "v4.base64.channel.k8s.io",
                    "v3.base64.channel.k8s.io", "v2.base64.channel.k8s.io",
                    "base64.channel.k8s.io")
CHANNEL_NAMES = {0: "stdin", 1: "stdout", 2: "stderr", 3: "error", 4: "resize", 255: "close"}

_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
_LABEL_RE = re.compile(_LABEL + r"\Z")
_GROUP_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\Z")
# Object names: the API server forbids "/", "%", "." and ".."; we also refuse whitespace, control
# characters and anything outside the characters real names use (":" for RBAC and proxy ports).
_NAME_RE = re.compile(r"[A-Za-z0-9._:@+=~-]{1,253}\Z")


def _query_items(query: Query | None) -> list[tuple[str, str]]:
    if not query:
        return []
    if isinstance(query, Mapping):
        items: list[tuple[str, str]] = []
        for key, values in query.items():
            if isinstance(values, str):
                values = [values]
            items.extend((str(key), str(v)) for v in values)
        return items
    return [(str(k), str(v)) for k, v in query]


def _values(items: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in items if k == key]


def _single(items: list[tuple[str, str]], key: str) -> str | None:
    """A scalar parameter; repeated values that disagree are ambiguous."""
    values = _values(items, key)
    if not values:
        return None
    if len(set(values)) > 1:
        raise ValueError(f"query parameter {key!r} given with different values")
    return values[0]


def _flag(items: list[tuple[str, str]], key: str) -> bool:
    """A boolean parameter read like the API server does: absent, "0" or "false" (any case)
    are false; anything else, even an empty value (`?watch`), is true."""
    value = _single(items, key)
    if value is None:
        return False
    return not (value == "0" or value.lower() == "false")


def _segments(path: str) -> list[str]:
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError("path must start with /")
    if "?" in path or "#" in path:
        raise ValueError("path must not contain a query or fragment")
    if path == "/":
        return []
    if path.endswith("/"):  # one trailing slash is harmless; "//" is still refused below
        path = path[:-1]
    parts = path[1:].split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise ValueError(f"ambiguous path {path!r}: empty or dot segment")
        if "%" in part or "\\" in part or any(ord(c) < 0x21 or ord(c) == 0x7F for c in part):
            raise ValueError(f"ambiguous path {path!r}: escape, backslash or control character")
    return parts


def _check(regex: re.Pattern[str], value: str, what: str, max_len: int = 253) -> str:
    if len(value) > max_len or not regex.match(value) or value in (".", ".."):
        raise ValueError(f"invalid {what} {value!r}")
    return value


def _field_selector_name(items: list[tuple[str, str]]) -> str | None:
    """`metadata.name` required by an exact-match fieldSelector (as the API server's authorizer)."""
    selector = _single(items, "fieldSelector")
    if not selector:
        return None
    terms, buf, i = [], [], 0
    while i < len(selector):
        ch = selector[i]
        if ch == "\\" and i + 1 < len(selector):
            buf.append(selector[i:i + 2])
            i += 2
            continue
        if ch == ",":
            terms.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
        i += 1
    terms.append("".join(buf))
    name = None
    for term in terms:
        # as the API server splits a term: the first "!=", else "==", else "="; no trimming
        op = next((o for o in ("!=", "==", "=") if o in term), None)
        if op is None:
            raise ValueError(f"unparseable fieldSelector {selector!r}")
        lhs, _, rhs = term.partition(op)
        if lhs == "metadata.name" and op != "!=":
            if "\\" in rhs or name is not None:
                raise ValueError(f"ambiguous fieldSelector {selector!r}")
            name = _check(_NAME_RE, rhs, "fieldSelector name")
    return name


def _empty(verb: str | None, nonresource: bool) -> dict[str, Any]:
    return {"verb": verb, "group": None, "version": None, "resource": None, "subresource": None,
            "namespace": None, "name": None, "command": None, "impersonate": False,
            "nonresource": nonresource, "container": None, "proxy_path": None, "port": None}


def transport(headers: Mapping[str, str]) -> str:
    """'websocket', 'spdy' or 'http' - for audit and recordings, never for the decision."""
    h = {k.lower(): v for k, v in headers.items()}
    upgrade = h.get("upgrade", "").strip().lower()
    if upgrade == "websocket":
        return "websocket"
    if upgrade.startswith("spdy/"):
        return "spdy"
    return "http"


def classify(method: str, path: str, query: Query | None, headers: Mapping[str, str]
             ) -> dict[str, Any]:
    """Classify one Kubernetes API request. Raises ValueError when it cannot be classified."""
    method = (method or "").upper()
    headers = headers or {}
    items = _query_items(query)
    impersonate = any(k.lower().startswith("impersonate-") for k in headers)
    parts = _segments(path)
    if parts and parts[0].lower() in ("api", "apis") and parts[0] not in ("api", "apis"):
        raise ValueError(f"ambiguous path {path!r}: API prefix in mixed case")
    grouped = bool(parts) and parts[0] == "apis"
    min_len = 4 if grouped else 3
    if not parts or parts[0] not in ("api", "apis") or len(parts) < min_len:
        if method not in NONRESOURCE_METHODS:
            raise ValueError(f"unsupported method {method!r}")
        out = _empty("get" if method == "HEAD" else method.lower(), True)
        out["impersonate"] = impersonate
        return out

    out = _empty(None, False)
    out["impersonate"] = impersonate
    if grouped:
        out["group"] = _check(_GROUP_RE, parts[1], "API group")
        rest = parts[2:]
    else:
        out["group"] = ""
        rest = parts[1:]
    out["version"] = _check(_LABEL_RE, rest[0], "API version", 63)
    rest = rest[1:]
    watch_path = rest[0] == "watch"
    if watch_path:  # deprecated /api/v1/watch/... form, still served
        if method != "GET":
            raise ValueError("the /watch/ path form accepts only GET")
        rest = rest[1:]
    elif rest[0] == "proxy":
        raise ValueError("the deprecated /proxy/ path form is not supported")
    if not rest:
        raise ValueError(f"no resource in {path!r}")
    if rest[0] == "namespaces" and len(rest) > 1:
        out["namespace"] = _check(_LABEL_RE, rest[1], "namespace", 63)
        if len(rest) > 2 and rest[2] not in NAMESPACE_SUBRESOURCES:
            rest = rest[2:]
            if rest[0] == "namespaces":
                raise ValueError(f"ambiguous path {path!r}: namespaces inside a namespace")
    out["resource"] = _check(_LABEL_RE, rest[0], "resource", 63)
    if len(rest) > 1:
        out["name"] = _check(_NAME_RE, rest[1], "name")
    if len(rest) > 2:
        out["subresource"] = _check(_LABEL_RE, rest[2], "subresource", 63)
    sub = out["subresource"]
    if len(rest) > 3 and sub != "proxy":
        raise ValueError(f"unexpected path after subresource in {path!r}")

    if watch_path:
        if sub is not None:
            raise ValueError("the /watch/ path form has no subresources")
        out["verb"] = "watch"
    elif sub in CONNECT_SUBRESOURCES:
        _classify_connect(out, method, rest, items)
    else:
        if method not in RESOURCE_VERBS:
            raise ValueError(f"unsupported method {method!r}")
        verb = RESOURCE_VERBS[method]
        watch = _flag(items, "watch")
        if out["name"] is None:
            if verb == "get":
                verb = "watch" if watch else "list"
            elif verb == "delete":
                verb = "deletecollection"
        elif watch:
            raise ValueError("watch=true on a named resource is ambiguous; use a fieldSelector")
        out["verb"] = verb
        if sub == "log":
            out["container"] = _single(items, "container")
    if out["name"] is None and out["verb"] in ("list", "watch", "deletecollection"):
        out["name"] = _field_selector_name(items)
    return out


def _classify_connect(out: dict[str, Any], method: str, rest: list[str],
                      items: list[tuple[str, str]]) -> None:
    sub, resource = out["subresource"], out["resource"]
    out["verb"] = sub
    if sub == "proxy":
        if resource not in PROXY_RESOURCES:
            raise ValueError(f"proxy is not a subresource of {resource}")
        if method not in PROXY_METHODS:
            raise ValueError(f"unsupported method {method!r}")
        # [scheme:]name[:port], as the API server splits it for proxying
        pieces = out["name"].split(":")
        if len(pieces) > 3 or (len(pieces) == 3 and pieces[0] not in ("", "http", "https")):
            raise ValueError(f"invalid proxy target {out['name']!r}")
        if len(pieces) == 3:
            pieces = pieces[1:]
        out["name"] = pieces[0] or None
        if out["name"] is None:
            raise ValueError("proxy target without a name")
        out["port"] = pieces[1] if len(pieces) == 2 and pieces[1] else None
        out["proxy_path"] = "/" + "/".join(rest[3:])
        return
    if resource != "pods":
        raise ValueError(f"{sub} is not a subresource of {resource}")
    if method not in ("GET", "POST"):
        raise ValueError(f"{sub} accepts GET (WebSocket) or POST (SPDY), not {method!r}")
    if sub == "portforward":
        ports = _values(items, "ports")
        out["port"] = ",".join(ports) if ports else None
        return
    out["container"] = _single(items, "container")
    if sub == "exec":
        argv = _values(items, "command")
        if any("\x00" in a for a in argv):
            raise ValueError("NUL in exec command")
        out["command"] = " ".join(argv) if argv else None


class UnclassifiableRequest(BadRequest, ValueError):
    """A Kubernetes request that cannot be classified unambiguously.

    A ValueError for pure callers (policy tooling), and a BadRequest (400, rendered as a
    Kubernetes Status by the adapter's fail-closed guard) for the gateway.
    """


def fingerprint(target: str, k8s: Mapping[str, Any]) -> str:
    """Stable id of 'the same operation' (approval grants)."""
    blob = json.dumps({"target": target, "kubernetes": dict(k8s)}, sort_keys=True)
    return "k8s:" + hashlib.sha256(blob.encode()).hexdigest()[:32]


def summary(k8s: Mapping[str, Any], path: str | None = None,
            headers: Mapping[str, str] | None = None) -> str:
    """`exec pods/web-1 -n team-a -- ls -la` style, close to the policy-test shorthand."""
    if k8s.get("nonresource"):
        text = f"{k8s['verb']} {path or '/'}"
    else:
        res = k8s["resource"] + (f".{k8s['group']}" if k8s.get("group") else "")
        if k8s.get("name"):
            res += f"/{k8s['name']}"
            if k8s.get("port") and k8s["verb"] == "proxy":
                res += f":{k8s['port']}"
        if k8s.get("subresource") and k8s["subresource"] != k8s["verb"]:
            res += f"/{k8s['subresource']}"
        text = f"{k8s['verb']} {res}"
        if k8s.get("namespace") and k8s["resource"] != "namespaces":
            text += f" -n {k8s['namespace']}"
        if k8s.get("container"):
            text += f" -c {k8s['container']}"
        if k8s["verb"] == "portforward" and k8s.get("port"):
            text += f" {k8s['port']}"
        if k8s["verb"] == "proxy":
            text += f" {k8s.get('proxy_path') or '/'}"
    if k8s.get("impersonate"):
        user = next((v for k, v in (headers or {}).items() if k.lower() == "impersonate-user"),
                    None)
        text += f" --as={user}" if user else " --as=<impersonated>"
    if k8s.get("command") is not None:
        text += f" -- {k8s['command']}"
    return text


def to_operation(target: str, method: str, path: str, query: Query | None,
                 headers: Mapping[str, str]) -> Operation:
    """The policy Operation of one Kubernetes request.

    Raises UnclassifiableRequest (a ValueError and a 400 BadRequest) when unclassifiable.
    """
    try:
        k8s = classify(method, path, query, headers)
    except ValueError as e:
        raise UnclassifiableRequest(f"cannot classify this Kubernetes request: {e}") from e
    return Operation(protocol="kubernetes", target=target,
                     summary=summary(k8s, path, headers),
                     http={"method": (method or "").upper(), "path": path},
                     kubernetes=k8s, fingerprint=fingerprint(target, k8s))


_STATUS_REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
                   405: "MethodNotAllowed", 406: "NotAcceptable", 409: "Conflict",
                   410: "Gone", 413: "RequestEntityTooLarge", 415: "UnsupportedMediaType",
                   422: "Invalid", 429: "TooManyRequests", 500: "InternalError",
                   502: "InternalError", 503: "ServiceUnavailable", 504: "Timeout"}


def status_body(status: int, reason: str, message: str, extra: Mapping[str, Any] | None = None
                ) -> dict[str, Any]:
    """A Kubernetes `Status` object, so kubectl prints the refusal reason.

    `reason` is the Kubernetes reason (Forbidden, Unauthorized, ...); empty picks it from the HTTP
    status. Portcullis fields (`error`, `rule`, `request_id`, ...) in `extra` go at top level,
    where kubectl ignores them and scripts can read them.
    """
    body: dict[str, Any] = {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message,
        "reason": reason or _STATUS_REASONS.get(status, "Unknown"),
        "code": status,
    }
    for key, value in (extra or {}).items():
        if key not in body:
            body[key] = value
    return body


def decode_channel_frame(data: bytes | str, protocol: str) -> tuple[int, bytes]:
    """Split one exec/attach/portforward WebSocket message into (channel, payload).

    Binary protocols (`v5.channel.k8s.io` ...) prefix a channel byte; base64 protocols send text
    whose first character is the channel digit and the rest base64. In v5 channel 255 is the
    close signal whose payload is the closed channel. Raises ValueError on malformed frames.
    """
    protocol = (protocol or "").strip()
    if protocol in BASE64_PROTOCOLS:
        text = data.decode("ascii") if isinstance(data, bytes) else data
        if not text or not text[0].isdigit():
            raise ValueError("base64 channel frame without a channel digit")
        try:
            return int(text[0]), base64.b64decode(text[1:], validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"bad base64 channel frame: {e}") from e
    if protocol in CHANNEL_PROTOCOLS or protocol.endswith("portforward.k8s.io"):
        raw = data.encode("latin-1") if isinstance(data, str) else data
        if not raw:
            raise ValueError("empty channel frame")
        return raw[0], bytes(raw[1:])
    raise ValueError(f"unknown channel protocol {protocol!r}")



def encode_channel_frame(channel: int, payload: bytes, protocol: str) -> bytes:
    """The inverse of `decode_channel_frame` (the message content as bytes)."""
    protocol = (protocol or "").strip()
    if protocol in BASE64_PROTOCOLS:
        return str(channel).encode() + base64.b64encode(payload)
    if protocol in CHANNEL_PROTOCOLS or protocol.endswith("portforward.k8s.io"):
        return bytes([channel]) + payload
    raise ValueError(f"unknown channel protocol {protocol!r}")


# ---------------------------------------------------------------------------------------------
# Policy-test shorthand (SPEC §4 `tests:`): "list pods -n team-a", "exec pods/x -n ns -- ls -la",
# "get deployments.apps/web -n a", "delete pod x -n a", "get /version".
#
# The shorthand is turned into the HTTP request kubectl would send (method, path, query, headers)
# and then classified by `to_operation`, so a policy test decides exactly what real traffic gets,
# including `http:` conditions on the path.

# plural: (group, version, namespaced, singular and short names)
KNOWN_RESOURCES: dict[str, tuple[str, str, bool, tuple[str, ...]]] = {
    "pods": ("", "v1", True, ("pod", "po")),
    "services": ("", "v1", True, ("service", "svc")),
    "endpoints": ("", "v1", True, ("ep",)),
    "configmaps": ("", "v1", True, ("configmap", "cm")),
    "secrets": ("", "v1", True, ("secret",)),
    "serviceaccounts": ("", "v1", True, ("serviceaccount", "sa")),
    "persistentvolumeclaims": ("", "v1", True, ("persistentvolumeclaim", "pvc")),
    "events": ("", "v1", True, ("event", "ev")),
    "replicationcontrollers": ("", "v1", True, ("replicationcontroller", "rc")),
    "resourcequotas": ("", "v1", True, ("resourcequota", "quota")),
    "limitranges": ("", "v1", True, ("limitrange", "limits")),
    "podtemplates": ("", "v1", True, ("podtemplate",)),
    "bindings": ("", "v1", True, ("binding",)),
    "namespaces": ("", "v1", False, ("namespace", "ns")),
    "nodes": ("", "v1", False, ("node", "no")),
    "persistentvolumes": ("", "v1", False, ("persistentvolume", "pv")),
    "componentstatuses": ("", "v1", False, ("componentstatus", "cs")),
    "deployments": ("apps", "v1", True, ("deployment", "deploy")),
    "statefulsets": ("apps", "v1", True, ("statefulset", "sts")),
    "daemonsets": ("apps", "v1", True, ("daemonset", "ds")),
    "replicasets": ("apps", "v1", True, ("replicaset", "rs")),
    "controllerrevisions": ("apps", "v1", True, ("controllerrevision",)),
    "jobs": ("batch", "v1", True, ("job",)),
    "cronjobs": ("batch", "v1", True, ("cronjob", "cj")),
    "horizontalpodautoscalers": ("autoscaling", "v2", True, ("horizontalpodautoscaler", "hpa")),
    "poddisruptionbudgets": ("policy", "v1", True, ("poddisruptionbudget", "pdb")),
    "ingresses": ("networking.k8s.io", "v1", True, ("ingress", "ing")),
    "networkpolicies": ("networking.k8s.io", "v1", True, ("networkpolicy", "netpol")),
    "ingressclasses": ("networking.k8s.io", "v1", False, ("ingressclass",)),
    "endpointslices": ("discovery.k8s.io", "v1", True, ("endpointslice",)),
    "leases": ("coordination.k8s.io", "v1", True, ("lease",)),
    "roles": ("rbac.authorization.k8s.io", "v1", True, ("role",)),
    "rolebindings": ("rbac.authorization.k8s.io", "v1", True, ("rolebinding",)),
    "clusterroles": ("rbac.authorization.k8s.io", "v1", False, ("clusterrole",)),
    "clusterrolebindings": ("rbac.authorization.k8s.io", "v1", False, ("clusterrolebinding",)),
    "storageclasses": ("storage.k8s.io", "v1", False, ("storageclass", "sc")),
    "customresourcedefinitions": ("apiextensions.k8s.io", "v1", False,
                                  ("customresourcedefinition", "crd", "crds")),
    "certificatesigningrequests": ("certificates.k8s.io", "v1", False,
                                   ("certificatesigningrequest", "csr")),
    "validatingwebhookconfigurations": ("admissionregistration.k8s.io", "v1", False,
                                        ("validatingwebhookconfiguration",)),
    "mutatingwebhookconfigurations": ("admissionregistration.k8s.io", "v1", False,
                                      ("mutatingwebhookconfiguration",)),
}
_ALIASES = {alias: plural for plural, meta in KNOWN_RESOURCES.items() for alias in meta[3]}
_VERSION_RE = re.compile(r"v\d+(?:(?:alpha|beta)\d+)?\Z")
_HTTP_VERBS = {"get": "GET", "head": "HEAD", "post": "POST", "create": "POST", "put": "PUT",
               "update": "PUT", "patch": "PATCH", "delete": "DELETE", "options": "OPTIONS"}
_SHORTHAND_VERBS = ("get", "list", "watch", "create", "update", "patch", "delete",
                    "deletecollection", "exec", "attach", "portforward", "port-forward", "proxy",
                    "log", "logs")
_POD_VERBS = ("exec", "attach", "portforward", "log")
_WS_HEADERS = {"Connection": "Upgrade", "Upgrade": "websocket",
               "Sec-WebSocket-Protocol": "v5.channel.k8s.io,v4.channel.k8s.io"}


def _resolve_resource(spec: str) -> tuple[str, str, str, bool | None]:
    """`pods`, `pod`, `po`, `deployments.apps`, `deployments.v1.apps`, `widgets.example.com`
    -> (resource, group, version, namespaced or None when unknown)."""
    head, _, tail = spec.partition(".")
    head = _ALIASES.get(head, head)
    version = None
    if tail:
        first, _, rest = tail.partition(".")
        if _VERSION_RE.match(first) and rest:
            version, tail = first, rest
    known = KNOWN_RESOURCES.get(head)
    if not tail:
        if known is None:
            raise ValueError(f"unknown resource {spec!r}: write it as resource.group "
                             "(core resources and common groups are known)")
        return head, known[0], version or known[1], known[2]
    _check(_GROUP_RE, tail, "API group")
    if known is not None and known[0] == tail:
        return head, tail, version or known[1], known[2]
    return head, tail, version or "v1", None


def _shorthand_tokens(text: str) -> tuple[list[str], list[str] | None]:
    import shlex

    try:
        tokens = shlex.split(text)
    except ValueError as e:
        raise ValueError(f"cannot parse {text!r}: {e}") from e
    if "--" in tokens:
        i = tokens.index("--")
        return tokens[:i], tokens[i + 1:]
    return tokens, None


def shorthand_request(text: str) -> tuple[str, str, list[tuple[str, str]], dict[str, str]]:
    """The (method, path, query, headers) kubectl would send for a shorthand line."""
    from urllib.parse import parse_qsl, urlsplit

    tokens, argv = _shorthand_tokens(text)
    if len(tokens) < 2:
        raise ValueError(f"shorthand needs a verb and a resource or path: {text!r}")
    verb = tokens[0].lower()
    if tokens[1].startswith("/"):  # `get /version`, `GET /api/v1/namespaces/a/pods?watch=1`
        if verb not in _HTTP_VERBS or len(tokens) != 2 or argv is not None:
            raise ValueError(f"a path shorthand is 'VERB /path', got {text!r}")
        url = urlsplit(tokens[1])
        return (_HTTP_VERBS[verb], url.path, parse_qsl(url.query, keep_blank_values=True), {})
    verb = {"logs": "log", "port-forward": "portforward"}.get(verb, verb)
    if verb not in _SHORTHAND_VERBS:
        raise ValueError(f"unknown verb {tokens[0]!r} (one of {', '.join(_SHORTHAND_VERBS)})")
    namespace: str | None = None
    all_ns = watch = stdin = tty = False
    container = None
    headers: dict[str, str] = {}
    positional: list[str] = []
    it = iter(tokens[1:])
    for tok in it:
        key, eq, inline = tok.partition("=")
        value = inline if eq else None
        if key in ("-n", "--namespace", "-c", "--container", "--as", "--as-group") and not eq:
            value = next(it, None)
            if value is None:
                raise ValueError(f"{key} needs a value")
        if key in ("-n", "--namespace"):
            namespace = value
        elif key in ("-c", "--container"):
            container = value
        elif key == "--as":
            headers["Impersonate-User"] = value or ""
        elif key == "--as-group":
            headers["Impersonate-Group"] = value or ""
        elif tok in ("-A", "--all-namespaces"):
            all_ns = True
        elif tok in ("-w", "--watch"):
            watch = True
        elif tok in ("-i", "--stdin", "-it", "-ti"):
            stdin, tty = True, tty or tok in ("-it", "-ti")
        elif tok in ("-t", "--tty"):
            tty = True
        elif tok.startswith("-"):
            raise ValueError(f"unknown option {tok!r}")
        else:
            positional.append(tok)
    # `exec web-1 -- ls` (kubectl form): the resource is a pod
    if verb in _POD_VERBS and len(positional) == 1 and "/" not in positional[0]:
        positional = ["pods", positional[0]]
    if not positional:
        raise ValueError(f"no resource in {text!r}")
    spec, *more = positional
    name = sub = None
    extra: list[str] = []
    if "/" in spec:
        spec, name, *subparts = spec.split("/")
        if len(subparts) > 1:
            raise ValueError(f"too many parts in {positional[0]!r}")
        sub = subparts[0] if subparts else None
        extra = more
    elif more:
        name, *extra = more
    resource, group, version, namespaced = _resolve_resource(spec)
    if all_ns and namespace:
        raise ValueError("-n and -A together")
    if namespaced is False and namespace and resource != "namespaces":
        raise ValueError(f"{resource} is cluster-scoped: drop -n")
    if namespaced is None:
        namespaced = namespace is not None
    if namespaced and not namespace and not all_ns:
        namespace = "default"  # kubectl's default namespace
    if all_ns and name:
        raise ValueError("-A with a name")
    if verb in _POD_VERBS:
        if sub:
            raise ValueError(f"{verb} takes pods/NAME, not a subresource")
        if resource != "pods" or not name:
            raise ValueError(f"{verb} needs pods/NAME")
        sub = verb
    elif verb == "proxy":
        if sub or not name or resource not in PROXY_RESOURCES:
            raise ValueError("proxy needs pods|services|nodes/NAME[:PORT] [PATH]")
        sub = "proxy"
    if argv is not None and verb != "exec":
        raise ValueError("only exec takes '-- COMMAND'")
    if verb == "exec" and not argv:
        raise ValueError("exec needs '-- COMMAND ARGS...'")
    if extra and verb not in ("proxy", "portforward"):
        raise ValueError(f"unexpected {' '.join(extra)!r} in {text!r}")

    query: list[tuple[str, str]] = []
    hdrs = dict(headers)
    method = "GET"
    if verb in ("get", "list", "watch"):
        if verb == "list" or (verb == "get" and not name):
            verb = "watch" if watch else "list"
        if verb in ("list", "watch") and name:
            if sub:
                raise ValueError(f"{verb} takes no subresource")
            query.append(("fieldSelector", f"metadata.name={name}"))
            name = None
        if verb == "watch":
            query.append(("watch", "true"))
        if container:
            query.append(("container", container))
    elif verb in ("create", "update", "patch", "delete", "deletecollection"):
        method = {"create": "POST", "update": "PUT", "patch": "PATCH"}.get(verb, "DELETE")
        if verb == "create" and name and not sub:
            raise ValueError("create sends no name (it is in the body); write 'create RESOURCE'")
        if verb in ("update", "patch") and not name:
            raise ValueError(f"{verb} needs RESOURCE/NAME")
        if verb == "deletecollection" and name:
            raise ValueError("deletecollection takes no name")
    elif verb in ("exec", "attach"):
        hdrs.update(_WS_HEADERS)
        query += [("command", a) for a in argv or ()]
        if container:
            query.append(("container", container))
        query += [("stdin", "true")] if stdin else []
        query += [("stdout", "true"), ("stderr", "false" if tty else "true")]
        query += [("tty", "true")] if tty else []
    elif verb == "portforward":
        hdrs.update(_WS_HEADERS, **{"Sec-WebSocket-Protocol": "v4.channel.k8s.io"})
        query += [("ports", p.split(":")[-1]) for p in extra]
        extra = []
    elif verb == "log" and container:
        query.append(("container", container))
    base = f"/api/{version}" if not group else f"/apis/{group}/{version}"
    if namespace and resource != "namespaces":
        base += f"/namespaces/{namespace}"
    path = f"{base}/{resource}"
    for piece in (name, sub, *extra):
        if piece:
            path += "/" + piece.lstrip("/")
    return method, path, query, hdrs


def parse_shorthand(text: str, target: str) -> Operation:
    """The Operation a policy test's `kubernetes:` shorthand stands for (ValueError if invalid)."""
    method, path, query, headers = shorthand_request(text)
    return to_operation(target, method, path, query, headers)
