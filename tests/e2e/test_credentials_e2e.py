"""Injected credentials and per-target upstream TLS (SPEC §2, §3), end to end: echoing upstreams
show exactly which headers arrived; the agent's own credentials never do."""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from tests.fixtures.authcases import self_signed
from tests.fixtures.gateway import Gateway
from tests.fixtures.oidc import OIDCIssuer
from tests.fixtures.upstream import EchoServer

pytestmark = pytest.mark.e2e

POLICY = """
rules:
  - id: agents-may-call
    effect: allow
    reason: test agents may call anything
    when: {groups: [agents], http: {methods: [GET, POST], paths: ["/**"]}}
"""

SECRETS = {
    "CRED_BEARER": "bearer-from-env-7c1e",
    "bearer.token": "bearer-from-file-2b9d",
    "CRED_BASIC": "basic-pw-from-env-a41f",
    "basic.pw": "basic-pw-from-file-93e0",
    "CRED_HEADER": "header-from-env-5d72",
    "header.value": "header-from-file-0fa8",
}

AGENT_HEADERS = {
    "Authorization": "Basic YWdlbnQ6YWdlbnQtcGFzc3dvcmQ=",
    "Impersonate-User": "admin",
    "Impersonate-Group": "system:masters",
    "Impersonate-Uid": "0",
    "Impersonate-Extra-Scopes": "everything",
    "X-Api-Key": "agent-chosen-key",
}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, test_ca: Any, oidc: OIDCIssuer
        ) -> Iterator[SimpleNamespace]:
    d = tmp_path_factory.mktemp("creds")
    for name, value in SECRETS.items():
        if "." in name:
            (d / name).write_text(value + "\n")
    cert, key = test_ca.issue(d, ["localhost", "127.0.0.1"])
    ss_cert, ss_key = self_signed(d / "ss", ["localhost", "127.0.0.1"])
    ups = {n: EchoServer(cert, key) for n in ("bearer", "basic", "header", "none", "tls")}
    ups["self"] = EchoServer(ss_cert, ss_key)
    wrong_cert, wrong_key = test_ca.issue(d, ["wrong.example"], stem="wrong")
    ups["wrongname"] = EchoServer(wrong_cert, wrong_key)
    ca = {"ca_file": str(test_ca.cert_path)}

    def tgt(name: str, host: str, up: str, creds: dict[str, Any], tls: Any = ca) -> dict:
        t = {"name": name, "protocol": "http", "hosts": [f"{host}:{ups[up].port}"],
             "credentials": creds}
        if tls is not None:
            t["tls"] = tls
        return t

    targets = [
        tgt("bearer-env", "localhost", "bearer", {"type": "bearer", "token_env": "CRED_BEARER"}),
        tgt("bearer-file", "127.0.0.1", "bearer",
            {"type": "bearer", "token_file": str(d / "bearer.token")}),
        tgt("basic-env", "localhost", "basic",
            {"type": "basic", "username": "svc-env", "password_env": "CRED_BASIC"}),
        tgt("basic-file", "127.0.0.1", "basic",
            {"type": "basic", "username": "svc-file", "password_file": str(d / "basic.pw")}),
        tgt("header-env", "localhost", "header",
            {"type": "header", "header": "X-Api-Key", "value_env": "CRED_HEADER"}),
        tgt("header-file", "127.0.0.1", "header",
            {"type": "header", "header": "X-Api-Key", "value_file": str(d / "header.value")}),
        tgt("none", "localhost", "none", {"type": "none"}),
        # Per-target TLS: one upstream, two names, two trust settings.
        tgt("tls-ca", "localhost", "tls", {"type": "none"}),
        tgt("tls-default-trust", "127.0.0.1", "tls", {"type": "none"}, tls=None),
        # A self-signed upstream: accepted only where verification is off.
        tgt("tls-no-verify", "localhost", "self", {"type": "none"}, tls={"verify": False}),
        tgt("tls-self-signed-verified", "127.0.0.1", "self", {"type": "none"}),
        # Trusted CA, but the certificate names another host.
        tgt("tls-wrong-name", "localhost", "wrongname", {"type": "none"}),
    ]
    secret_env = {k: v for k, v in SECRETS.items() if "." not in k}
    gw = Gateway(d / "gw", {"identity": {"issuers": [oidc.config()]}, "targets": targets},
                 env=secret_env, policies={"allow.yaml": POLICY}).start()
    token = oidc.token(sub="cred-agent", groups=["agents"])
    proxy = httpx.Proxy(gw.proxy, headers={"Proxy-Authorization": f"Bearer {token}"})
    client = httpx.Client(proxy=proxy, timeout=20,
                          verify=ssl.create_default_context(cafile=str(gw.ca)))
    try:
        yield SimpleNamespace(gw=gw, ups=ups, token=token, client=client)
    finally:
        client.close()
        gw.stop()
        for u in ups.values():
            u.close()


def call(env: SimpleNamespace, host: str, up: str, path: str,
         headers: dict[str, str] | None = None) -> httpx.Response:
    return env.client.get(f"https://{host}:{env.ups[up].port}{path}", headers=headers)


