"""Admin listener: /healthz without auth, /metrics in Prometheus text."""

from __future__ import annotations

from typing import Any

import httpx

from tests.conftest import free_port


def test_healthz_and_metrics(gateway_factory: Any, oidc: Any) -> None:
    admin = f"127.0.0.1:{free_port()}"
    cfg = {"identity": {"issuers": [oidc.config()]}, "listen": {"admin": admin},
           "targets": [{"name": "t", "protocol": "http", "hosts": ["localhost:1"]}]}
    gw = gateway_factory(cfg, {"p.yaml": "rules:\n  - {id: r, effect: deny, when: {}}\n"})
    r = httpx.get(f"http://{admin}/healthz", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert r.json()["policy_version"] == 1
    # one denied request, then the counter shows it
    token = oidc.token()
    with httpx.Client(proxy=gw.proxy_with_token(token), timeout=10) as c:
        assert c.get("http://localhost:1/x").status_code == 403
    r = httpx.get(f"http://{admin}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert 'portcullis_decisions_total{decision="deny",protocol="http"} 1.0' in r.text
    assert httpx.get(f"http://{admin}/nope", timeout=10).status_code == 404
