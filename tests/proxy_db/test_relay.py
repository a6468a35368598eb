"""Transcripts of the READY phase: enforcement on the simple and extended protocols, the order
of answers, expiry, fast-path calls, and audit records (sans-IO, bytes in/out)."""

from __future__ import annotations

from pathlib import Path

from addons.model import Identity
from proxy_db import backend as be
from proxy_db import messages as fe
from proxy_db.relay import _POISON_SQL
from proxy_db.session import LookupFunction
from tests.proxy_db.transcript import (
    Clock,
    audit_lines,
    decode_all,
    decode_frontend,
    ready_session,
    rows_answer,
    upstream_error,
)

POISON_ERROR = upstream_error("42601", 'syntax error at or near "PORTCULLIS"')


def errors(msgs: list) -> list[be.ErrorResponse]:
    return [m for m in msgs if type(m) is be.ErrorResponse]


def test_allowed_query_is_forwarded_verbatim_and_audited(tmp_path: Path) -> None:
    s, env = ready_session(tmp_path)
    q = fe.Query("SELECT name FROM customers WHERE id = 1").encode()
    s.client_data(q)
    c, u, _ = s.take()
    assert c == b"" and u == q
    answer = rows_answer(("Ada",), fields=("name",))
    s.upstream_data(answer)
    c, _, _ = s.take()
    assert c == answer  # no masks in force: bytes pass through untouched
    recs = audit_lines(env)
    decision, outcome = recs[-2], recs[-1]
    assert decision["decision"] == "allow" and decision["rules"] == ["readers-select"]
    assert decision["operation"]["sql"]["kinds"] == ["select"]
    assert decision["operation"]["sql"]["tables"] == ["public.customers"]
    assert "1" not in decision["operation"]["sql"]["normalized"].split()  # literal removed
    assert outcome["decision_id"] == decision["id"]
    assert outcome["outcome"] == {"status": "ok", "rows": 1, "command": "SELECT"}


def test_denied_query_never_reaches_upstream(tmp_path: Path) -> None:
    s, env = ready_session(tmp_path)
    s.client_data(fe.Query("DROP TABLE customers").encode())
    c, u, _ = s.take()
    assert c == b""
    assert decode_frontend(u) == [fe.Query(_POISON_SQL)]
    s.upstream_data(POISON_ERROR + be.ReadyForQuery(b"I").encode())
    msgs = decode_all(s.take()[0])
    assert len(msgs) == 2 and msgs[1] == be.ReadyForQuery(b"I")
    err = msgs[0]
    assert err.sqlstate == "42501"
    assert err.get("M") == "portcullis: denied by rule never-drop: no schema changes by agents"
    rec = audit_lines(env)[-1]
    assert rec["decision"] == "deny" and rec["rules"] == ["never-drop"]


def test_multi_statement_message_runs_all_or_nothing(tmp_path: Path) -> None:
    s, _ = ready_session(tmp_path)
    s.client_data(fe.Query("SELECT 1; DROP TABLE orders; SELECT 2").encode())
    _, u, _ = s.take()
    sent = decode_frontend(u)
    assert sent == [fe.Query(_POISON_SQL)]  # not even the first SELECT goes


def test_denial_inside_a_transaction_reports_the_upstream_status(tmp_path: Path) -> None:
    """The stand-in fails upstream, so the transaction is aborted there exactly as PostgreSQL
    would abort it, and ReadyForQuery says 'E'."""
    s, _ = ready_session(tmp_path)
    s.client_data(fe.Query("BEGIN").encode())
    s.take()
    s.upstream_data(be.CommandComplete("BEGIN").encode() + be.ReadyForQuery(b"T").encode())
    s.take()
    s.client_data(fe.Query("TRUNCATE orders").encode())
    s.take()
    s.upstream_data(POISON_ERROR + be.ReadyForQuery(b"E").encode())
    msgs = decode_all(s.take()[0])
    assert [type(m) for m in msgs] == [be.ErrorResponse, be.ReadyForQuery]
    assert msgs[0].sqlstate == "42501" and msgs[1].status == b"E"


