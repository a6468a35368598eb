"""Kubernetes through the real gateway, driven by real clients (SPEC §4-5, issue 3).

A Kubernetes API look-alike (tests/fixtures/k8s_api.py) records every request it receives, so a
denied request is proven never to have reached it. Clients: the `kubernetes` Python client (REST
and exec over WebSocket via `kubernetes.stream.stream`) and kubectl (which tries exec over
WebSocket first and retries over SPDY when the upgrade is refused), each through the forward
proxy and through a reverse listener with a kubeconfig.

Go clients (kubectl) never use HTTPS_PROXY for loopback literals (127.0.0.1, "localhost"), so
kubectl reaches the forward proxy through the kubeconfig's `proxy-url` (the same CONNECT path);
when this machine has another name for 127.0.0.1 the HTTPS_PROXY variant runs as well.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import urllib3

from tests.fixtures.gateway import Gateway, free_port
from tests.fixtures.k8s_api import FakeKubeAPI, make_pod

pytestmark = pytest.mark.e2e

K8S_TOKEN = "k8s-upstream-t0ken-9c1e"
POLICY = """
rules:
  - id: k8s-discovery
    effect: allow
    reason: API discovery
    when:
      targets: [k8s]
      http: {methods: [GET], paths: ["/version", "/api", "/apis", "/api/v1", "/apis/*/*"]}
  - id: k8s-read-pods
    effect: allow
    reason: agents read pods in team namespaces
    when:
      groups: [agents, admins]
      kubernetes: {verbs: [get, list, watch], resources: [pods], namespaces: ["team-*"]}
  - id: k8s-delete-pods
    effect: allow
    reason: agents may restart pods in team-a
    when:
      groups: [agents]
      kubernetes: {verbs: [delete], resources: [pods], namespaces: [team-a]}
  - id: k8s-exec-ls
    effect: allow
    reason: agents may list files
    when:
      groups: [agents]
      kubernetes: {verbs: [exec], resources: [pods], namespaces: ["team-*"],
                   commands: ["ls", "ls *"]}
  - id: k8s-admin-shell
    effect: allow
    reason: admins may open a shell in team-b
    when:
      groups: [admins]
      kubernetes: {verbs: [exec], namespaces: [team-b], commands: ["sh"]}
  - id: k8s-no-shell
    effect: deny
    reason: interactive shells are not allowed for agents
    when: {kubernetes: {verbs: [exec, attach], commands: ["sh", "sh *", "bash", "bash *"]}}
    unless: {groups: [admins]}
  - id: k8s-no-secrets
    effect: deny
    reason: secrets are off limits
    when: {kubernetes: {resources: [secrets]}}
  - id: k8s-no-impersonation
    effect: deny
    reason: impersonation is not allowed
    when: {kubernetes: {impersonate: true}}
tests:
  - name: agents list pods
    identity: {sub: agent-1, groups: [agents]}
    request: {target: k8s, kubernetes: "list pods -n team-a"}
    expect: allow
  - name: agents cannot open a shell
    identity: {sub: agent-1, groups: [agents]}
    request: {target: k8s, kubernetes: "exec pods/web-1 -n team-a -- sh"}
    expect: deny
