"""Hot reload with a real gateway (SPEC §4, issue 3 item 6): editing a policy file changes
decisions within 2 s on an open keep-alive connection, and a broken edit is rejected with a
logged error naming file and line while the last good policy stays in force."""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import UPSTREAM_TOKEN, http_target

pytestmark = pytest.mark.e2e

V1 = """rules:
  - id: read-items
    effect: allow
    reason: agents read items
    when: {groups: [agents], http: {methods: [GET], paths: ["/v1/items/**"]}}
  - id: read-orders
    effect: allow
    when: {groups: [agents], http: {methods: [GET], paths: ["/v1/orders/**"]}}
"""
# v2 closes /v1/items/secret/** (a deny added), and opens nothing else
V2 = V1 + """  - id: deny-secret-items
    effect: deny
    reason: secret items are closed
    when: {http: {paths: ["/v1/items/secret/**"]}}
"""
# a broken edit: the when key is misspelt (rule deny-orders on line 13)
BROKEN = V2 + """  - id: deny-orders
    effect: deny
    whenn: {http: {paths: ["/v1/orders/**"]}}
"""
# the fixed edit: orders closed too
V3 = V2 + """  - id: deny-orders
    effect: deny
    reason: orders are closed
    when: {http: {paths: ["/v1/orders/**"]}}
"""


@pytest.fixture
def gw(gateway_factory: Any, oidc: Any, echo_upstream: Any, test_ca: Any) -> Any:
    cfg = {"identity": {"issuers": [oidc.config()]},
           "targets": [http_target("echo", echo_upstream, test_ca)]}
    return gateway_factory(cfg, {"p.yaml": V1}, env={"UPSTREAM_TOKEN": UPSTREAM_TOKEN})


@pytest.fixture
def proxy(gw: Any, oidc: Any) -> str:
    return gw.proxy_with_token(oidc.token(groups=["agents"]))


def make_client(gw: Any, proxy: str) -> httpx.Client:
    # one connection only: every request must travel on the same keep-alive tunnel
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    return httpx.Client(proxy=proxy, limits=limits, timeout=20,
                        verify=ssl.create_default_context(cafile=str(gw.ca)))


@pytest.fixture
def client(gw: Any, proxy: str) -> Iterator[httpx.Client]:
    with make_client(gw, proxy) as c:
        yield c


class Tracker:
    """Sends requests on one client and remembers which connection carried each."""

    def __init__(self, client: httpx.Client, base: str) -> None:
        self.client = client
        self.base = base
        self.streams: list[Any] = []  # kept alive, so a new connection is a new object

    def get(self, path: str) -> httpx.Response:
        r = self.client.get(self.base + path)
        stream = r.extensions["network_stream"]
        if not any(s is stream for s in self.streams):
            self.streams.append(stream)
        return r


def wait_for(check: Callable[[], bool], limit: float) -> float:
    """Seconds until check() is true; fails after `limit` seconds."""
    start = time.monotonic()
    while True:
        if check():
            return time.monotonic() - start
        if time.monotonic() - start > limit:
            pytest.fail(f"condition not met within {limit} s")
        time.sleep(0.05)


def audit_clients(gw: Any) -> set[str]:
    lines = [json.loads(x) for x in gw.audit_text().splitlines()]
    return {x["client"] for x in lines if x.get("type") == "decision"}


def test_edit_changes_decisions_within_2s_on_an_open_connection(
        gw: Any, client: httpx.Client, proxy: str, echo_upstream: Any) -> None:
    t = Tracker(client, f"https://localhost:{echo_upstream.port}")
    assert t.get("/v1/items/secret/1").status_code == 200
    assert t.get("/v1/items/1").status_code == 200

    (gw.policy_dir / "p.yaml").write_text(V2)
    edited = time.monotonic()
    wait_for(lambda: t.get("/v1/items/secret/1").status_code == 403, 3.0)
    elapsed = time.monotonic() - edited
    assert elapsed < 2.0, f"new policy took {elapsed:.2f} s"

    r = t.get("/v1/items/secret/2")
    assert r.status_code == 403
    assert r.json()["rule"] == "deny-secret-items"
    assert r.json()["reason"] == "secret items are closed"
    assert t.get("/v1/items/1").status_code == 200  # the rest of the policy still applies
    # one connection from start to end, on both sides of the gateway's client socket
    assert len(t.streams) == 1
    clients = audit_clients(gw)
    assert len(clients) == 1, clients
    assert "policy version 2 loaded" in gw.stdout
    # the measure does tell connections apart: a second client shows up as a second peer
    with make_client(gw, proxy) as other:
        t2 = Tracker(other, t.base)
        assert t2.get("/v1/items/1").status_code == 200
    assert len(audit_clients(gw)) == 2
    assert t2.streams[0] is not t.streams[0]


def test_broken_edit_is_rejected_and_last_good_stays(gw: Any, client: httpx.Client,
                                                     echo_upstream: Any) -> None:
    t = Tracker(client, f"https://localhost:{echo_upstream.port}")
    path = gw.policy_dir / "p.yaml"
    path.write_text(V2)
    wait_for(lambda: t.get("/v1/items/secret/1").status_code == 403, 3.0)

    path.write_text(BROKEN)
    wait_for(lambda: "policy reload rejected" in gw.stdout, 3.0)
    line = next(x for x in gw.stdout.splitlines() if "policy reload rejected" in x)
    assert "ERROR" in line
    assert f"{path}:13 [deny-orders]" in line and "unknown rule key 'whenn'" in line
    assert "keeping version 2" in line
    # the last good version (V2) decides, on the same connection
    time.sleep(1.0)  # give a wrongly installed version time to show
    assert t.get("/v1/orders/1").status_code == 200
    assert t.get("/v1/items/secret/1").status_code == 403
    assert t.get("/v1/items/1").status_code == 200
    assert gw.stdout.count("policy reload rejected") == 1  # reported once, not every 0.5 s

    path.write_text(V3)
    edited = time.monotonic()
    wait_for(lambda: t.get("/v1/orders/1").status_code == 403, 3.0)
    assert time.monotonic() - edited < 2.0
    assert "policy version 3 loaded" in gw.stdout
    assert t.get("/v1/items/1").status_code == 200
    assert len(t.streams) == 1 and len(audit_clients(gw)) == 1


def test_same_size_edit_within_one_timestamp_tick(gw: Any, client: httpx.Client,
                                                  echo_upstream: Any) -> None:
    """Coarse mtimes: rewrite with the same size and put the old mtime back."""
    import os

    t = Tracker(client, f"https://localhost:{echo_upstream.port}")
    path = gw.policy_dir / "p.yaml"
    assert t.get("/v1/orders/1").status_code == 200
    st = path.stat()
    same_size = V1.replace("/v1/orders/**", "/v1/ordurs/**")
    assert len(same_size) == len(V1)
    with open(path, "r+") as f:
        f.write(same_size)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    edited = time.monotonic()
    wait_for(lambda: t.get("/v1/orders/1").status_code == 403, 3.0)
    assert time.monotonic() - edited < 2.0
    assert t.get("/v1/ordurs/1").status_code == 200
    assert len(t.streams) == 1
