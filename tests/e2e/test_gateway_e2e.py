"""Stage-1 walking skeleton, end to end: real gateway process, real curl and httpx through
HTTPS_PROXY over TLS, a test OIDC issuer and an echoing upstream."""

from __future__ import annotations

import json
import ssl
import subprocess
from typing import Any

import httpx
import pytest

from tests.conftest import UPSTREAM_TOKEN, http_target

POLICY = """
rules:
  - id: read-users
    effect: allow
    reason: agents read users
    when: {groups: [agents], http: {methods: [GET, POST], paths: ["/v1/users/**"]}}
  - id: deny-admin
    effect: deny
    reason: admin is off limits
    when: {http: {paths: ["/v1/admin/**"]}}
  - id: review-delete
    effect: review
    reason: deletes need a human
    when: {http: {methods: [DELETE]}}
"""


@pytest.fixture
def gw(gateway_factory: Any, oidc: Any, echo_upstream: Any, test_ca: Any) -> Any:
    cfg = {"identity": {"issuers": [oidc.config()]},
           "targets": [http_target("echo", echo_upstream, test_ca)]}
    return gateway_factory(cfg, {"p.yaml": POLICY}, env={"UPSTREAM_TOKEN": UPSTREAM_TOKEN})


def curl(gw: Any, url: str, token: str | None, *extra: str) -> tuple[int, dict[str, Any]]:
    proxy = gw.proxy_with_token(token) if token else gw.proxy
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "20", "--proxy", proxy, "--cacert", str(gw.ca),
         "-w", "\n%{http_code}", *extra, url],
        capture_output=True, text=True, timeout=30)
    body, _, code = out.stdout.rpartition("\n")
    try:
        data = json.loads(body) if body else {}
    except ValueError:
        data = {"raw": body}
    return int(code or 0), data


def client(gw: Any, token: str | None = None) -> httpx.Client:
    proxy = gw.proxy_with_token(token) if token else gw.proxy
    return httpx.Client(proxy=proxy, verify=ssl.create_default_context(cafile=str(gw.ca)),
                        timeout=20)


def test_allowed_request_reaches_upstream_with_injected_credentials(gw: Any, oidc: Any,
                                                                    echo_upstream: Any) -> None:
    token = oidc.token(groups=["agents"])
    url = f"https://localhost:{echo_upstream.port}/v1/users/7"
    code, body = curl(gw, url, token, "-H", "Authorization: Bearer agent-supplied",
                      "-H", "Impersonate-User: admin", "-H", "impersonate-group: system:masters")
    assert code == 200, body
    headers = {k.lower(): v for k, v in echo_upstream.requests[-1]["headers"].items()}
    assert headers["authorization"] == f"Bearer {UPSTREAM_TOKEN}"
    # the echo reflected the credential; the agent gets it redacted
    assert UPSTREAM_TOKEN not in json.dumps(body)
    assert "[REDACTED:credential]" in json.dumps(body)
    assert "proxy-authorization" not in headers
    assert not any(k.startswith("impersonate-") for k in headers)
    assert token not in json.dumps(body)
    # the decision is in the audit log before the outcome, and nothing secret is anywhere
    lines = [json.loads(x) for x in gw.audit_text().splitlines()]
    decision = [x for x in lines if x["type"] == "decision" and x["decision"] == "allow"][-1]
    assert decision["identity"]["sub"] == "agent-1"
    assert decision["operation"]["http"] == {"method": "GET", "path": "/v1/users/7"}
    assert decision["rules"] == ["read-users"]
    outcome = [x for x in lines if x["type"] == "outcome" and x["decision_id"] == decision["id"]]
    assert outcome and outcome[0]["outcome"]["status"] == 200
    assert lines.index(decision) < lines.index(outcome[0])
    for text in (gw.audit_text(), gw.stdout):
        assert token not in text
        assert UPSTREAM_TOKEN not in text


def test_startup_prints_ca_and_agent_exports(gw: Any) -> None:
    out = gw.stdout
    assert f"CA certificate for agents: {gw.ca}" in out
    assert gw.ca.exists()
    listen = gw.config["listen"]["proxy"]
    assert f"export HTTPS_PROXY=http://agent:$TOKEN@{listen}" in out
    assert f"export SSL_CERT_FILE={gw.ca}" in out
    assert f"export REQUESTS_CA_BUNDLE={gw.ca}" in out
    # uvloop is a dependency: the gateway runs on it (Postgres data path CPU, docs/postgres.md)
    assert "Portcullis: event loop: uvloop.Loop" in out


def test_httpx_through_https_proxy(gw: Any, oidc: Any, echo_upstream: Any) -> None:
    token = oidc.token(groups=["agents"])
    with client(gw, token) as c:
        r = c.post(f"https://localhost:{echo_upstream.port}/v1/users/search", json={"q": "x"})
    assert r.status_code == 200
    assert r.json()["body"] == '{"q":"x"}'


