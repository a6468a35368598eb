"""Masking through the real gateway (issue 4): leak tests for every detector and strategy,
encodings, refusals, and Kubernetes Secrets / watch / log?follow streams.

A small HTTPS upstream (below) serves each sensitive value in JSON, NDJSON, text, compressed
bodies and chunked streams. Every test greps what the agent received, the audit log, the
recordings and the gateway's stdout for the original value.
"""

from __future__ import annotations

import base64
import gzip
import json
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import brotli
import httpx
import pytest
import zstandard

from tests.fixtures.gateway import Gateway

pytestmark = pytest.mark.e2e

SECRETS = {
    "credit_card": "4111 1111 1111 1111", "iban": "DE89370400440532013000",
    "ssn": "123-45-6789", "email": "alice.leak@example.com", "phone": "+1 415 555 2671",
    "aws_access_key": "AKIAIOSFODNN7EXAMPLE",
    "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJsZWFrIn0.bGVha3NpZ25hdHVyZQ",
    "private_key": "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEAleak\n"
                   "-----END RSA PRIVATE KEY-----",
    "ip_address": "10.20.30.40",
}
# what identifies each value in any output (the key body is the part that must not leak)
NEEDLES = {**{k: v for k, v in SECRETS.items()}, "private_key": "MIIEpAIBAAKCAQEAleak",
           "card_digits": "4111111111111111"}
SECRET_B64 = base64.b64encode(b"s3cr3t-db-passw0rd").decode()
STRATEGIES = ("redact", "partial", "hash", "null")
# A streaming upstream sends its first line, then waits for this before sending the rest: the
# test only sets it after it received that first line, which proves the gateway streams.
RELEASE = threading.Event()
WAIT = -1.0

POLICY = """
rules:
  - id: api-read
    effect: allow
    reason: test
    when: {targets: [api], http: {methods: [GET, POST], paths: ["/**"]}}
  - id: k8s-read
    effect: allow
    reason: test
    when: {targets: [k8s], kubernetes: {verbs: [get, list, watch]}}
  - id: k8s-logs
    effect: allow
    reason: test
    when: {targets: [k8s], kubernetes: {verbs: [get], subresources: [log]}}
masks:
  - id: paths-first
    when: {targets: [api], http: {paths: ["/paths/**"]}}
    json_paths: ["$.card", "$..ssn"]
    strategy: redact
""" + "".join(f"""
  - id: all-{s}
    when: {{targets: [api], http: {{paths: ["/{s}/**", "/paths/**"]}}}}
    detectors: [credit_card, iban, ssn, email, phone, aws_access_key, jwt, private_key, ip_address]
    strategy: {s}
""" for s in STRATEGIES) + """
  - id: k8s-pii
    when: {targets: [k8s]}
    detectors: [email, ip_address, private_key]
    strategy: redact
"""


# --- the upstream -----------------------------------------------------------------------------

Route = Callable[[str], tuple[int, dict[str, str], "bytes | list[tuple[float, bytes]]"]]


def _json(obj: Any, **headers: str) -> tuple[int, dict[str, str], bytes]:
    return 200, {"Content-Type": "application/json", **headers}, json.dumps(obj).encode()


def _doc(value: str) -> dict[str, Any]:
    return {"value": value, "note": f"see {value} here", "list": ["x", value],
            "nested": {"deep": {"v": value}}, "ok": "nothing to hide"}