def test_review_is_refused_with_approval_required(tmp_path: Path) -> None:
    s, env = ready_session(tmp_path)
    s.client_data(fe.Query("DELETE FROM orders WHERE id = 3").encode())
    _, u, _ = s.take()
    assert decode_frontend(u) == [fe.Query(_POISON_SQL)]
    s.upstream_data(POISON_ERROR + be.ReadyForQuery(b"I").encode())
    err = decode_all(s.take()[0])[0]
    assert err.sqlstate == "42501" and "approval required" in err.get("M")
    assert "review-delete" in err.get("M")


def test_unparseable_sql_is_denied(tmp_path: Path) -> None:
    s, env = ready_session(tmp_path)
    s.client_data(fe.Query("SELEC * FRM x").encode())
    _, u, _ = s.take()
    assert decode_frontend(u) == [fe.Query(_POISON_SQL)]
    assert audit_lines(env)[-1]["rules"] == ["unparseable-sql"]


def test_comment_only_query_gets_a_canonical_empty_query(tmp_path: Path) -> None:
    s, _ = ready_session(tmp_path)
    s.client_data(fe.Query("-- nothing\n/* here */").encode())
    _, u, _ = s.take()
    assert decode_frontend(u) == [fe.Query("")]
    s.upstream_data(be.EmptyQueryResponse().encode() + be.ReadyForQuery(b"I").encode())
    msgs = decode_all(s.take()[0])
    assert msgs == [be.EmptyQueryResponse(), be.ReadyForQuery(b"I")]


def test_extended_denied_parse_discards_until_sync_and_one_ready(tmp_path: Path) -> None:
    s, env = ready_session(tmp_path)
    batch = b"".join(m.encode() for m in (
        fe.Parse("", "DROP TABLE customers"), fe.Bind("", ""), fe.Describe(b"P", ""),
        fe.Execute("", 0), fe.Sync()))
    s.client_data(batch)
    _, u, _ = s.take()
    sent = decode_frontend(u)
    assert [type(m) for m in sent] == [fe.Parse, fe.Sync]
    assert sent[0].sql == _POISON_SQL and sent[0].name.startswith("portcullis_refused_")
    s.upstream_data(POISON_ERROR + be.ReadyForQuery(b"I").encode())
    msgs = decode_all(s.take()[0])
    assert [type(m) for m in msgs] == [be.ErrorResponse, be.ReadyForQuery]
    assert msgs[0].sqlstate == "42501"
    # the session stays usable
    s.client_data(b"".join(m.encode() for m in (
        fe.Parse("", "SELECT 1"), fe.Bind("", ""), fe.Execute("", 0), fe.Sync())))
    _, u, _ = s.take()
    assert [type(m) for m in decode_frontend(u)] == [fe.Parse, fe.Bind, fe.Execute, fe.Sync]


def test_denied_parse_answers_before_sync_when_client_flushes(tmp_path: Path) -> None:
    """asyncpg sends Parse + Describe + Flush and waits: the error must come without Sync."""
    s, _ = ready_session(tmp_path)
    s.client_data(fe.Parse("stmt1", "TRUNCATE orders").encode()
                  + fe.Describe(b"S", "stmt1").encode() + fe.Flush().encode())
    _, u, _ = s.take()
    assert [type(m) for m in decode_frontend(u)] == [fe.Parse, fe.Flush]
    s.upstream_data(POISON_ERROR)  # the upstream answers the flushed, failing Parse
    msgs = decode_all(s.take()[0])
    assert [m.sqlstate for m in errors(msgs)] == ["42501"]
    s.client_data(fe.Sync().encode())
    _, u, _ = s.take()
    assert decode_frontend(u) == [fe.Sync()]
    s.upstream_data(be.ReadyForQuery(b"I").encode())
    assert decode_all(s.take()[0]) == [be.ReadyForQuery(b"I")]