def test_denied_and_default_denied(gw: Any, oidc: Any, echo_upstream: Any) -> None:
    token = oidc.token(groups=["agents"])
    before = len(echo_upstream.requests)
    base = f"https://localhost:{echo_upstream.port}"
    code, body = curl(gw, f"{base}/v1/admin/keys", token)
    assert code == 403
    assert body["error"] == "denied" and body["rule"] == "deny-admin"
    assert body["reason"] == "admin is off limits" and body["request_id"]
    code, body = curl(gw, f"{base}/v2/other", token)
    assert code == 403 and body["rule"] == "default-deny"
    # dot segments and encodings cannot dodge the deny
    code, body = curl(gw, f"{base}/v1/users/%2e%2e/admin/keys", token, "--path-as-is")
    assert code == 403 and body["rule"] == "deny-admin"
    code, body = curl(gw, f"{base}//v1//admin/keys", token, "--path-as-is")
    assert code == 403 and body["rule"] == "deny-admin"
    code, body = curl(gw, f"{base}/v1/users/x%2fy", token, "--path-as-is")
    assert code == 400 and body["error"] == "bad_request"
    assert len(echo_upstream.requests) == before
    denials = [json.loads(x) for x in gw.audit_text().splitlines()]
    assert sum(1 for x in denials if x.get("decision") == "deny") >= 5


def test_review_without_a_reviewer_times_out(gateway_factory: Any, oidc: Any,
                                              echo_upstream: Any, test_ca: Any) -> None:
    cfg = {"identity": {"issuers": [oidc.config()]}, "approvals": {"timeout_seconds": 1},
           "targets": [http_target("echo", echo_upstream, test_ca)]}
    gw = gateway_factory(cfg, {"p.yaml": POLICY}, env={"UPSTREAM_TOKEN": UPSTREAM_TOKEN})
    token = oidc.token(groups=["agents"])
    before = len(echo_upstream.requests)
    code, body = curl(gw, f"https://localhost:{echo_upstream.port}/v1/users/7", token,
                      "-X", "DELETE")
    assert code == 403 and body["error"] == "approval_timeout" and body["approval_id"]
    assert len(echo_upstream.requests) == before


def test_unknown_target_refused_before_connecting(gw: Any, oidc: Any) -> None:
    token = oidc.token(groups=["agents"])
    out = subprocess.run(["curl", "-sS", "--max-time", "20", "--proxy", gw.proxy_with_token(token),
                          "-w", "%{http_connect}", "-o", "/dev/null",
                          "https://localhost:1/v1/users"], capture_output=True, text=True,
                         timeout=30)
    assert out.stdout.strip() == "403"
    with client(gw, token) as c, pytest.raises(httpx.ProxyError) as exc:
        c.get("https://127.0.0.2:9/")
    assert "403" in str(exc.value)
    code, body = curl(gw, "http://localhost:1/plain", token)
    assert code == 403 and body["error"] == "unknown_target"


def test_upstream_failure_is_502_json(gateway_factory: Any, oidc: Any, test_ca: Any) -> None:
    from tests.conftest import free_port

    dead = free_port()  # nothing listens here
    cfg = {"identity": {"issuers": [oidc.config()]},
           "targets": [{"name": "dead", "protocol": "http", "hosts": [f"localhost:{dead}"]}]}
    gw = gateway_factory(cfg, {"p.yaml": "rules:\n  - {id: all, effect: allow, when: {}}\n"})
    token = oidc.token()
    code, body = curl(gw, f"https://localhost:{dead}/x", token, "--http1.1")
    assert code == 502 and body["error"] == "upstream_failure", body
    # HTTP/2 inside the tunnel: the same JSON body, labelled as JSON
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "20", "--proxy", gw.proxy_with_token(token), "--cacert",
         str(gw.ca), "--http2", "-D", "-", f"https://localhost:{dead}/x"],
        capture_output=True, text=True, timeout=30)
    head, _, payload = out.stdout.rstrip("\n").rpartition("\n\n")  # after the CONNECT answer
    assert "HTTP/2 502" in head, out.stdout + out.stderr
    assert "content-type: application/json" in head.lower(), head
    assert json.loads(payload)["error"] == "upstream_failure"
    lines = [json.loads(x) for x in gw.audit_text().splitlines()]
    assert any(x["type"] == "outcome" and "error" in x["outcome"] for x in lines)


def test_audit_verify_command(gw: Any, oidc: Any, echo_upstream: Any) -> None:
    token = oidc.token(groups=["agents"])
    curl(gw, f"https://localhost:{echo_upstream.port}/v1/users/1", token)
    res = subprocess.run([*_cli(), "audit", "verify", str(gw.audit_path)], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "OK" in res.stdout
    res = subprocess.run([*_cli(), "audit", "show", "--file", str(gw.audit_path)],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and "read-users" in res.stdout


def _cli() -> list[str]:
    import sys

    return [sys.executable, "-m", "addons.cli"]


def test_recordings_are_readable_and_hold_no_secrets(gw: Any, oidc: Any,
                                                     echo_upstream: Any) -> None:
    from mitmproxy import io

    token = oidc.token(groups=["agents"])
    url = f"https://localhost:{echo_upstream.port}/v1/users/9"
    code, _ = curl(gw, url, token, "-X", "POST", "-d", "card=4111111111111111",
                   "-H", f"Authorization: Bearer {token}")
    assert code == 200
    curl(gw, f"https://localhost:{echo_upstream.port}/v1/admin/x", token)
    rec_dir = gw.state_dir / "recordings"
    files = list(rec_dir.glob("*.mitm"))
    assert files
    flows = []
    with files[0].open("rb") as fh:
        flows = list(io.FlowReader(fh).stream())
    paths = [f.request.path for f in flows]
    assert "/v1/users/9" in paths and "/v1/admin/x" in paths
    raw = b"".join(p.read_bytes() for p in files)
    assert token.encode() not in raw
    assert UPSTREAM_TOKEN.encode() not in raw