def _routes(path: str) -> tuple[int, dict[str, str], bytes | list[tuple[float, bytes]]]:
    parts = path.strip("/").split("/")
    if parts[0] in STRATEGIES and len(parts) == 2 and parts[1] in SECRETS:
        return _json(_doc(SECRETS[parts[1]]))
    if path == "/paths/html":
        return 404, {"Content-Type": "text/html"}, b"<h1>not found</h1> " + SECRETS[
            "email"].encode()
    if parts[0] == "paths":
        return _json({"card": "no detector needed 42", "ssn": "n/a", "users": [
            {"ssn": "x"}], "email": SECRETS["email"]})
    if parts[0] == "redact" and parts[1] == "enc":
        raw = json.dumps(_doc(SECRETS["email"])).encode()
        enc = parts[2]
        body = {"gzip": gzip.compress, "deflate": zlib.compress, "br": brotli.compress,
                "zstd": zstandard.ZstdCompressor().compress,
                "bogus": lambda b: b"\x00garbage"}[enc](raw)
        return 200, {"Content-Type": "application/json", "Content-Encoding": enc}, body
    if path == "/redact/ndjson":
        lines = [json.dumps({"i": i, "mail": SECRETS["email"]}) for i in range(3)]
        return 200, {"Content-Type": "application/x-ndjson"}, "\n".join(lines).encode() + b"\n"
    if path == "/redact/text":
        return 200, {"Content-Type": "text/plain; charset=utf-8"}, (
            "ip " + SECRETS["ip_address"] + "\n" + SECRETS["private_key"] + "\n").encode()
    if path == "/redact/problem":
        return 200, {"Content-Type": "application/problem+json"}, json.dumps(
            {"detail": SECRETS["ssn"]}).encode()
    if path == "/redact/binary":
        return 200, {"Content-Type": "application/octet-stream"}, b"\xff\xfe" + SECRETS[
            "email"].encode()
    if path == "/redact/huge":
        return 200, {"Content-Type": "application/json"}, json.dumps(
            {"v": "x" * (17 << 20), "mail": SECRETS["email"]}).encode()
    if path == "/redact/events":
        return 200, {"Content-Type": "text/event-stream"}, [
            (0, f"data: {SECRETS['email']}\n\n".encode()),
            (WAIT, f"data: {SECRETS['ip_address']}\n\n".encode())]
    # --- the Kubernetes look-alike ---
    if path.startswith("/api/v1/namespaces/team-a/secrets"):
        secret = {"kind": "Secret", "apiVersion": "v1", "type": "Opaque",
                  "metadata": {"name": "db", "namespace": "team-a", "annotations": {
                      "kubectl.kubernetes.io/last-applied-configuration": json.dumps(
                          {"kind": "Secret", "data": {"password": SECRET_B64}})}},
                  "data": {"password": SECRET_B64}}
        if path.endswith("/db"):
            return _json(secret)
        if "watch=true" in path:
            events = [{"type": "ADDED", "object": secret},
                      {"type": "MODIFIED", "object": {**secret, "stringData": {
                          "token": "plain-s3cr3t-token"}}}]
            chunks = []
            for i, ev in enumerate(events):
                line = json.dumps(ev).encode() + b"\n"
                # lines split across chunks; the second event only once the first arrived
                chunks += [(WAIT if i else 0, line[:40]), (0.05, line[40:])]
            return 200, {"Content-Type": "application/json"}, chunks
        item = {k: v for k, v in secret.items() if k not in ("kind", "apiVersion")}
        return _json({"kind": "SecretList", "apiVersion": "v1", "items": [item]})
    if path.startswith("/api/v1/namespaces/team-a/pods/web-1/log"):
        lines = [f"boot ok, admin is {SECRETS['email']}\n",
                 SECRETS["private_key"].split("\n")[0] + "\n",
                 SECRETS["private_key"].split("\n")[1] + "\n",
                 SECRETS["private_key"].split("\n")[2] + "\n",
                 f"listening on {SECRETS['ip_address']}\n"]
        return 200, {"Content-Type": "text/plain"}, [(WAIT if i else 0, x.encode())
                                                     for i, x in enumerate(lines)]
    if path.startswith("/api/v1/namespaces/team-a/configmaps"):
        return _json({"kind": "ConfigMap", "data": {"owner": SECRETS["email"],
                                                    "plain": "visible"}})
    return 404, {"Content-Type": "application/json"}, b'{"error":"no route"}'


