"""Helpers shared by the mitmproxy adapters: metadata keys, refusals, fail-closed guard.

This is adapter code (it imports mitmproxy); engines never import it.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from mitmproxy import http
from mitmproxy.proxy.mode_specs import ReverseMode

from addons.model import AuthError, PortcullisError

log = logging.getLogger("portcullis")

REQUEST_ID = "portcullis.request_id"
IDENTITY = "portcullis.identity"
TOKEN = "portcullis.token_present"
TARGET = "portcullis.target"
POLICY = "portcullis.policy"
OPERATIONS = "portcullis.operations"
DECISION = "portcullis.decision"
REFUSED = "portcullis.refused"
MASKED = "portcullis.masked"
AUDIT_ID = "portcullis.audit_id"
APPROVAL = "portcullis.approval"  # id of the approval this request waited for
APPROVED = "portcullis.approved"  # set when an approval or a grant released the request
STARTED = "portcullis.started"


def request_id(flow: Any) -> str:
    rid = flow.metadata.get(REQUEST_ID)
    if rid is None:
        rid = uuid.uuid4().hex[:20]
        flow.metadata[REQUEST_ID] = rid
    return rid


def is_reverse(flow: Any) -> bool:
    return isinstance(flow.client_conn.proxy_mode, ReverseMode)


def is_proxy_request(flow: Any) -> bool:
    """A CONNECT to the forward proxy itself (-> 407 on authentication failures).

    Absolute-form requests cannot be told apart here (mitmproxy rewrites HTTP/1 request lines
    before hooks run); IdentityAddon knows them as requests on connections that never sent
    CONNECT and asks for 407 itself.
    """
    return not is_reverse(flow) and flow.request.method == "CONNECT"


def client_address(flow: Any) -> str | None:
    peer = flow.client_conn.peername
    return f"{peer[0]}:{peer[1]}" if peer else None


def refusal_body(err: PortcullisError, flow: Any) -> dict[str, Any]:
    body = err.to_json()
    body["request_id"] = request_id(flow)
    return body


def refuse(flow: Any, err: PortcullisError, proxy: bool = False) -> None:
    """Answer the flow with `err` in the protocol's own language and remember why."""
    status = err.status
    headers = {"Content-Type": "application/json", "Cache-Control": "no-store"}
    if isinstance(err, AuthError):
        if proxy:
            status = 407
            headers["Proxy-Authenticate"] = 'Bearer realm="portcullis"'
        else:
            headers["WWW-Authenticate"] = 'Bearer realm="portcullis"'
    body = refusal_body(err, flow)
    target = flow.metadata.get(TARGET)
    if target is not None and target.protocol == "kubernetes":
        try:
            from addons import kubernetes

            body = kubernetes.status_body(status, K8S_REASONS.get(status, "Forbidden"),
                                          err.reason, body)
        except Exception:  # noqa: BLE001 - the plain JSON refusal still refuses
            log.exception("cannot build a Kubernetes Status body")
    flow.response = http.Response.make(status, json.dumps(body).encode(), headers)
    flow.metadata[REFUSED] = err


K8S_REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 407: "Unauthorized",
               502: "InternalError", 503: "ServiceUnavailable", 500: "InternalError"}


@contextmanager
def guard(flow: Any, proxy: bool = False) -> Iterator[None]:
    """Fail closed: any exception inside a hook becomes a refusal of the flow."""
    try:
        yield
    except PortcullisError as e:
        try:
            refuse(flow, e, proxy=proxy or is_proxy_request(flow))
        except Exception:  # noqa: BLE001 - last resort: drop the connection
            log.exception("cannot build refusal")
            flow.kill()
    except Exception as e:  # noqa: BLE001 - never let a flow through on an unexpected error
        log.exception("internal error while deciding request %s", request_id(flow))
        err = PortcullisError(f"internal error ({type(e).__name__}); request refused")
        try:
            refuse(flow, err, proxy=proxy)
        except Exception:  # noqa: BLE001 - last resort: drop the connection
            flow.kill()