def test_pipeline_results_before_the_refusal_keep_their_order(tmp_path: Path) -> None:
    s, _ = ready_session(tmp_path)
    s.client_data(b"".join(m.encode() for m in (
        fe.Parse("", "SELECT 1"), fe.Bind("", ""), fe.Execute("", 0),
        fe.Parse("", "DROP TABLE orders"), fe.Bind("", ""), fe.Execute("", 0), fe.Sync())))
    _, u, _ = s.take()
    assert [type(m) for m in decode_frontend(u)] == [fe.Parse, fe.Bind, fe.Execute, fe.Parse,
                                                     fe.Sync]
    s.upstream_data(be.ParseComplete().encode() + be.BindComplete().encode()
                    + be.DataRow((b"1",)).encode() + be.CommandComplete("SELECT 1").encode()
                    + POISON_ERROR + be.ReadyForQuery(b"I").encode())
    msgs = decode_all(s.take()[0])
    assert [type(m) for m in msgs] == [be.ParseComplete, be.BindComplete, be.DataRow,
                                       be.CommandComplete, be.ErrorResponse, be.ReadyForQuery]


def test_upstream_error_skips_to_sync_and_the_gateway_skips_with_it(tmp_path: Path) -> None:
    s, _ = ready_session(tmp_path)
    s.client_data(b"".join(m.encode() for m in (
        fe.Parse("", "SELECT nope"), fe.Bind("", ""), fe.Execute("", 0))))
    s.take()
    s.upstream_data(upstream_error("42703", 'column "nope" does not exist'))
    msgs = decode_all(s.take()[0])
    assert [m.sqlstate for m in errors(msgs)] == ["42703"]
    # messages before Sync are discarded like the upstream would, then one ReadyForQuery
    s.client_data(fe.Describe(b"P", "").encode() + fe.Sync().encode())
    _, u, _ = s.take()
    assert decode_frontend(u) == [fe.Sync()]
    s.upstream_data(be.ReadyForQuery(b"I").encode())
    assert decode_all(s.take()[0]) == [be.ReadyForQuery(b"I")]


def test_sync_only_batch_gets_a_local_ready_for_query_in_order(tmp_path: Path) -> None:
    s, _ = ready_session(tmp_path)
    s.client_data(fe.Query("BEGIN").encode() + fe.Sync().encode())
    c, u, _ = s.take()
    assert c == b"" and decode_frontend(u) == [fe.Query("BEGIN")]
    s.upstream_data(be.CommandComplete("BEGIN").encode() + be.ReadyForQuery(b"T").encode())
    msgs = decode_all(s.take()[0])
    assert msgs[-2:] == [be.ReadyForQuery(b"T"), be.ReadyForQuery(b"T")]


def test_execute_redecides_after_policy_reload(tmp_path: Path) -> None:
    from addons.policy import load_policies

    s, env = ready_session(tmp_path)
    s.client_data(fe.Parse("s1", "SELECT * FROM orders").encode() + fe.Sync().encode())
    s.take()
    s.upstream_data(be.ParseComplete().encode() + be.ReadyForQuery(b"I").encode())
    s.take()
    pdir = tmp_path / "p2"
    pdir.mkdir()
    (pdir / "p.yaml").write_text("rules:\n  - {id: nothing, effect: deny, reason: locked, "
                                 "when: {}}\n")
    env.policies.current = load_policies(pdir)
    s.client_data(b"".join(m.encode() for m in (fe.Bind("", "s1"), fe.Execute("", 0),
                                                fe.Sync())))
    _, u, _ = s.take()
    assert [type(m) for m in decode_frontend(u)] == [fe.Bind, fe.Parse, fe.Sync]
    assert audit_lines(env)[-1]["rules"] == ["nothing"]