class Upstream:
    def __init__(self, cert: Path, key: Path) -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - stdlib name
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                status, headers, body = _routes(self.path)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if isinstance(body, bytes):
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for delay, chunk in body:
                    if delay == WAIT:
                        RELEASE.wait(25)
                    else:
                        time.sleep(delay)
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")

            do_POST = do_GET

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Env:
    def __init__(self, gw: Gateway, api: Upstream, k8s: Upstream, token: str) -> None:
        self.gw, self.api, self.k8s, self.token = gw, api, k8s, token

    def client(self) -> httpx.Client:
        return httpx.Client(proxy=self.gw.proxy_with_token(self.token), timeout=30,
                            verify=ssl.create_default_context(cafile=str(self.gw.ca)))

    def get(self, path: str, k8s: bool = False, **kw: Any) -> httpx.Response:
        port = self.k8s.port if k8s else self.api.port
        with self.client() as c:
            return c.get(f"https://localhost:{port}{path}", **kw)

    def written(self) -> str:
        """Everything the gateway wrote: audit log, recordings, stdout."""
        out = [self.gw.audit_text(), self.gw.stdout]
        rec = self.gw.state_dir / "recordings"
        if rec.exists():
            out += [p.read_bytes().decode("latin-1") for p in rec.rglob("*") if p.is_file()]
        return "\n".join(out)

    def assert_nowhere(self, received: str, *values: str) -> None:
        time.sleep(0.3)  # let the outcome line and the recording land
        written = self.written()
        for value in values:
            for form in {value, json.dumps(value)[1:-1]}:
                assert form not in received, f"{value!r} reached the agent"
                assert form not in written, f"{value!r} was written by the gateway"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, oidc: Any, test_ca: Any) -> Iterator[Env]:
    work = tmp_path_factory.mktemp("masking")
    api = Upstream(*test_ca.issue(work, ["localhost", "127.0.0.1"], "api"))
    k8s = Upstream(*test_ca.issue(work, ["localhost", "127.0.0.1"], "k8s"))
    tls = {"verify": True, "ca_file": str(test_ca.cert_path)}
    cfg = {"identity": {"issuers": [oidc.config()]},
           "targets": [
               {"name": "api", "protocol": "http", "hosts": [f"localhost:{api.port}"],
                "credentials": {"type": "none"}, "tls": tls},
               {"name": "k8s", "protocol": "kubernetes", "hosts": [f"localhost:{k8s.port}"],
                "credentials": {"type": "none"}, "tls": tls}]}
    gw = Gateway(work / "gw", cfg, policies={"masks.yaml": POLICY})
    gw.start()
    try:
        yield Env(gw, api, k8s, oidc.token(groups=["agents"]))
    finally:
        gw.stop()
        api.close()
        k8s.close()


# --- leak tests: every detector x every strategy ---------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_detector_and_strategy_never_leaks(env: Env, strategy: str) -> None:
    for name, value in SECRETS.items():
        r = env.get(f"/{strategy}/{name}")
        assert r.status_code == 200, (name, r.text)
        body = r.json()
        assert body["ok"] == "nothing to hide"
        if strategy == "null":
            assert body["value"] is None and body["nested"]["deep"]["v"] is None
        elif strategy == "redact":
            assert body["value"] == f"[MASKED:{name}]"
            assert body["note"] == f"see [MASKED:{name}] here"
        elif strategy == "hash":
            assert body["value"].startswith("hash:") and body["value"] == body["list"][1]
        else:
            assert body["value"].endswith(value[-4:]) and set(body["value"][:-4]) == {"*"}
        env.assert_nowhere(r.text, NEEDLES[name], value)
    env.assert_nowhere("", NEEDLES["card_digits"])
    recordings = [p for p in (env.gw.state_dir / "recordings").rglob("*") if p.is_file()]
    assert recordings, "no recording was written: the grep above proved nothing for them"
    outcomes = [json.loads(x) for x in env.gw.audit_text().splitlines()]
    masked = [x["masked"] for x in outcomes if x.get("type") == "outcome"
              and (x.get("masked") or {}).get("rules") == [f"all-{strategy}"]]
    assert len(masked) >= len(SECRETS) and all(m["count"] == 4 for m in masked[-9:])


def test_json_paths_first_then_detectors(env: Env) -> None:
    r = env.get("/paths/doc")
    body = r.json()
    assert body["card"] == "[MASKED:paths-first]" and body["ssn"] == "[MASKED:paths-first]"
    assert body["users"] == [{"ssn": "[MASKED:paths-first]"}]
    assert body["email"] == "[MASKED:email]"
    env.assert_nowhere(r.text, SECRETS["email"])


def test_json_path_on_a_body_that_is_not_json_is_refused(env: Env) -> None:
    r = env.get("/paths/html")
    assert r.status_code == 502 and r.json()["error"] == "masking_failed"
    env.assert_nowhere(r.text, SECRETS["email"])


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
def test_compressed_bodies_are_decoded_masked_and_reencoded(env: Env, encoding: str) -> None:
    with env.client() as c:
        r = c.get(f"https://localhost:{env.api.port}/redact/enc/{encoding}",
                  headers={"Accept-Encoding": encoding})
    assert r.status_code == 200
    assert r.headers["content-encoding"] == encoding
    assert r.json()["value"] == "[MASKED:email]"  # httpx decoded it, so the length was right
    env.assert_nowhere(r.text, SECRETS["email"])


def test_unmaskable_bodies_are_refused_never_passed(env: Env) -> None:
    for path in ("/redact/enc/bogus", "/redact/binary", "/redact/huge"):
        r = env.get(path)
        assert r.status_code == 502, path
        assert r.json()["error"] == "masking_failed"
        env.assert_nowhere(r.text, SECRETS["email"])


