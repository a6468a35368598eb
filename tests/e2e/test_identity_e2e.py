"""Identity end to end (SPEC §3, §5): one real gateway process, hostile tokens refused at every
entry point with the right status and JSON reason, every token source accepted, a slow issuer
holding up nobody else, expiry inside a kept-alive tunnel, and the development issuer."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import jwt
import pytest

from tests.conftest import UPSTREAM_TOKEN
from tests.fixtures.authcases import (
    BAD_TOKENS,
    BadToken,
    Minter,
    SlowOIDCIssuer,
    basic,
    other_issuer,
    parse_proxy,
    raw_request,
)
from tests.fixtures.gateway import ROOT, Gateway, free_port
from tests.fixtures.oidc import OIDCIssuer
from tests.fixtures.upstream import EchoServer

pytestmark = pytest.mark.e2e

POLICY = """
rules:
  - id: agents-may-call
    effect: allow
    reason: test agents may call anything
    when: {groups: [agents, a], http: {methods: [GET, POST], paths: ["/**"]}}
"""

USED_TOKENS: list[str] = []  # every token sent in this module, for the leak check at the end


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, echo_upstream: EchoServer,
        test_ca: Any) -> Iterator[SimpleNamespace]:
    trusted, attacker, slow, plain = OIDCIssuer(), other_issuer(), SlowOIDCIssuer(), EchoServer()
    by_uri = SlowOIDCIssuer()  # keys from an explicit jwks_uri (no discovery)
    by_file = Minter("https://file-issuer.example")  # keys from a jwks_file (no network)
    jwks_file = tmp_path_factory.mktemp("jwks") / "jwks.json"
    jwks_file.write_text(json.dumps(by_file.jwks()))
    dead_port = free_port()  # nothing listens here: an unreachable key set
    rev_port = free_port()
    tls = {"verify": True, "ca_file": str(test_ca.cert_path)}
    creds = {"type": "bearer", "token_env": "UPSTREAM_TOKEN"}
    cfg = {
        "identity": {"issuers": [
            {**trusted.config(), "leeway_seconds": 0},
            slow.config(),
            {"issuer": "http://127.0.0.1:1/dead", "audience": "portcullis",
             "jwks_uri": f"http://127.0.0.1:{dead_port}/jwks"},
            {**by_uri.config(), "jwks_uri": by_uri.issuer + "/jwks"},
            {"issuer": by_file.issuer, "audience": by_file.AUDIENCE, "jwks_file": str(jwks_file)},
        ]},
        "targets": [
            {"name": "echo", "protocol": "http", "hosts": [f"localhost:{echo_upstream.port}"],
             "credentials": creds, "tls": tls},
            {"name": "plain", "protocol": "http", "hosts": [f"127.0.0.1:{plain.port}"],
             "credentials": creds},
            {"name": "rev", "protocol": "http", "listen": f"127.0.0.1:{rev_port}",
             "upstream": f"https://127.0.0.1:{echo_upstream.port}", "credentials": creds,
             "tls": tls},
        ],
    }
    gw = Gateway(tmp_path_factory.mktemp("identity-gw"), cfg, env={"UPSTREAM_TOKEN": UPSTREAM_TOKEN},
                 policies={"allow.yaml": POLICY}).start()
    ns = SimpleNamespace(gw=gw, trusted=trusted, attacker=attacker, slow=slow, plain=plain,
                         by_uri=by_uri, by_file=by_file, echo=echo_upstream, rev_port=rev_port,
                         proxy_addr=parse_proxy(gw.proxy),
                         ssl=ssl.create_default_context(cafile=str(gw.ca)))
    try:
        yield ns
    finally:
        gw.stop()
        closers = [threading.Thread(target=s.close)
                   for s in (trusted, attacker, slow, plain, by_uri)]
        for t in closers:
            t.start()
        for t in closers:
            t.join()


def remember(token: str) -> str:
    if token:
        USED_TOKENS.append(token)
    return token


def upstream_paths(env: SimpleNamespace) -> list[str]:
    return [r["path"] for r in env.echo.requests + env.plain.requests]


def assert_refusal(status: int, headers: dict[str, str], body: bytes, expect: int,
                   reason: str) -> None:
    assert status == expect, body
    data = json.loads(body)
    assert data["error"] == "unauthenticated"
    assert reason in data["reason"], data
    assert data["request_id"]
    challenge = "proxy-authenticate" if expect == 407 else "www-authenticate"
    assert headers[challenge].lower().startswith("bearer")


# --- refusals, each case at each entry point ------------------------------------------------


def _connect(env: SimpleNamespace, auth: str | None) -> tuple[int, dict[str, str], bytes]:
    hp = f"localhost:{env.echo.port}"
    head = f"CONNECT {hp} HTTP/1.1\r\nHost: {hp}\r\n"
    head += f"Proxy-Authorization: {auth}\r\n" if auth is not None else ""
    return raw_request(env.proxy_addr, head + "\r\n")


def _absolute(env: SimpleNamespace, auth: str | None, path: str
              ) -> tuple[int, dict[str, str], bytes]:
    hp = f"127.0.0.1:{env.plain.port}"
    head = f"GET http://{hp}{path} HTTP/1.1\r\nHost: {hp}\r\nConnection: close\r\n"
    head += f"Proxy-Authorization: {auth}\r\n" if auth is not None else ""
    return raw_request(env.proxy_addr, head + "\r\n")


def _httpx(env: SimpleNamespace, url: str, token: str, proxy: Any = None
           ) -> tuple[int, dict[str, str], bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(proxy=proxy, verify=env.ssl, timeout=20) as c:
        r = c.get(url, headers=headers)
    return r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content


@pytest.mark.parametrize("case", [c for c in BAD_TOKENS if c.name != "no_token"],
                         ids=lambda c: c.name)
@pytest.mark.parametrize("scheme", ["bearer", "basic"])
def test_refused_407_at_connect(env: SimpleNamespace, case: BadToken, scheme: str) -> None:
    token = remember(case.make(env.trusted, env.attacker))
    auth = f"Bearer {token}" if scheme == "bearer" else basic("agent", token)
    status, headers, body = _connect(env, auth)
    assert_refusal(status, headers, body, 407, case.reason)
    assert env.attacker.jwks_hits == 0  # jku: the attacker's key set is never fetched


@pytest.mark.parametrize("case", BAD_TOKENS, ids=lambda c: c.name)
def test_refused_407_absolute_form(env: SimpleNamespace, case: BadToken) -> None:
    token = remember(case.make(env.trusted, env.attacker))
    path = f"/absolute/{case.name}"
    status, headers, body = _absolute(env, f"Bearer {token}" if token else None, path)
    assert_refusal(status, headers, body, 407, case.reason)
    assert path not in upstream_paths(env)


@pytest.mark.parametrize("case", BAD_TOKENS, ids=lambda c: c.name)
def test_refused_401_inside_tunnel(env: SimpleNamespace, case: BadToken) -> None:
    token = remember(case.make(env.trusted, env.attacker))
    path = f"/tunnel/{case.name}"
    # No Proxy-Authorization at CONNECT: the tunnel opens, the request inside is refused.
    status, headers, body = _httpx(env, f"https://localhost:{env.echo.port}{path}", token,
                                   proxy=env.gw.proxy)
    assert_refusal(status, headers, body, 401, case.reason)
    assert path not in upstream_paths(env)


@pytest.mark.parametrize("case", BAD_TOKENS, ids=lambda c: c.name)
def test_refused_401_on_reverse_listener(env: SimpleNamespace, case: BadToken) -> None:
    token = remember(case.make(env.trusted, env.attacker))
    path = f"/reverse/{case.name}"
    status, headers, body = _httpx(env, f"https://localhost:{env.rev_port}{path}", token)
    assert_refusal(status, headers, body, 401, case.reason)
    assert path not in upstream_paths(env)


def test_connect_without_token_opens_tunnel_but_nothing_passes(env: SimpleNamespace) -> None:
    status, _, _ = _connect(env, None)
    assert status == 200  # the token may still come inside the tunnel (SPEC §3)


def test_refusals_are_audited(env: SimpleNamespace) -> None:
    token = remember(env.trusted.token(aud="someone-else"))
    _connect(env, f"Bearer {token}")
    lines = [json.loads(x) for x in env.gw.audit_text().splitlines()]
    denied = [x for x in lines if x.get("rules") == ["unauthenticated"]]
    assert denied and all(x["decision"] == "deny" and x["identity"] is None for x in denied)
    assert any("audience" in x["reason"] for x in denied)


# --- accepted token sources ------------------------------------------------------------------


def _seen_by_upstream(env: SimpleNamespace, path: str) -> dict[str, str]:
    [req] = [r for r in env.echo.requests + env.plain.requests if r["path"] == path]
    return {k.lower(): v for k, v in req["headers"].items()}


def _audited_sub(env: SimpleNamespace, path: str) -> str:
    for line in env.gw.audit_text().splitlines():
        rec = json.loads(line)
        if rec.get("type") == "decision" and (rec["operation"].get("http") or {}).get(
                "path") == path:
            return rec["identity"]["sub"]
    raise AssertionError(f"no decision for {path}")


def test_accepts_proxy_authorization_bearer(env: SimpleNamespace) -> None:
    token = remember(env.trusted.token(sub="bearer-agent"))
    proxy = httpx.Proxy(env.gw.proxy, headers={"Proxy-Authorization": f"Bearer {token}"})
    status, _, body = _httpx(env, f"https://localhost:{env.echo.port}/ok/bearer", "", proxy)
    assert status == 200, body
    assert _seen_by_upstream(env, "/ok/bearer")["authorization"] == f"Bearer {UPSTREAM_TOKEN}"
    assert _audited_sub(env, "/ok/bearer") == "bearer-agent"


def test_accepts_basic_with_jwt_as_password(env: SimpleNamespace) -> None:
    token = remember(env.trusted.token(sub="basic-agent"))
    status, _, body = _httpx(env, f"https://localhost:{env.echo.port}/ok/basic", "",
                             env.gw.proxy_with_token(token))
    assert status == 200, body
    assert _audited_sub(env, "/ok/basic") == "basic-agent"


def test_accepts_basic_via_curl_https_proxy_env(env: SimpleNamespace) -> None:
    token = remember(env.trusted.token(sub="curl-agent"))
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "20", "-o", "/dev/null", "-w", "%{http_code}",
         f"https://localhost:{env.echo.port}/ok/curl"],
        env={"PATH": "/usr/bin:/bin", "HTTPS_PROXY": env.gw.proxy_with_token(token),
             "SSL_CERT_FILE": str(env.gw.ca), "CURL_CA_BUNDLE": str(env.gw.ca)},
        capture_output=True, text=True, timeout=30)
    assert out.stdout == "200", out.stderr
    assert _audited_sub(env, "/ok/curl") == "curl-agent"


def test_accepts_authorization_bearer_inside_tunnel(env: SimpleNamespace) -> None:
    token = remember(env.trusted.token(sub="tunnel-agent"))
    status, _, body = _httpx(env, f"https://localhost:{env.echo.port}/ok/tunnel", token,
                             env.gw.proxy)
    assert status == 200, body
    # the agent's Authorization was used for identity, then replaced by the target's own
    assert _seen_by_upstream(env, "/ok/tunnel")["authorization"] == f"Bearer {UPSTREAM_TOKEN}"
    assert _audited_sub(env, "/ok/tunnel") == "tunnel-agent"


def test_accepts_authorization_bearer_on_reverse_listener(env: SimpleNamespace) -> None:
    token = remember(env.trusted.token(sub="reverse-agent"))
    status, _, body = _httpx(env, f"https://localhost:{env.rev_port}/ok/reverse", token)
    assert status == 200, body
    assert _seen_by_upstream(env, "/ok/reverse")["authorization"] == f"Bearer {UPSTREAM_TOKEN}"
    assert _audited_sub(env, "/ok/reverse") == "reverse-agent"


def test_accepts_proxy_authorization_on_absolute_form(env: SimpleNamespace) -> None:
    token = remember(env.trusted.token(sub="plain-agent"))
    status, _, body = _absolute(env, f"Bearer {token}", "/ok/absolute")
    assert status == 200, body
    seen = _seen_by_upstream(env, "/ok/absolute")
    assert "proxy-authorization" not in seen
    assert seen["authorization"] == f"Bearer {UPSTREAM_TOKEN}"


# --- keys: discovery, jwks_uri, jwks_file; an unreachable or slow issuer ---------------------


def test_keys_from_discovery_jwks_uri_and_jwks_file(env: SimpleNamespace) -> None:
    for issuer in (env.trusted, env.by_uri, env.by_file):
        token = remember(issuer.token(sub=f"keys-{issuer.issuer}"))
        status, _, body = _connect(env, f"Bearer {token}")
        assert status == 200, body
    assert env.trusted.jwks_hits >= 1 and env.by_uri.jwks_hits == 1
    # jwks_uri is used as given: the discovery document is never asked for
    assert env.by_uri.discovery_hits == 0


def test_unreachable_jwks_refuses_that_issuers_tokens(env: SimpleNamespace) -> None:
    token = remember(jwt.encode(
        {"iss": "http://127.0.0.1:1/dead", "aud": "portcullis", "sub": "x",
         "exp": int(time.time()) + 60}, env.attacker.key, algorithm="RS256",
        headers={"kid": "k"}))
    status, headers, body = _connect(env, f"Bearer {token}")
    assert_refusal(status, headers, body, 407, "cannot fetch signing keys")


def test_slow_jwks_does_not_block_other_agents(env: SimpleNamespace) -> None:
    fast_token = remember(env.trusted.token(sub="fast-agent"))
    assert _connect(env, f"Bearer {fast_token}")[0] == 200  # trusted keys are cached
    env.slow.delay = 3.0
    slow_token = remember(env.slow.token(sub="slow-agent", headers={"kid": "rotated-away"}))
    result: dict[str, Any] = {}

    def slow_agent() -> None:
        started = time.monotonic()
        result["response"] = _connect(env, f"Bearer {slow_token}")
        result["took"] = time.monotonic() - started

    thread = threading.Thread(target=slow_agent)
    thread.start()
    try:
        assert env.slow.jwks_asked.wait(10), "the gateway never asked the slow issuer"
        for i in range(5):
            started = time.monotonic()
            path = f"/ok/while-slow/{i}"
            status, _, body = _httpx(env, f"https://localhost:{env.echo.port}{path}", "",
                                     env.gw.proxy_with_token(fast_token))
            assert status == 200, body
            assert time.monotonic() - started < 1.5
        assert thread.is_alive(), "the slow agent should still be waiting for its keys"
    finally:
        thread.join(15)
    status, headers, body = result["response"]
    assert_refusal(status, headers, body, 407, "unknown signing key")
    assert result["took"] >= 2.5


# --- continuous verification -----------------------------------------------------------------


def test_token_expiring_in_open_tunnel_gets_401(env: SimpleNamespace) -> None:
    token = remember(env.trusted.token(sub="short-lived", ttl=3))
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    proxy = httpx.Proxy(env.gw.proxy, headers={"Proxy-Authorization": f"Bearer {token}"})
    base = f"https://localhost:{env.echo.port}"
    with httpx.Client(proxy=proxy, verify=env.ssl, timeout=20) as c:
        first = c.get(f"{base}/cv/first")
        assert first.status_code == 200, first.text
        time.sleep(max(0.0, exp - time.time()) + 0.3)
        second = c.get(f"{base}/cv/second")
    assert second.status_code == 401, second.text
    assert second.json()["error"] == "unauthenticated"
    assert second.json()["reason"] == "token expired"
    assert "/cv/second" not in upstream_paths(env)
    # Both requests came through the same client connection (one tunnel).
    clients = {}
    for line in env.gw.audit_text().splitlines():
        rec = json.loads(line)
        summary = (rec.get("operation") or {}).get("summary", "")
        for path in ("/cv/first", "/cv/second"):
            if rec.get("type") == "decision" and summary.endswith(path):
                clients[path] = (rec["client"], rec["decision"])
    assert clients["/cv/first"][1] == "allow" and clients["/cv/second"][1] == "deny"
    assert clients["/cv/first"][0] == clients["/cv/second"][0]


# --- development issuer ----------------------------------------------------------------------


def _mint(config: Path) -> str:
    out = subprocess.run([sys.executable, "-m", "addons.cli", "token", "--sub", "x",
                          "--groups", "a,b", "--ttl", "15m", "--config", str(config)],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert token.count(".") == 2 and "\n" not in token
    return remember(token)


def test_dev_issuer_token_trusted_only_with_dev_issuer(
        env: SimpleNamespace, tmp_path: Path, echo_upstream: EchoServer, test_ca: Any) -> None:
    cfg = {"identity": {"dev_issuer": True},
           "targets": [{"name": "echo", "protocol": "http",
                        "hosts": [f"localhost:{echo_upstream.port}"],
                        "tls": {"ca_file": str(test_ca.cert_path)}}]}
    dev_gw = Gateway(tmp_path / "dev", cfg, policies={"allow.yaml": POLICY}).start()
    try:
        token = _mint(dev_gw.config_path)
        claims = jwt.decode(token, options={"verify_signature": False})
        assert claims["sub"] == "x" and claims["groups"] == ["a", "b"]
        assert 899 <= claims["exp"] - claims["iat"] <= 900
        with httpx.Client(proxy=dev_gw.proxy_with_token(token), timeout=20,
                          verify=ssl.create_default_context(cafile=str(dev_gw.ca))) as c:
            r = c.get(f"https://localhost:{echo_upstream.port}/dev/ok")
        assert r.status_code == 200, r.text
        [rec] = [x for x in map(json.loads, dev_gw.audit_text().splitlines())
                 if x.get("operation", {}).get("http", {}).get("path") == "/dev/ok"]
        assert rec["decision"] == "allow" and rec["identity"] == {"sub": "x", "iss": "urn:portcullis:dev-issuer",
                                   "groups": ["a", "b"]}
    finally:
        dev_gw.stop()
    # The same command against a gateway with dev_issuer: false mints a token it refuses.
    refused = _mint(env.gw.config_path)
    status, headers, body = _connect(env, f"Bearer {refused}")
    assert_refusal(status, headers, body, 407, "untrusted issuer")


# --- nothing leaks ---------------------------------------------------------------------------


def test_zz_no_token_in_audit_or_stdout(env: SimpleNamespace) -> None:
    # Runs last: checks every token this module sent, plus these three.
    good, bad = remember(env.trusted.token(sub="leak-check")), remember(
        env.trusted.token(key=env.attacker.key))
    assert _connect(env, f"Bearer {good}")[0] == 200
    assert _connect(env, basic("agent", bad))[0] == 407
    assert _httpx(env, f"https://localhost:{env.echo.port}/leak", good, env.gw.proxy)[0] == 200
    audit, stdout = env.gw.audit_text(), env.gw.stdout
    assert audit and stdout
    for token in USED_TOKENS:
        sig = token.rsplit(".", 1)[-1]
        for text in (audit, stdout):
            assert token not in text
            assert len(sig) < 16 or sig not in text
    assert UPSTREAM_TOKEN not in audit and UPSTREAM_TOKEN not in stdout