def test_sql_prepare_then_protocol_execute_is_decided_by_what_was_prepared(tmp_path: Path
                                                                         ) -> None:
    s, env = ready_session(tmp_path, policy_text="""
rules:
  - {id: prep, effect: allow, reason: ok, when: {sql: {statements: [prepare, select]}}}
""")
    s.client_data(fe.Query("PREPARE wipe AS DELETE FROM orders").encode())
    _, u, _ = s.take()
    assert decode_frontend(u) == [fe.Query(_POISON_SQL)]  # PREPARE of a DELETE is a delete
    s.upstream_data(POISON_ERROR + be.ReadyForQuery(b"I").encode())
    s.take()
    # a statement the gateway never decided cannot be executed through Bind/Execute
    s.client_data(b"".join(m.encode() for m in (fe.Bind("", "unknown_stmt"),
                                                fe.Execute("", 0), fe.Sync())))
    _, u, _ = s.take()
    assert [type(m) for m in decode_frontend(u)] == [fe.Bind, fe.Parse, fe.Sync]
    assert audit_lines(env)[-1]["rules"] == ["unknown-prepared-statement"]


def test_expired_token_ends_the_session_with_fatal_28p01(tmp_path: Path) -> None:
    clock = Clock()
    ident = Identity(sub="agent-7", iss="urn:test", groups=("readers",), exp=clock.now + 60)
    s, env = ready_session(tmp_path, identity=ident, clock=clock)
    s.client_data(fe.Query("SELECT 1").encode())
    _, u, _ = s.take()
    assert u
    s.upstream_data(rows_answer(("1",)))
    s.take()
    clock.now += 61
    s.client_data(fe.Query("SELECT 1").encode())
    c, u, _ = s.take()
    assert u == b""
    err = decode_all(c)[-1]
    assert err.fatal and err.sqlstate == "28P01" and "expired" in err.get("M")
    assert s.closed
    assert audit_lines(env)[-1]["rules"] == ["token-expired"]


def test_fast_path_call_is_resolved_and_denied_by_default(tmp_path: Path) -> None:
    s, env = ready_session(tmp_path)
    s.client_data(fe.FunctionCall(764, (0,), (b"1",), 0).encode())
    _, u, a = s.take()
    assert u == b"" and a == [LookupFunction(764)]
    s.relay.function_found("pg_catalog.lo_import")
    _, u, _ = s.take()
    assert decode_frontend(u) == [fe.Query(_POISON_SQL)]
    rec = audit_lines(env)[-1]
    assert rec["decision"] == "deny" and rec["operation"]["sql"]["kinds"] == ["call"]
    assert rec["operation"]["sql"]["fastpath"] is True
    assert rec["operation"]["sql"]["functions"] == ["lo_import"]


def test_fast_path_call_allowed_by_a_rule(tmp_path: Path) -> None:
    s, _ = ready_session(tmp_path, policy_text="""
rules:
  - {id: fp, effect: allow, reason: ok, when: {sql: {statements: [call], functions: [lo_open]}}}
""")
    call = fe.FunctionCall(952, (), (b"1", b"2"), 0).encode()
    s.client_data(call)
    s.take()
    s.relay.function_found("pg_catalog.lo_open")
    _, u, _ = s.take()
    assert u == call


def test_unsafe_parameter_change_reported_by_upstream_ends_the_session(tmp_path: Path) -> None:
    s, _ = ready_session(tmp_path)
    s.client_data(fe.Query("SELECT 1").encode())
    s.take()
    s.upstream_data(be.ParameterStatus("standard_conforming_strings", "off").encode())
    c, _, _ = s.take()
    assert decode_all(c)[-1].fatal and s.closed


def test_unknown_client_message_is_a_protocol_error(tmp_path: Path) -> None:
    s, _ = ready_session(tmp_path)
    s.client_data(b"z\x00\x00\x00\x04")
    err = decode_all(s.take()[0])[-1]
    assert err.fatal and err.sqlstate == "08P01" and s.closed


def test_unsolicited_upstream_data_is_a_protocol_error(tmp_path: Path) -> None:
    s, _ = ready_session(tmp_path)
    s.upstream_data(be.DataRow((b"x",)).encode())
    assert decode_all(s.take()[0])[-1].fatal and s.closed


