"""Postgres session recordings (SPEC §7): sans-IO transcripts through `proxy_db.recording`, and one
end-to-end run through the real gateway against a throwaway PostgreSQL whose recording is read
back with mitmproxy's own FlowReader."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from addons.model import Identity
from proxy_db import backend as be
from proxy_db import messages as fe
from proxy_db import recording
from proxy_db.recording import Segment, SegmentWriter, render
from proxy_db.session import ConnectUpstream, Session, VerifyToken
from tests.proxy_db.transcript import (
    Clock,
    decode_all,
    make_env,
    password,
    ready_session,
    rows_answer,
    startup,
    upstream_error,
)

POLICY = """
rules:
  - {id: read, effect: allow, reason: reads, when: {sql: {statements: [select, set]}}}
  - {id: never-drop, effect: deny, reason: no schema changes, when: {sql: {statements: [drop]}}}
masks:
  - {id: contacts, when: {}, detectors: [email], strategy: redact}
"""
RFQ = be.ReadyForQuery(b"I").encode()


def recorded(tmp_path: Path, **kw: Any) -> tuple[Session, list[Segment]]:
    segs: list[Segment] = []
    s, _ = ready_session(tmp_path, policy_text=kw.pop("policy_text", POLICY),
                         recorder=segs.append, **kw)
    return s, segs


def texts(seg: Segment) -> list[tuple[bool, str]]:
    return [(fc, t) for fc, t, _ in render(seg)]


def query(s: Session, sql: str, answer: bytes) -> bytes:
    s.client_data(fe.Query(sql).encode())
    s.take()
    s.upstream_data(answer)
    return s.take()[0]


def test_statements_as_audited_and_results_as_the_client_got_them(tmp_path: Path) -> None:
    s, segs = recorded(tmp_path)
    got = query(s, "SELECT name, email FROM customers WHERE id = 4217",
                rows_answer(("Ada", "ada@example.com"), ("Bob", "-"), fields=("name", "email")))
    assert b"[MASKED:email]" in got and b"ada@example.com" not in got
    query(s, "DROP TABLE customers", upstream_error() + RFQ)
    s.client_data(fe.Terminate().encode())
    assert s.closed and len(segs) == 1
    seg = segs[0]
    assert seg.final and seg.number == 1 and seg.sub == "agent-7" and seg.target == "orders-db"
    assert seg.client == ("127.0.0.1", 5555) and seg.reason == "client terminated"
    msgs = texts(seg)
    assert msgs[0][0] is False and "parameter server_version = 15.0" in msgs[0][1]
    assert msgs[1] == (True, "SELECT name, email FROM customers WHERE id = $1")  # no literal
    assert msgs[2] == (False, "name | email\n-----+---------------\nAda  | [MASKED:email]\n"
                              "Bob  | -\nSELECT 2")
    assert msgs[3] == (True, "DROP TABLE customers\n[denied by rule never-drop]")
    assert msgs[4][0] is False and msgs[4][1].startswith("ERROR 42501: portcullis: denied by "
                                                         "rule never-drop")
    assert len(msgs) == 5
    everything = repr([e for e in seg.entries]) + repr([a.frames for _, a, _ in seg.entries
                                                         if isinstance(a, recording.Answer)])
    assert "ada@example.com" not in everything and "4217" not in "".join(t for _, t in msgs)


def test_password_message_and_startup_are_never_recorded(tmp_path: Path) -> None:
    token = "eyJhbGciOiJFUzI1NiJ9.secret-agent-token-body.sig-nature-xyz"
    segs: list[Segment] = []
    env = make_env(tmp_path, POLICY, recorder=segs.append)
    s = Session(env, client="127.0.0.1:6000")
    s.client_data(startup())
    s.take()
    s.client_data(password(token))
    _, _, actions = s.take()
    assert isinstance(actions[0], VerifyToken) and s.recording is None
    s.token_verified(Identity(sub="agent-9", iss="urn:test", groups=(), exp=4e9))
    assert isinstance(s.take()[2][0], ConnectUpstream)
    s.upstream_connected([("client_encoding", "UTF8"), ("standard_conforming_strings", "on")],
                         b"I", (4242, 987654321))
    assert s.recording is not None
    query(s, "SELECT 1", rows_answer(("1",)))
    s.close("client closed the connection")
    assert len(segs) == 1
    blob = repr(segs[0].entries) + repr(texts(segs[0]))
    assert token not in blob and "secret-agent-token" not in blob
    assert "987654321" not in "".join(t for _, t in texts(segs[0]))  # BackendKeyData not shown


def test_no_recorder_means_no_recording(tmp_path: Path) -> None:
    s, _ = ready_session(tmp_path)
    assert s.recording is None
    query(s, "SELECT 1", rows_answer(("1",)))
    assert s.recording is None


def test_rows_are_capped_per_result_with_a_count_of_the_rest(tmp_path: Path) -> None:
    s, segs = recorded(tmp_path)
    rows = [(f"row{i}",) for i in range(250)]
    query(s, "SELECT x FROM t", rows_answer(*rows))
    s.close("done")
    answer = texts(segs[0])[2][1].splitlines()
    assert answer[:3] == ["x", "-----", "row0"]  # as wide as the widest kept value
    assert answer[2:102] == [f"row{i}" for i in range(100)]
    assert answer[102:] == ["... 150 more rows", "SELECT 250"]


def test_a_huge_result_is_reduced_while_it_streams(tmp_path: Path) -> None:
    s, segs = recorded(tmp_path)
    s.client_data(fe.Query("SELECT x FROM big").encode())
    s.take()
    rd = be.RowDescription((be.FieldDescription("x"),)).encode()
    row = be.DataRow((b"v" * 1000,)).encode()
    base = s.recording.held  # what the segment held before this answer
    s.upstream_data(rd)
    s.take()
    for _ in range(40):  # 40 chunks of 100 rows: ~4 MB through the session
        s.upstream_data(row * 100)
        s.take()
        answer = s.recording.entries[-1][1]  # chunks as sent, an Answer once reduced
        unread = answer.raw if isinstance(answer, recording.Answer) else answer
        kept = answer.kept + len(answer.tail) if isinstance(answer, recording.Answer) else 0
        assert sum(map(len, unread)) <= recording.COMPACT_BYTES + 100 * len(row)
        assert kept < 110 * len(row)
        assert s.recording.held == base + sum(map(len, unread)) + kept
    assert isinstance(s.recording.entries[-1][1], recording.Answer)  # it was reduced
    s.upstream_data(be.CommandComplete("SELECT 4000").encode() + RFQ)
    s.close("done")
    lines = texts(segs[0])[2][1].splitlines()
    assert lines[-2:] == ["... 3900 more rows", "SELECT 4000"]
    assert lines[2] == "v" * recording.MAX_CELL + "…"


def test_segments_are_flushed_every_n_messages(tmp_path: Path) -> None:
    s, segs = recorded(tmp_path)
    s.recording.max_messages = 4
    for i in range(5):
        query(s, f"SELECT {i}", rows_answer((str(i),)))
    assert [seg.number for seg in segs] == [1, 2] and not segs[0].final
    s.close("done")
    assert [seg.number for seg in segs] == [1, 2, 3] and segs[-1].final
    assert all(len(seg.entries) <= 4 for seg in segs)
    stmts = [t for seg in segs for fc, t in texts(seg) if fc]
    assert stmts == ["SELECT $1"] * 5
    answers = [t for seg in segs for fc, t in texts(seg) if not fc and "SELECT 1" in t]
    assert len(answers) == 5
    assert segs[1].started == segs[0].ended


def test_binary_values_are_not_rendered(tmp_path: Path) -> None:
    s, segs = recorded(tmp_path)
    # asyncpg: Describe statement (format 0 reported), then Bind asks binary results.
    s.client_data(b"".join(m.encode() for m in (
        fe.Parse("s1", "SELECT id, name FROM t"), fe.Describe(b"S", "s1"), fe.Sync())))
    s.take()
    rd0 = be.RowDescription((be.FieldDescription("id", 0, 0, 23, 4, -1, 0),
                             be.FieldDescription("name")))
    s.upstream_data(be.ParseComplete().encode() + be.ParameterDescription(()).encode()
                    + rd0.encode() + RFQ)
    s.take()
    s.client_data(b"".join(m.encode() for m in (fe.Bind("", "s1", (), (), (1, 0)),
                                                fe.Execute("", 0), fe.Sync())))
    s.take()
    s.upstream_data(be.BindComplete().encode() + be.DataRow((b"\x00\x00\x00\x05", b"Ada"))
                    .encode() + be.CommandComplete("SELECT 1").encode() + RFQ)
    s.take()
    # psycopg binary: portal described, format 1 reported.
    rd1 = be.RowDescription((be.FieldDescription("n", 0, 0, 23, 4, -1, 1),))
    s.client_data(b"".join(m.encode() for m in (
        fe.Parse("", "SELECT n FROM t"), fe.Bind("", "", (), (), (1,)),
        fe.Describe(b"P", ""), fe.Execute("", 0), fe.Sync())))
    s.take()
    s.upstream_data(be.ParseComplete().encode() + be.BindComplete().encode() + rd1.encode()
                    + be.DataRow((b"1234",)).encode() + be.DataRow((None,)).encode()
                    + be.CommandComplete("SELECT 2").encode() + RFQ)
    s.take()
    s.close("done")
    answers = [t for fc, t in texts(segs[0]) if not fc]
    # the rows' answer repeats the header described earlier
    assert "id       | name\n---------+-----\n[binary] | Ada\nSELECT 1" in answers
    assert "n\n--------\n[binary]\nNULL\nSELECT 2" in answers
    stmts = [t for fc, t in texts(segs[0]) if fc]
    assert stmts == ["SELECT id, name FROM t", "SELECT n FROM t"]


def test_errors_notices_and_expiry_are_recorded_as_sent(tmp_path: Path) -> None:
    clock = Clock()
    ident = Identity(sub="agent-7", iss="urn:test", groups=(), exp=clock.now + 60)
    s, segs = recorded(tmp_path, identity=ident, clock=clock)
    notice = be.NoticeResponse.make("NOTICE", "00000", "about ada@example.com").encode()
    query(s, "SELECT broken", upstream_error("42703", "column \"broken\" does not exist")
          + RFQ)
    query(s, "SELECT 1", notice + rows_answer(("1",)))
    clock.now += 120
    s.client_data(fe.Query("SELECT 2").encode())
    assert s.closed
    msgs = texts(segs[0])
    assert (False, 'ERROR 42703: column "broken" does not exist') in msgs
    assert any(not fc and t.startswith("NOTICE 00000: about [MASKED:email]") for fc, t in msgs)
    assert msgs[-2] == (True, "(statement after expiry)\n[denied by rule token-expired]")
    assert msgs[-1] == (False, "FATAL 28P01: portcullis: token expired")
    assert segs[0].reason == "portcullis: token expired"


def test_a_failing_sink_never_breaks_the_session(tmp_path: Path) -> None:
    def broken(seg: Segment) -> None:
        raise OSError("disk full")

    s, _ = ready_session(tmp_path, policy_text=POLICY, recorder=broken)
    s.recording.max_messages = 2
    for _ in range(3):
        got = decode_all(query(s, "SELECT 1", rows_answer(("1",))))
        assert isinstance(got[-1], be.ReadyForQuery)
    rec = s.recording
    s.close("done")
    assert rec.failures == 4 and not s.recording  # 3 full segments + the final one


def test_segment_writer_removes_secrets_and_the_recorder_scrubs(tmp_path: Path) -> None:
    from mitmproxy import io

    from addons.recorder import Recorder

    s, segs = recorded(tmp_path)
    query(s, "SELECT x FROM t", rows_answer(("pw=scram-pw-7Qx",), ("4111 1111 1111 1111",),
                                            ("alan@example.com",)))
    s.close("done")
    rec = Recorder(tmp_path / "rec")
    w = SegmentWriter(rec, secrets=["scram-pw-7Qx", "abc"], sockname=("127.0.0.1", 6432))
    w(segs[0])
    w.close()
    rec.done()
    (path,) = (tmp_path / "rec").glob("*.mitm")
    raw = path.read_bytes()
    assert b"scram-pw-7Qx" not in raw and b"4111 1111" not in raw and b"alan@" not in raw
    with path.open("rb") as fh:
        (flow,) = list(io.FlowReader(fh).stream())
    assert flow.client_conn.peername == ("127.0.0.1", 5555)
    assert flow.client_conn.sockname == ("127.0.0.1", 6432)
    assert flow.server_conn.address == ("-", 0)  # the transcript's target has no upstream
    assert "segment 1" in flow.comment and flow.metadata["portcullis"]["sub"] == "agent-7"
    assert flow.metadata["portcullis"]["final"] is True and w.failures == 0
    # (widths are those of the table as the client got it, before the clean-up)
    assert [m.content.decode().splitlines() for m in flow.messages][2] == [
        "x", "-" * 19, "pw=[removed by portcullis]", "[MASKED:credit_card]", "[MASKED:email]",
        "SELECT 3"]


def test_segment_writer_counts_failures() -> None:
    class Broken:
        def record_tcp(self, *a: Any, **kw: Any) -> bool:
            raise OSError("nope")

    w = SegmentWriter(Broken())
    seg = Segment("t", "db", "sub", ("127.0.0.1", 1), ("127.0.0.1", 2), 1, time.time(),
                  time.time(), True, None, [(True, ({"summary": "SELECT 1"}, "allow", ()), 1.0)])
    w(seg)
    w.close()
    assert w.failures == 1
    w(seg)  # after close: written inline, still never raises
    assert w.failures == 2


def test_answer_byte_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recording, "MAX_ANSWER_BYTES", 200)
    a = recording.Answer()
    a.raw.append(b"".join(be.CommandComplete(f"INSERT 0 {i}").encode() for i in range(50)))
    text, _ = recording.answer_text(a, None)
    lines = text.splitlines()
    assert lines[0] == "INSERT 0 0" and lines[-1].startswith("... ")
    assert lines[-1].endswith("more messages not recorded")
    assert len(lines) - 1 + int(lines[-1].split()[1]) == 50


# ---------------------------------------------------------------------------------------------
# End to end: the real gateway, a real PostgreSQL, the recording read back with FlowReader

E2E_POLICY = """
rules:
  - id: read
    effect: allow
    reason: agents may read
    when: {sql: {statements: [select, transaction]}}
  - {id: never-drop, effect: deny, reason: no schema changes, when: {sql: {statements: [drop]}}}