def test_ndjson_text_and_problem_json(env: Env) -> None:
    r = env.get("/redact/ndjson")
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert [x["mail"] for x in lines] == ["[MASKED:email]"] * 3
    r2 = env.get("/redact/text")
    assert r2.text == "ip [MASKED:ip_address]\n[MASKED:private_key]\n"
    r3 = env.get("/redact/problem")
    assert r3.json() == {"detail": "[MASKED:ssn]"}
    env.assert_nowhere(r.text + r2.text + r3.text, SECRETS["email"], SECRETS["ip_address"],
                       NEEDLES["private_key"], SECRETS["ssn"])


def test_event_stream_is_masked_as_it_streams(env: Env) -> None:
    RELEASE.clear()
    t0 = time.monotonic()
    with env.client() as c, c.stream("GET", f"https://localhost:{env.api.port}/redact/events"
                                     ) as r:
        lines = r.iter_lines()
        first = next(lines)  # arrives before the upstream has sent the second event
        assert time.monotonic() - t0 < 15  # a buffering gateway would wait 25 s here
        RELEASE.set()
        assert first == "data: [MASKED:email]"
        rest = "\n".join(lines)
    assert "data: [MASKED:ip_address]" in rest
    env.assert_nowhere(first + rest, SECRETS["email"], SECRETS["ip_address"])


def test_request_bodies_reach_upstream_but_not_the_records(env: Env) -> None:
    with env.client() as c:
        r = c.post(f"https://localhost:{env.api.port}/redact/email",
                   json={"card": SECRETS["credit_card"], "ssn": SECRETS["ssn"]})
    assert r.status_code == 200
    env.assert_nowhere(r.text, SECRETS["ssn"], NEEDLES["card_digits"])


# --- Kubernetes --------------------------------------------------------------------------------


def test_kubernetes_secret_get_and_list(env: Env) -> None:
    r = env.get("/api/v1/namespaces/team-a/secrets/db", k8s=True)
    assert r.status_code == 200
    secret = r.json()
    assert base64.b64decode(secret["data"]["password"]) == b"[MASKED:k8s-secret]"
    r2 = env.get("/api/v1/namespaces/team-a/secrets", k8s=True,
                 headers={"Accept": "application/vnd.kubernetes.protobuf, */*"})
    assert r2.headers["content-type"].startswith("application/json")
    assert base64.b64decode(r2.json()["items"][0]["data"]["password"]) == b"[MASKED:k8s-secret]"
    env.assert_nowhere(r.text + r2.text, SECRET_B64, "s3cr3t-db-passw0rd")
    cm = env.get("/api/v1/namespaces/team-a/configmaps/settings", k8s=True).json()
    assert cm["data"] == {"owner": "[MASKED:email]", "plain": "visible"}


def test_kubernetes_watch_is_masked_line_by_line(env: Env) -> None:
    url = f"https://localhost:{env.k8s.port}/api/v1/namespaces/team-a/secrets?watch=true"
    RELEASE.clear()
    t0 = time.monotonic()
    with env.client() as c, c.stream("GET", url) as r:
        lines = r.iter_lines()
        first = json.loads(next(lines))  # arrives before the upstream sends the second event
        assert time.monotonic() - t0 < 15  # a buffering gateway would wait 25 s here
        RELEASE.set()
        assert first["type"] == "ADDED"
        assert base64.b64decode(first["object"]["data"]["password"]) == b"[MASKED:k8s-secret]"
        second = json.loads(next(lines))
    assert second["object"]["stringData"] == {"token": "[MASKED:k8s-secret]"}
    env.assert_nowhere(json.dumps([first, second]), SECRET_B64, "plain-s3cr3t-token")


def test_kubernetes_log_follow_is_masked_line_by_line(env: Env) -> None:
    url = (f"https://localhost:{env.k8s.port}/api/v1/namespaces/team-a/pods/web-1/log"
           "?follow=true")
    RELEASE.clear()
    t0 = time.monotonic()
    with env.client() as c, c.stream("GET", url) as r:
        lines = r.iter_lines()
        assert next(lines) == "boot ok, admin is [MASKED:email]"
        assert time.monotonic() - t0 < 15  # a buffering gateway would wait 25 s here
        RELEASE.set()
        rest = list(lines)
    assert rest == ["[MASKED:private_key]"] * 3 + ["listening on [MASKED:ip_address]"]
    env.assert_nowhere("\n".join(rest), SECRETS["email"], NEEDLES["private_key"],
                       SECRETS["ip_address"])
