"""`./mitm.sh replay` opens the gateway's recordings in mitmweb (UI only, no proxy server)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import UPSTREAM_TOKEN, free_port, http_target
from tests.fixtures.gateway import ROOT


@contextmanager
def mitmweb_replay(*args: str) -> Iterator[Any]:
    """Run `portcullis replay ARGS`; yield get(path) -> JSON (None until mitmweb answers)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "addons.cli", "replay", *args,
                             "--web-port", str(port)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out = ""

    def get(path: str) -> Any:
        nonlocal out
        sep = "&" if "?" in path else "?"
        try:
            r = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5)
            if r.status_code == 403:  # newer mitmweb: token from its start-up line
                out += proc.stdout.readline() if proc.stdout else ""
                m = re.search(r"token=([0-9A-Za-z_-]+)", out)
                if m:
                    r = httpx.get(f"http://127.0.0.1:{port}{path}{sep}token={m.group(1)}",
                                  timeout=5)
        except httpx.HTTPError:
            return None
        return r.json() if r.status_code == 200 else None

    try:
        yield get
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def wait_for_flows(get: Any, timeout: float = 30) -> list[Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.3)
        flows = get("/flows")
        if flows:
            return flows
    return []


def message_text(m: dict[str, Any]) -> str:
    """A message as mitmweb's content view shows it: `text` (mitmproxy 12) or `lines` of
    (style, text) parts (mitmproxy 11)."""
    if "text" in m:
        return str(m["text"]).rstrip("\n")
    return "\n".join("".join(part[1] for part in line) for line in m["lines"])


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
    with mitmweb_replay("--config", str(gw.config_path)) as get:
        flows = wait_for_flows(get)
        assert any(f["request"]["path"] == "/replay-me" for f in flows), flows


def test_replay_shows_a_postgres_session_as_a_tcp_flow(tmp_path: Path) -> None:
    """A recorded Postgres session (rendered by proxy_db.recording, written by the Recorder)
    loads in stock mitmweb, with its statements and result table as TCP messages."""
    from addons.recorder import Recorder
    from proxy_db import backend as be
    from proxy_db.recording import SegmentWriter, SessionRecording

    rec = Recorder(tmp_path)
    writer = SegmentWriter(rec, sockname=("127.0.0.1", 6432))
    session = SessionRecording(writer, time.time, target="orders-db", database="orders",
                               sub="agent-7", client=("127.0.0.1", 40001),
                               upstream=("127.0.0.1", 5432))
    session.statement({"summary": "SELECT name FROM customers WHERE id = $1"}, "allow", ("r",))
    session.to_client(be.RowDescription((be.FieldDescription("name"),)).encode()
                      + be.DataRow((b"[MASKED:names]",)).encode()
                      + be.CommandComplete("SELECT 1").encode())
    session.statement({"summary": "DROP TABLE orders"}, "deny", ("never-drop",))
    session.finish("client terminated", be.ErrorResponse.make(
        "ERROR", "42501", "portcullis: denied by rule never-drop").encode())
    writer.close()
    rec.done()
    (path,) = tmp_path.glob("portcullis-*.mitm")
    with mitmweb_replay(str(path)) as get:
        flows = wait_for_flows(get)
        (flow,) = flows
        assert flow["type"] == "tcp" and flow["messages_meta"]["count"] == 4, flow
        assert "orders-db" in flow["comment"] and "agent-7" in flow["comment"]
        assert flow["client_conn"]["peername"] == ["127.0.0.1", 40001]
        msgs = get(f"/flows/{flow['id']}/messages/content/Auto.json")
        assert msgs is not None
        text = [message_text(m) for m in msgs]
        assert [m["from_client"] for m in msgs] == [True, False, True, False]
        assert text[0] == "SELECT name FROM customers WHERE id = $1"
        assert "[MASKED:names]" in text[1] and "SELECT 1" in text[1]
        assert text[2] == "DROP TABLE orders\n[denied by rule never-drop]"
        assert text[3].startswith("ERROR 42501")