masks:
  - {id: names, when: {targets: [orders-db]}, columns: ["customers.name"], strategy: redact}
"""
REAL_NAMES = ["Ada Lovelace", "Alan Turing", "Grace Hopper"]


def pg_flows(directory: Path, want: int, timeout: float = 20) -> list[Any]:
    """TCP flows in the recordings once `want` of them are there (segments are written by a
    background thread when each session ends)."""
    from mitmproxy import io, tcp

    deadline = time.monotonic() + timeout
    flows: list[Any] = []
    while time.monotonic() < deadline:
        flows = []
        for path in sorted(directory.glob("portcullis-*.mitm")):
            with path.open("rb") as fh:
                flows += [f for f in io.FlowReader(fh).stream() if isinstance(f, tcp.TCPFlow)]
        if len(flows) >= want:
            return flows
        time.sleep(0.1)
    raise AssertionError(f"{len(flows)} of {want} recorded sessions after {timeout}s")


@pytest.mark.postgres
def test_sessions_are_recorded_masked_and_without_secrets(pg: Any, gateway: Any) -> None:
    import psycopg

    from tests.fixtures.pg_cluster import PASSWORDS
    from tests.proxy_db.harness import pg_target

    gw = gateway([pg_target(pg)], {"p.yaml": E2E_POLICY})
    token = gw.token("agent-7", ["readers"])
    r = gw.psql(token, "SELECT id, name, notes FROM customers "
                       "WHERE notes IS DISTINCT FROM 'literal-zz-9' ORDER BY id")
    assert r.returncode == 0, r.stderr
    assert "[MASKED" in r.stdout and "vip" in r.stdout and "Ada Lovelace" not in r.stdout
    r = gw.psql(token, "DROP TABLE orders")
    assert r.returncode != 0 and "never-drop" in r.stderr
    with psycopg.connect(gw.dsn(token)) as conn:
        rows = conn.execute("SELECT name, status FROM customers c JOIN orders o "
                            "ON o.customer_id = c.id WHERE c.id = %s", (2,)).fetchall()
        assert rows[0][1] == "open" and rows[0][0] != "Alan Turing"
        with conn.cursor(binary=True) as cur:
            cur.execute("SELECT id, name FROM customers WHERE id = %s", (3,))
            assert cur.fetchall() == [(3, None)]  # binary values of masked columns: NULL

    flows = pg_flows(gw.config.recordings_dir, 3)
    assert len(flows) == 3
    by_stmt = {}
    for f in flows:
        meta = f.metadata["portcullis"]
        assert meta["protocol"] == "postgres" and meta["target"] == "orders-db"
        assert meta["sub"] == "agent-7" and meta["segment"] == 1 and meta["final"]
        assert f.client_conn.peername[0] == "127.0.0.1" and f.client_conn.peername[1] > 0
        assert f.server_conn.address == ("127.0.0.1", pg.port)
        assert "agent-7" in f.comment and "orders-db" in f.comment
        sent = [m.content.decode() for m in f.messages if m.from_client]
        by_stmt[sent[0] if sent else ""] = f
    select = by_stmt["SELECT id, name, notes FROM customers WHERE notes IS DISTINCT FROM $1 "
                     "ORDER BY id"]
    answer = [m.content.decode() for m in select.messages if not m.from_client][-1]
    lines = answer.splitlines()
    assert [c.strip() for c in lines[0].split(" | ")] == ["id", "name", "notes"]
    assert lines[2].startswith("1  | [MASKED") and lines[2].endswith("| vip")
    assert lines[-1] == "SELECT 3"
    drop = by_stmt["DROP TABLE orders\n[denied by rule never-drop]"]
    assert any(not m.from_client and m.content.startswith(b"ERROR 42501: portcullis: denied "
                                                            b"by rule never-drop")
               for m in drop.messages)
    (ext,) = [f for f in flows if any(b"JOIN orders" in m.content for m in f.messages)]
    stmts = [m.content.decode() for m in ext.messages if m.from_client]
    assert stmts[0] == "BEGIN" and stmts[-1] == "COMMIT"  # psycopg's own transaction
    assert stmts[1:-1] == ["SELECT name, status FROM customers c JOIN orders o ON o.customer_id = c.id"
                     " WHERE c.id = $1", "SELECT id, name FROM customers WHERE id = $1"]
    answers = "\n".join(m.content.decode() for m in ext.messages if not m.from_client)
    assert "| open" in answers and "[MASKED" in answers
    assert "[binary] | NULL" in answers  # binary id, masked name sent as NULL

    raw = b"".join(p.read_bytes() for p in gw.config.recordings_dir.glob("*.mitm"))
    assert token.encode() not in raw and token.split(".")[1].encode() not in raw
    assert PASSWORDS["gw_scram"].encode() not in raw
    assert b"literal-zz-9" not in raw
    for name in REAL_NAMES:
        assert name.encode() not in raw