def test_describe_is_injected_when_masks_exist_and_client_did_not_describe(tmp_path: Path
                                                                         ) -> None:
    s, _ = ready_session(tmp_path, policy_text="""
rules:
  - {id: r, effect: allow, reason: ok, when: {sql: {statements: [select]}}}
masks:
  - {id: m, when: {}, columns: ["customers.ssn"], strategy: redact}
""")
    s.client_data(b"".join(m.encode() for m in (fe.Parse("", "SELECT 1"), fe.Bind("", ""),
                                                fe.Execute("", 0), fe.Sync())))
    _, u, _ = s.take()
    sent = decode_frontend(u)
    assert [type(m) for m in sent] == [fe.Parse, fe.Bind, fe.Describe, fe.Execute, fe.Sync]
    rd = be.RowDescription((be.FieldDescription("?column?", 0, 0, 23, 4, -1, 0),))
    s.upstream_data(be.ParseComplete().encode() + be.BindComplete().encode() + rd.encode()
                    + be.DataRow((b"1",)).encode() + be.CommandComplete("SELECT 1").encode()
                    + be.ReadyForQuery(b"I").encode())
    msgs = decode_all(s.take()[0])
    assert [type(m) for m in msgs] == [be.ParseComplete, be.BindComplete, be.DataRow,
                                       be.CommandComplete, be.ReadyForQuery]


def test_unparseable_statement_leaves_no_literal_in_the_audit_log(tmp_path: Path) -> None:
    s, env = ready_session(tmp_path)
    s.client_data(fe.Query("SELECT 1 '4111111111111111'").encode())
    _, u, _ = s.take()
    assert decode_frontend(u) == [fe.Query(_POISON_SQL)]
    s.upstream_data(POISON_ERROR + be.ReadyForQuery(b"I").encode())
    err = decode_all(s.take()[0])[0]
    assert err.sqlstate == "42501" and "unparseable-sql" in err.get("M")
    text = Path(env.audit.path).read_text()
    assert "4111111111111111" not in text
    assert audit_lines(env)[-1]["reason"].startswith("statement cannot be classified (syntax")


def test_an_audit_log_that_cannot_be_written_refuses_every_statement(tmp_path: Path) -> None:
    """Fail closed (SPEC §7): no decision line, no statement upstream; simple and extended
    protocol alike, repeated executions included, and the session stays usable."""
    s, env = ready_session(tmp_path)
    sql = "SELECT name FROM customers WHERE id = $1"
    s.client_data(fe.Parse("s1", sql).encode() + fe.Sync().encode())
    s.take()
    s.upstream_data(b"1\0\0\0\4" + be.ReadyForQuery(b"I").encode())
    s.take()
    run = (fe.Bind("", "s1", (), (b"1",), ()).encode() + fe.Execute("", 0).encode()
           + fe.Sync().encode())
    s.client_data(run)  # the first execution is audited: its template is cached now
    _, u, _ = s.take()
    assert u == run
    s.upstream_data(b"2\0\0\0\4" + be.CommandComplete("SELECT 0").encode()
                    + be.ReadyForQuery(b"I").encode())
    s.take()
    before = Path(env.audit.path).read_bytes()
    env.audit.close()  # from now on every write fails
    s.client_data(run)
    c, u, _ = s.take()
    assert [type(m) for m in decode_frontend(u)] == [fe.Bind, fe.Parse, fe.Sync]  # the stand-in
    s.upstream_data(b"2\0\0\0\4" + POISON_ERROR + be.ReadyForQuery(b"I").encode())
    msgs = decode_all(c + s.take()[0])
    assert [e.sqlstate for e in errors(msgs)] == ["58030"]
    assert msgs[-1] == be.ReadyForQuery(b"I")
    s.client_data(fe.Query("SELECT name FROM customers WHERE id = 2").encode())
    c, u, _ = s.take()
    assert decode_frontend(u) == [fe.Query(_POISON_SQL)]
    s.upstream_data(POISON_ERROR + be.ReadyForQuery(b"I").encode())
    msgs = decode_all(c + s.take()[0])
    assert [e.sqlstate for e in errors(msgs)] == ["58030"] and not s.closed
    assert Path(env.audit.path).read_bytes() == before