def received(env: SimpleNamespace, up: str, path: str) -> dict[str, str]:
    [req] = [r for r in env.ups[up].requests if r["path"] == path]
    return {k.lower(): v for k, v in req["headers"].items()}


def basic_of(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize("name, host, up, header, expected", [
    ("bearer-env", "localhost", "bearer", "authorization", "Bearer bearer-from-env-7c1e"),
    ("bearer-file", "127.0.0.1", "bearer", "authorization", "Bearer bearer-from-file-2b9d"),
    ("basic-env", "localhost", "basic", "authorization",
     basic_of("svc-env", "basic-pw-from-env-a41f")),
    ("basic-file", "127.0.0.1", "basic", "authorization",
     basic_of("svc-file", "basic-pw-from-file-93e0")),
    ("header-env", "localhost", "header", "x-api-key", "header-from-env-5d72"),
    ("header-file", "127.0.0.1", "header", "x-api-key", "header-from-file-0fa8"),
], ids=["bearer-env", "bearer-file", "basic-env", "basic-file", "header-env", "header-file"])
def test_credential_injected_and_agent_headers_stripped(
        env: SimpleNamespace, name: str, host: str, up: str, header: str, expected: str) -> None:
    path = f"/inject/{name}"
    # The agent also repeats its token in Proxy-Authorization inside the tunnel.
    r = call(env, host, up, path, {**AGENT_HEADERS,
                                   "Proxy-Authorization": f"Bearer {env.token}"})
    assert r.status_code == 200, r.text
    got = received(env, up, path)
    assert got[header] == expected
    assert "proxy-authorization" not in got
    assert not [k for k in got if k.startswith("impersonate-")]
    if header != "authorization":
        assert "authorization" not in got  # the agent's Authorization is not passed on
    else:
        assert "x-api-key" in got and got["x-api-key"] == "agent-chosen-key"
    assert env.token not in json.dumps(env.ups[up].requests[-1])


def test_type_none_injects_nothing_and_still_strips(env: SimpleNamespace) -> None:
    r = call(env, "localhost", "none", "/inject/none", AGENT_HEADERS)
    assert r.status_code == 200, r.text
    got = received(env, "none", "/inject/none")
    assert "authorization" not in got and "proxy-authorization" not in got
    assert not [k for k in got if k.startswith("impersonate-")]


def test_tls_ca_file_applies_to_its_target(env: SimpleNamespace) -> None:
    r = call(env, "localhost", "tls", "/tls/ca-file")
    assert r.status_code == 200, r.text
    assert received(env, "tls", "/tls/ca-file")


def test_tls_default_trust_store_refuses_private_ca(env: SimpleNamespace) -> None:
    # Same upstream as above under another name, without ca_file: the test CA is not trusted.
    r = call(env, "127.0.0.1", "tls", "/tls/default-trust")
    assert r.status_code == 502, r.text
    assert r.json()["error"] == "upstream_failure"
    assert "certificate verify failed" in r.json()["reason"].lower()
    assert not [x for x in env.ups["tls"].requests if x["path"] == "/tls/default-trust"]


def test_tls_verify_false_accepts_self_signed(env: SimpleNamespace) -> None:
    r = call(env, "localhost", "self", "/tls/no-verify")
    assert r.status_code == 200, r.text
    assert received(env, "self", "/tls/no-verify")


def test_tls_self_signed_refused_where_verification_is_on(env: SimpleNamespace) -> None:
    r = call(env, "127.0.0.1", "self", "/tls/verified")
    assert r.status_code == 502, r.text
    assert "certificate verify failed" in r.json()["reason"].lower()
    assert not [x for x in env.ups["self"].requests if x["path"] == "/tls/verified"]


def test_tls_hostname_is_verified(env: SimpleNamespace) -> None:
    r = call(env, "localhost", "wrongname", "/tls/wrong-name")
    assert r.status_code == 502, r.text
    assert not env.ups["wrongname"].requests


def test_tls_settings_do_not_leak_between_targets(env: SimpleNamespace) -> None:
    """Interleave the four TLS targets: each keeps its own outcome, whatever ran before."""
    expected = [("127.0.0.1", "tls", 502), ("localhost", "self", 200),
                ("localhost", "tls", 200), ("127.0.0.1", "self", 502)] * 2
    for i, (host, up, status) in enumerate(expected):
        assert call(env, host, up, f"/tls/mix/{i}").status_code == status


def test_zz_no_credential_or_token_in_audit_or_stdout(env: SimpleNamespace) -> None:
    for host, up in (("localhost", "bearer"), ("127.0.0.1", "bearer"), ("localhost", "basic"),
                     ("127.0.0.1", "basic"), ("localhost", "header"), ("127.0.0.1", "header")):
        assert call(env, host, up, "/leak-check", AGENT_HEADERS).status_code == 200
    audit, stdout = env.gw.audit_text(), env.gw.stdout
    assert audit.count('"decision":"allow"') >= 6
    for secret in [*SECRETS.values(), env.token]:
        assert secret not in audit
        assert secret not in stdout
    for user, pw in (("svc-env", SECRETS["CRED_BASIC"]), ("svc-file", SECRETS["basic.pw"])):
        encoded = basic_of(user, pw).split(" ", 1)[1]
        assert encoded not in audit and encoded not in stdout