"""


def _loopback_alias() -> str | None:
    """A name for 127.0.0.1 other than localhost (Go clients honour HTTPS_PROXY for it)."""
    name = socket.gethostname()
    try:
        addrs = {a[4][0] for a in socket.getaddrinfo(name, 443, socket.AF_INET)}
    except OSError:
        return None
    return name if addrs == {"127.0.0.1"} and name != "localhost" else None


class Env:
    def __init__(self, api: FakeKubeAPI, gw: Gateway, oidc: Any, rport: int,
                 alias: str | None, workdir: Path) -> None:
        self.api, self.gw, self.oidc, self.rport, self.alias = api, gw, oidc, rport, alias
        self.workdir = workdir
        self.agent = oidc.token(sub="agent-1", groups=["agents"], ttl=3600)
        self.admin = oidc.token(sub="admin-1", groups=["admins"], ttl=3600)

    @property
    def reverse_url(self) -> str:
        return f"https://127.0.0.1:{self.rport}"

    def audit(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.gw.audit_text().splitlines()]

    def decisions(self, **match: Any) -> list[dict[str, Any]]:
        out = []
        for rec in self.audit():
            k8s = (rec.get("operation") or {}).get("kubernetes") or {}
            if rec.get("type") == "decision" and all(k8s.get(k) == v for k, v in match.items()):
                out.append(rec)
        return out


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, oidc: Any, test_ca: Any) -> Any:
    alias = _loopback_alias()
    work = tmp_path_factory.mktemp("k8s-e2e")
    api = FakeKubeAPI(token=K8S_TOKEN, ca=test_ca, directory=work / "api",
                      hostnames=("localhost", *([alias] if alias else []))).start()
    rport = free_port()
    hosts = [f"127.0.0.1:{api.port}"] + ([f"{alias}:{api.port}"] if alias else [])
    cfg = {"identity": {"issuers": [oidc.config()]},
           "targets": [{"name": "k8s", "protocol": "kubernetes", "hosts": hosts,
                        "listen": f"127.0.0.1:{rport}", "upstream": api.url,
                        "credentials": {"type": "bearer", "token_env": "K8S_TOKEN"},
                        "tls": {"verify": True, "ca_file": str(test_ca.cert_path)}}]}
    gw = Gateway(work / "gw", cfg, env={"K8S_TOKEN": K8S_TOKEN}, policies={"k8s.yaml": POLICY})
    gw.start()
    try:
        yield Env(api, gw, oidc, rport, alias, work)
    finally:
        gw.stop()
        api.stop()


# ---------------------------------------------------------------------------------------------
# The kubernetes Python client


def py_client(env: Env, token: str, via: str, monkeypatch: pytest.MonkeyPatch | None = None
              ) -> Any:
    from kubernetes import client

    cfg = client.Configuration()
    if via == "proxy":
        assert monkeypatch is not None
        for var in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("HTTPS_PROXY", env.gw.proxy)  # taken from the environment
        cfg = client.Configuration()
        cfg.host = env.api.url
        assert cfg.proxy == env.gw.proxy
        # the token travels in Proxy-Authorization (REST and the exec WebSocket alike)
        cfg.proxy_headers = urllib3.make_headers(proxy_basic_auth=f"agent:{token}")
        cfg.api_key = {"authorization": "Bearer not-the-agent-token"}
    else:
        cfg.host = env.reverse_url
        cfg.api_key = {"authorization": f"Bearer {token}"}
    cfg.ssl_ca_cert = str(env.gw.ca)
    return client.CoreV1Api(client.ApiClient(cfg))


def exec_argv(core: Any, pod: str, ns: str, argv: list[str]) -> str:
    from kubernetes.stream import stream

    return stream(core.connect_get_namespaced_pod_exec, pod, ns, command=argv, stdout=True,
                  stderr=True, stdin=False, tty=False, _request_timeout=30)


@pytest.mark.parametrize("via", ["proxy", "reverse"])
def test_python_client_allowed_and_denied(env: Env, via: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from kubernetes.client.rest import ApiException

    core = py_client(env, env.agent, via, monkeypatch)
    env.api.clear()
    names = {p.metadata.name for p in core.list_namespaced_pod("team-a").items}
    assert {"web-1", "done-1"} <= names
    assert core.read_namespaced_pod("web-1", "team-a").status.phase == "Running"
    # allowed exec with argv runs on the look-alike
    assert exec_argv(core, "web-1", "team-a", ["ls", "/var/log"]) == "app.log\n"
    assert env.api.execs == [["ls", "/var/log"]]
    # the upstream saw the target's credential, never the agent's token or placeholder
    assert {r.headers.get("authorization") for r in env.api.requests} == {f"Bearer {K8S_TOKEN}"}
    assert not any("impersonate-user" in r.headers for r in env.api.requests)
    seen = len(env.api.requests)

    # denied REST call: a Kubernetes Status carrying the policy reason and the rule
    with pytest.raises(ApiException) as err:
        core.read_namespaced_secret("db-password", "team-a")
    assert err.value.status == 403
    status = json.loads(err.value.body)
    assert status["kind"] == "Status" and status["apiVersion"] == "v1"
    assert status["reason"] == "Forbidden" and status["code"] == 403
    assert status["message"] == "secrets are off limits"
    assert status["error"] == "denied" and status["rule"] == "k8s-no-secrets"
    assert status["request_id"]
    # default deny
    with pytest.raises(ApiException) as err:
        core.list_namespaced_pod("kube-system")
    assert err.value.status == 403 and json.loads(err.value.body)["rule"] == "default-deny"
    # denied exec over WebSocket never reaches the look-alike
    with pytest.raises(Exception) as exc:  # noqa: B017 - the stream helper wraps the 403
        exec_argv(core, "web-1", "team-a", ["sh", "-c", "cat /etc/hostname"])
    assert "403" in str(exc.value)
    # impersonation headers are refused
    core.api_client.set_default_header("Impersonate-User", "system:admin")
    with pytest.raises(ApiException) as err:
        core.list_namespaced_pod("team-a")
    assert json.loads(err.value.body)["rule"] == "k8s-no-impersonation"
    assert len(env.api.requests) == seen
    assert env.api.execs == [["ls", "/var/log"]]
    # the audit log has the classified fields
    ok = env.decisions(verb="exec", command="ls /var/log")[-1]
    assert ok["decision"] == "allow" and ok["rules"] == ["k8s-exec-ls"]
    assert ok["protocol"] == "kubernetes" and ok["target"] == "k8s"
    assert ok["operation"]["kubernetes"]["resource"] == "pods"
    assert ok["operation"]["kubernetes"]["namespace"] == "team-a"
    assert ok["operation"]["kubernetes"]["name"] == "web-1"
    assert ok["operation"]["kubernetes"]["subresource"] == "exec"
    assert ok["operation"]["summary"] == "exec pods/web-1 -n team-a -- ls /var/log"
    bad = env.decisions(verb="exec", command="sh -c cat /etc/hostname")[-1]
    assert bad["decision"] == "deny" and bad["rules"] == ["k8s-no-shell"]
    assert env.decisions(resource="secrets", name="db-password")[-1]["decision"] == "deny"


def test_python_client_delete_and_admin_exec(env: Env) -> None:
    from kubernetes.client.rest import ApiException
    from kubernetes.stream import stream

    core = py_client(env, env.agent, "reverse")
    env.api.clear()
    env.api.state.pods[("team-a", "tmp-1")] = make_pod("tmp-1", "team-a")
    assert core.delete_namespaced_pod("tmp-1", "team-a").metadata.name == "tmp-1"
    assert ("team-a", "tmp-1") not in env.api.state.pods
    with pytest.raises(ApiException) as err:  # delete is only allowed in team-a
        core.delete_namespaced_pod("db-0", "team-b")
    assert err.value.status == 403
    assert ("team-b", "db-0") in env.api.state.pods
    # an admin may open a shell in team-b: stdin reaches the fake shell, exit code comes back
    admin = py_client(env, env.admin, "reverse")
    resp = stream(admin.connect_get_namespaced_pod_exec, "db-0", "team-b", command=["sh"],
                  stdout=True, stderr=True, stdin=True, tty=False, _preload_content=False)
    resp.write_stdin("echo hello from admin\nhostname\nexit 4\n")
    resp.run_forever(timeout=20)
    assert resp.returncode == 4
    assert resp.read_stdout() == "hello from admin\ndb-0\n"
    assert env.api.execs == [["sh"]]
    assert [r.method for r in env.api.requests if r.path.endswith("/pods/db-0")] == []


def test_unauthenticated_gets_a_status(env: Env) -> None:
    from kubernetes.client.rest import ApiException

    core = py_client(env, "not-a-jwt", "reverse")
    env.api.clear()
    with pytest.raises(ApiException) as err:
        core.list_namespaced_pod("team-a")
    assert err.value.status == 401
    body = json.loads(err.value.body)
    assert body["kind"] == "Status" and body["reason"] == "Unauthorized"
    assert body["error"] == "unauthenticated"
    assert env.api.requests == []


def _raw_exec(env: Env, token: str, method: str, headers: dict[str, str], argv: list[str]
              ) -> tuple[int, dict[str, Any]]:
    from urllib.parse import urlencode

    ctx = ssl.create_default_context(cafile=str(env.gw.ca))
    conn = http.client.HTTPSConnection("127.0.0.1", env.rport, timeout=20, context=ctx)
    query = urlencode([("command", a) for a in argv] + [("stdout", "true")])
    conn.request(method, f"/api/v1/namespaces/team-a/pods/web-1/exec?{query}", body=b"",
                 headers={"Authorization": f"Bearer {token}", **headers})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data)


SPDY = {"Connection": "Upgrade", "Upgrade": "SPDY/3.1",
        "X-Stream-Protocol-Version": "v4.channel.k8s.io"}
WEBSOCKET = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
             "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
             "Sec-WebSocket-Protocol": "v4.base64.channel.k8s.io"}


@pytest.mark.parametrize(("method", "headers"), [("POST", SPDY), ("GET", WEBSOCKET),
                                                 ("POST", {}), ("GET", {})],
                         ids=["spdy", "websocket-base64", "plain-post", "plain-get"])
def test_exec_is_decided_the_same_on_every_transport(env: Env, method: str,
                                                     headers: dict[str, str]) -> None:
    env.api.clear()
    code, body = _raw_exec(env, env.agent, method, headers, ["sh", "-c", "id"])
    assert code == 403 and body["kind"] == "Status" and body["rule"] == "k8s-no-shell"
    assert env.api.requests == []
    rec = env.decisions(verb="exec", command="sh -c id")[-1]
    assert rec["operation"]["http"]["method"] == method and rec["decision"] == "deny"
    if headers is WEBSOCKET:
        return  # an allowed WebSocket exec is covered by the client tests
    # An allowed command passes the gateway on the same transport; the look-alike only speaks
    # WebSocket, so it answers SPDY and plain requests with its own 400.
    code, body = _raw_exec(env, env.agent, method, headers, ["ls"])
    assert code == 400 and body["kind"] == "Status" and "rule" not in body
    assert [r.method for r in env.api.requests] == [method]


# ---------------------------------------------------------------------------------------------
# kubectl


def kubeconfig(env: Env, name: str, server: str, token: str, proxy_url: str | None = None,
               ca: Path | None = None) -> Path:
    cluster: dict[str, Any] = {"server": server, "certificate-authority": str(ca or env.gw.ca)}
    if proxy_url:
        cluster["proxy-url"] = proxy_url
    path = env.workdir / name
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "x",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u",
                                               "namespace": "team-a"}}]}))
    return path


def kubectl_runner(env: Env, config: Path, extra_env: dict[str, str] | None = None) -> Any:
    run_env = {k: v for k, v in os.environ.items()
               if k.lower() not in ("https_proxy", "http_proxy", "no_proxy", "all_proxy")}
    run_env.update(KUBECONFIG=str(config), HOME=str(env.workdir), **(extra_env or {}))

    def kubectl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["kubectl", "--request-timeout=30s", *args], env=run_env,
                              input=stdin if stdin is not None else "", text=True,
                              capture_output=True, timeout=90)

    return kubectl


def kubectl_modes(env: Env, token: str) -> dict[str, Any]:
    modes = {
        # forward proxy, token in Proxy-Authorization; the kubeconfig holds no real credential
        "proxy": kubectl_runner(env, kubeconfig(env, f"kc-proxy-{token[-6:]}", env.api.url,
                                                "placeholder", proxy_url=env.gw.proxy_with_token(
                                                    token))),
        # reverse listener, token as the kubeconfig user's bearer token
        "reverse": kubectl_runner(env, kubeconfig(env, f"kc-rev-{token[-6:]}", env.reverse_url,
                                                  token)),
    }
    if env.alias:
        server = f"https://{env.alias}:{env.api.port}"
        modes["https_proxy"] = kubectl_runner(
            env, kubeconfig(env, f"kc-env-{token[-6:]}", server, "placeholder"),
            {"HTTPS_PROXY": env.gw.proxy_with_token(token)})
    return modes


needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
MODES = ["proxy", "reverse", "https_proxy"]


def _mode(env: Env, token: str, mode: str) -> Any:
    modes = kubectl_modes(env, token)
    if mode not in modes:
        pytest.skip("no name other than localhost resolves to 127.0.0.1 here; Go clients bypass "
                    "HTTPS_PROXY for loopback literals (the proxy-url variant covers the path)")
    return modes[mode]


@needs_kubectl
@pytest.mark.parametrize("mode", MODES)
def test_kubectl_get_exec_delete(env: Env, mode: str) -> None:
    kubectl = _mode(env, env.agent, mode)
    pod = f"victim-{mode.replace('_', '-')}"
    env.api.state.pods[("team-a", pod)] = make_pod(pod, "team-a")
    env.api.clear()
    got = kubectl("get", "pods")
    assert got.returncode == 0, got.stderr
    assert "web-1" in got.stdout and "Running" in got.stdout
    got = kubectl("exec", "web-1", "--", "ls")
    assert (got.returncode, got.stdout) == (0, "app\nbin\netc\ntmp\nvar\n"), got.stderr
    got = kubectl("exec", "web-1", "--", "ls", "/nope")
    assert got.returncode == 2 and "command terminated with exit code 2" in got.stderr
    got = kubectl("delete", "pod", pod)
    assert got.returncode == 0 and f'pod "{pod}" deleted' in got.stdout, got.stderr
    assert ("team-a", pod) not in env.api.state.pods
    assert env.api.execs == [["ls"], ["ls", "/nope"]]
    assert {r.headers.get("authorization") for r in env.api.requests} == {f"Bearer {K8S_TOKEN}"}


@needs_kubectl
@pytest.mark.parametrize("mode", MODES)
def test_kubectl_denied_exec_never_reaches_the_api(env: Env, mode: str) -> None:
    kubectl = _mode(env, env.agent, mode)
    env.api.clear()
    before = len(env.decisions(verb="exec", command="sh"))
    got = kubectl("exec", "-i", "web-1", "--", "sh", stdin="cat /etc/hostname\n")
    assert got.returncode == 1
    assert "Error from server (Forbidden): interactive shells are not allowed for agents" \
        in got.stderr
    assert env.api.execs == []
    assert not any(r.is_exec for r in env.api.requests)
    # kubectl retried over SPDY after the refused WebSocket: both were denied and audited
    denied = env.decisions(verb="exec", command="sh")[before:]
    assert {d["operation"]["http"]["method"] for d in denied} == {"GET", "POST"}
    assert all(d["decision"] == "deny" and d["rules"] == ["k8s-no-shell"] for d in denied)
    got = kubectl("get", "secrets")
    assert got.returncode == 1
    assert "Error from server (Forbidden): secrets are off limits" in got.stderr
    assert not any("/secrets" in r.path for r in env.api.requests)


@needs_kubectl
@pytest.mark.parametrize("mode", ["proxy", "reverse"])
def test_kubectl_exec_interactive_shell_with_stdin(env: Env, mode: str) -> None:
    kubectl = kubectl_modes(env, env.admin)[mode]
    env.api.clear()
    got = kubectl("exec", "-i", "-n", "team-b", "db-0", "--", "sh",
                  stdin="echo hi from kubectl\nls /app\n")
    assert got.returncode == 0, got.stderr
    assert got.stdout == "hi from kubectl\nconfig.yaml\nserver\n"
    assert env.api.execs == [["sh"]]
    # -it as an agent would type it (kubectl drops the TTY: stdin is not a terminal)
    got = kubectl("exec", "-it", "-n", "team-b", "db-0", "--", "sh", stdin="false\nexit 5\n")
    assert got.returncode == 5 and "command terminated with exit code 5" in got.stderr
    rec = env.decisions(verb="exec", namespace="team-b", name="db-0")[-1]
    assert rec["decision"] == "allow" and rec["rules"] == ["k8s-admin-shell"]
    assert rec["identity"]["sub"] == "admin-1"


@needs_kubectl
def test_recordings_decode_exec_channels(env: Env) -> None:
    from mitmproxy import io

    kubectl = kubectl_modes(env, env.admin)["reverse"]
    got = kubectl("exec", "-i", "-n", "team-b", "db-0", "--", "sh", stdin="echo rec-marker-42\n")
    assert got.returncode == 0, got.stderr
    files = sorted((env.gw.state_dir / "recordings").glob("*.mitm"))
    assert files
    messages = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the flow is recorded when the WebSocket ends
        messages = []
        for f in files:
            with f.open("rb") as fh:
                for flow in io.FlowReader(fh).stream():
                    if getattr(flow, "websocket", None) is not None:
                        messages += [m.content for m in flow.websocket.messages]
        if b"[stdout] rec-marker-42\n" in messages:
            break
        time.sleep(0.2)
    assert b"[stdout] rec-marker-42\n" in messages
    assert any(m.startswith(b"[stdin] echo rec-marker-42") for m in messages)
    raw = b"".join(f.read_bytes() for f in files)
    for secret in (env.agent, env.admin, K8S_TOKEN):
        assert secret.encode() not in raw


def test_nothing_secret_in_audit_or_logs(env: Env) -> None:
    # runs last in this module: everything above has been logged by now
    text = env.gw.audit_text() + env.gw.stdout
    assert env.decisions(verb="list", resource="pods")
    for secret in (env.agent, env.admin, K8S_TOKEN):
        assert secret not in text
    assert "czNjcjN0" not in text  # the Secret's data never came back through the gateway


@pytest.mark.parametrize("path", [
    "/api/v1/namespaces/team-a/pods/web-1?watch=true",  # a named watch is ambiguous
    "/API/v1/namespaces/team-a/secrets",  # mixed-case prefix
    "/api/v1/namespaces/team-a/pods/web-1/log/extra",  # junk after a subresource
])
def test_unclassifiable_requests_are_refused_as_bad_request(env: Env, path: str) -> None:
    env.api.clear()
    ctx = ssl.create_default_context(cafile=str(env.gw.ca))
    conn = http.client.HTTPSConnection("127.0.0.1", env.rport, timeout=20, context=ctx)
    conn.request("GET", path, headers={"Authorization": f"Bearer {env.agent}"})
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    assert resp.status == 400
    assert body["kind"] == "Status" and body["reason"] == "BadRequest"
    assert body["error"] == "bad_request"
    assert env.api.requests == []
