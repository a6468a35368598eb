"""`./mitm.sh replay` opens the gateway's recordings in mitmweb (UI only, no proxy server)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

import httpx

from tests.conftest import UPSTREAM_TOKEN, free_port, http_target
from tests.fixtures.gateway import ROOT


def test_replay_serves_recorded_flows(gateway_factory: Any, oidc: Any, echo_upstream: Any,
                                      test_ca: Any) -> None:
    import ssl

    cfg = {"identity": {"issuers": [oidc.config()]},
           "targets": [http_target("echo", echo_upstream, test_ca)]}
    gw = gateway_factory(cfg, {"p.yaml": "rules:\n  - {id: all, effect: allow, when: {}}\n"},
                         env={"UPSTREAM_TOKEN": UPSTREAM_TOKEN})
    ctx = ssl.create_default_context(cafile=str(gw.ca))
    with httpx.Client(proxy=gw.proxy_with_token(oidc.token()), verify=ctx, timeout=10) as c:
        assert c.get(f"https://localhost:{echo_upstream.port}/replay-me").status_code == 200
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "addons.cli", "replay", "--config",
                             str(gw.config_path), "--web-port", str(port)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        flows: list[Any] = []
        out = ""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not flows:
            time.sleep(0.3)
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/flows", timeout=5)
            except httpx.HTTPError:
                continue
            if r.status_code == 403:  # newer mitmweb: token from its start-up line
                out += proc.stdout.readline() if proc.stdout else ""
                m = re.search(r"token=([0-9A-Za-z_-]+)", out)
                if m:
                    r = httpx.get(f"http://127.0.0.1:{port}/flows?token={m.group(1)}", timeout=5)
            if r.status_code == 200:
                flows = r.json()
        assert any(f["request"]["path"] == "/replay-me" for f in flows), flows
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
