"""`Recorder.record_tcp`: Postgres session segments as mitmproxy TCP flows in the daily file."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from mitmproxy import io, tcp
from mitmproxy.test import tflow

from addons.recorder import Recorder


def read_flows(directory: Path) -> list[Any]:
    (path,) = directory.glob("portcullis-*.mitm")
    with path.open("rb") as fh:
        return list(io.FlowReader(fh).stream())


def test_tcp_flow_round_trips_through_the_flow_file(tmp_path: Path) -> None:
    rec = Recorder(tmp_path / "rec")
    meta = {"portcullis": {"protocol": "postgres", "target": "orders-db", "sub": "agent-7",
                           "client": "127.0.0.1:5555", "segment": 2, "final": True}}
    msgs = [(True, b"SELECT name FROM customers WHERE id = $1", 1000.5),
            (False, b"name\n----\nAda\nSELECT 1", 1000.75),
            (False, b"card 4111 1111 1111 1111", 1001.0)]
    assert rec.record_tcp(("127.0.0.1", 5555), ("db.internal", 5432), msgs, meta,
                          sockname=("127.0.0.1", 6432), comment="postgres orders-db segment 2",
                          started=1000.0, ended=1002.0)
    rec.done()
    (flow,) = read_flows(tmp_path / "rec")
    assert isinstance(flow, tcp.TCPFlow)
    assert [(m.from_client, m.timestamp) for m in flow.messages] == [
        (True, 1000.5), (False, 1000.75), (False, 1001.0)]
    assert flow.messages[0].content == b"SELECT name FROM customers WHERE id = $1"
    assert flow.messages[2].content == b"card [MASKED:credit_card]"  # scrubbed once more
    assert flow.metadata == meta and flow.comment == "postgres orders-db segment 2"
    assert flow.client_conn.peername == ("127.0.0.1", 5555)
    assert flow.client_conn.sockname == ("127.0.0.1", 6432)
    assert flow.server_conn.address == ("db.internal", 5432)
    assert flow.client_conn.timestamp_start == 1000.0 and flow.client_conn.timestamp_end == 1002.0
    assert flow.server_conn.timestamp_end == 1002.0 and flow.timestamp_created == 1000.0


def test_http_and_tcp_writers_on_several_threads_never_interleave(tmp_path: Path) -> None:
    rec = Recorder(tmp_path)
    errors: list[BaseException] = []

    def tcp_writer(n: int) -> None:
        try:
            for i in range(25):
                body = f"thread {n} flow {i} ".encode() * 200
                assert rec.record_tcp(("127.0.0.1", 1000 + n), ("127.0.0.1", 5432),
                                      [(True, body, 1.0 + i)], {"n": n, "i": i})
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    def http_writer() -> None:
        try:
            for _ in range(25):
                rec.record(tflow.tflow(resp=True))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=tcp_writer, args=(n,)) for n in range(4)]
    threads.append(threading.Thread(target=http_writer))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    rec.done()
    assert not errors
    flows = read_flows(tmp_path)
    tcps = [f for f in flows if isinstance(f, tcp.TCPFlow)]
    assert len(flows) == 125 and len(tcps) == 100 and rec.failures == 0
    for f in tcps:
        n, i = f.metadata["n"], f.metadata["i"]
        assert f.messages[0].content == f"thread {n} flow {i} ".encode() * 200


def test_a_recording_failure_is_counted_not_raised(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    from addons.metrics import REGISTRY

    before = REGISTRY.get_sample_value("portcullis_recording_failures_total") or 0.0
    rec = Recorder(blocker)
    assert rec.record_tcp(("127.0.0.1", 1), ("127.0.0.1", 2), [(True, b"x", 1.0)], {}) is False
    assert rec.failures == 1
    assert REGISTRY.get_sample_value("portcullis_recording_failures_total") == before + 1


def test_http_recording_scrubs_path_query_and_body(tmp_path: Path) -> None:
    """Detector hits in the request line and body never reach a recording (the audit summary
    is scrubbed the same way); the response is recorded as the agent got it."""
    rec = Recorder(tmp_path)
    flow = tflow.tflow(resp=True)
    flow.request.path = "/v1/users/ada@example.com/cards?number=4111111111111111&x=1"
    flow.request.content = b'{"card": "4111111111111111"}'
    flow.request.headers["authorization"] = "Bearer agent-secret-token"
    rec.record(flow)
    (got,) = read_flows(tmp_path)
    assert got.request.path == ("/v1/users/[MASKED:email]/cards?"
                                "number=[MASKED:credit_card]&x=1")
    assert b"4111111111111111" not in got.request.content
    assert got.request.headers["authorization"] == "[removed by portcullis]"
    raw = next(tmp_path.glob("portcullis-*.mitm")).read_bytes()
    for secret in (b"ada@example.com", b"4111111111111111", b"agent-secret-token"):
        assert secret not in raw
