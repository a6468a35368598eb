"""Postgres `review` statements are held for approval (SPEC §5/§6), sans-IO transcripts.

The session stops reading the client while a statement is held (later messages wait in order),
sends nothing upstream, and asks the server to follow the approval (`AwaitApproval`). Approved:
the statement runs and its audit line says so. Denied or timed out: ERROR 42501 naming the
approval, nothing runs, and the session stays usable. A grant lets the same identity repeat the
same statement without review."""

from __future__ import annotations

from pathlib import Path

from addons.approvals import ApprovalStore
from addons.model import Identity
from proxy_db import backend as be
from proxy_db import messages as fe
from proxy_db.relay import _POISON_SQL
from proxy_db.session import AwaitApproval
from tests.proxy_db.transcript import (
    IDENTITY,
    audit_lines,
    decode_all,
    decode_frontend,
    ready_session,
    rows_answer,
    upstream_error,
)

REVIEWER = Identity(sub="reviewer", iss="urn:test", groups=("approvers",), exp=4_000_000_000.0)
DELETE = "DELETE FROM orders WHERE id = 3"
POISON_ERROR = upstream_error("42601", 'syntax error at or near "PORTCULLIS"')


def held_session(tmp_path: Path):  # noqa: ANN201
    store = ApprovalStore()
    s, env = ready_session(tmp_path, approvals=store)
    return s, env, store


def hold(s, sql: str = DELETE) -> str:  # noqa: ANN001
    s.client_data(fe.Query(sql).encode())
    c, u, actions = s.take()
    assert c == b"" and u == b"", "a held statement sends nothing anywhere"
    waits = [a for a in actions if isinstance(a, AwaitApproval)]
    assert len(waits) == 1
    return waits[0].approval_id


def test_approved_statement_runs_after_approval_and_is_audited(tmp_path: Path) -> None:
    s, env, store = held_session(tmp_path)
    aid = hold(s)
    pending = store.list("pending")
    assert [a.id for a in pending] == [aid]
    assert pending[0].operation["statement"] == DELETE
    assert pending[0].rules == ["review-delete"]
    store.decide(aid, REVIEWER, approve=True)
    s.relay.approval_done(aid, "approved")
    _, u, _ = s.take()
    assert decode_frontend(u) == [fe.Query(DELETE)]
    s.upstream_data(be.CommandComplete("DELETE 1").encode() + be.ReadyForQuery(b"I").encode())
    msgs = decode_all(s.take()[0])
    assert msgs == [be.CommandComplete("DELETE 1"), be.ReadyForQuery(b"I")]
    decision = [r for r in audit_lines(env) if r.get("type") == "decision"][-1]
    assert decision["decision"] == "review"
    assert decision["approval"] == {"id": aid, "state": "approved"}


def test_messages_after_a_held_statement_wait_in_order(tmp_path: Path) -> None:
    s, _, store = held_session(tmp_path)
    aid = hold(s)
    s.client_data(fe.Query("SELECT name FROM customers").encode())
    c, u, _ = s.take()
    assert c == b"" and u == b"", "nothing overtakes the held statement"
    store.decide(aid, REVIEWER, approve=True)
    s.relay.approval_done(aid, "approved")
    _, u, _ = s.take()
    assert decode_frontend(u) == [fe.Query(DELETE), fe.Query("SELECT name FROM customers")]


def test_denied_statement_gets_42501_and_session_stays_usable(tmp_path: Path) -> None:
    s, env, store = held_session(tmp_path)
    aid = hold(s)
    store.decide(aid, REVIEWER, approve=False, reason="not on a Friday")
    s.relay.approval_done(aid, "denied")
    _, u, _ = s.take()
    assert decode_frontend(u) == [fe.Query(_POISON_SQL)]  # nothing runs upstream
    s.upstream_data(POISON_ERROR + be.ReadyForQuery(b"I").encode())
    msgs = decode_all(s.take()[0])
    assert msgs[0].sqlstate == "42501"
    assert "approval_denied" in msgs[0].get("M") and aid in msgs[0].get("M")
    assert "not on a Friday" in msgs[0].get("M")
    assert msgs[1] == be.ReadyForQuery(b"I")
    rec = audit_lines(env)[-1]
    assert rec["decision"] == "deny" and rec["approval"] == {"id": aid,
                                                             "state": "approval_denied"}
    # still usable
    s.client_data(fe.Query("SELECT name FROM customers").encode())
    _, u, _ = s.take()
    assert decode_frontend(u) == [fe.Query("SELECT name FROM customers")]
    s.upstream_data(rows_answer(("Ada",), fields=("name",)))
    assert be.DataRow((b"Ada",)) in decode_all(s.take()[0])


def test_timed_out_statement_gets_approval_timeout(tmp_path: Path) -> None:
    s, env, store = held_session(tmp_path)
    aid = hold(s)
    assert store.expire(aid) == "expired"
    s.relay.approval_done(aid, "expired")
    s.take()
    s.upstream_data(POISON_ERROR + be.ReadyForQuery(b"I").encode())
    err = decode_all(s.take()[0])[0]
    assert err.sqlstate == "42501" and "approval_timeout" in err.get("M")
    assert audit_lines(env)[-1]["approval"]["state"] == "approval_timeout"


def test_grant_lets_the_same_statement_run_without_review(tmp_path: Path) -> None:
    s, env, store = held_session(tmp_path)
    aid = hold(s)
    store.decide(aid, REVIEWER, approve=True, grant_minutes=10)
    s.relay.approval_done(aid, "approved")
    s.take()
    s.upstream_data(be.CommandComplete("DELETE 1").encode() + be.ReadyForQuery(b"I").encode())
    s.take()
    # the same statement again: runs at once, audited as granted
    s.client_data(fe.Query(DELETE).encode())
    _, u, actions = s.take()
    assert decode_frontend(u) == [fe.Query(DELETE)]
    assert not [a for a in actions if isinstance(a, AwaitApproval)]
    decision = [r for r in audit_lines(env) if r.get("type") == "decision"][-1]
    assert decision["approval"] == {"id": None, "state": "granted"}
    # another statement is reviewed again
    hold(s, "DELETE FROM orders WHERE id = 4")


def test_token_expiring_during_the_hold_ends_the_session(tmp_path: Path) -> None:
    short = Identity(sub=IDENTITY.sub, iss=IDENTITY.iss, groups=IDENTITY.groups, exp=1000.0)
    store = ApprovalStore()
    clock = [900.0]
    s, _ = ready_session(tmp_path, identity=short, approvals=store, clock=lambda: clock[0])
    aid = hold(s)
    store.decide(aid, REVIEWER, approve=True)
    clock[0] = 2000.0
    s.relay.approval_done(aid, "approved")
    c, u, _ = s.take()
    assert u == b"", "an approved statement of an expired token never runs"
    err = decode_all(c)[0]
    assert err.get("S") == "FATAL" and err.sqlstate == "28P01"
    assert s.closed


def test_extended_protocol_parse_is_held_and_covers_its_executions(tmp_path: Path) -> None:
    s, env, store = held_session(tmp_path)
    batch = (fe.Parse("", DELETE).encode() + fe.Bind("", "").encode()
             + fe.Execute("", 0).encode() + fe.Sync().encode())
    s.client_data(batch)
    c, u, actions = s.take()
    assert c == b"" and u == b""
    aid = next(a.approval_id for a in actions if isinstance(a, AwaitApproval))
    store.decide(aid, REVIEWER, approve=True)
    s.relay.approval_done(aid, "approved")
    _, u, _ = s.take()
    assert [type(m) for m in decode_frontend(u)] == [fe.Parse, fe.Bind, fe.Execute, fe.Sync]
    decision = [r for r in audit_lines(env) if r.get("type") == "decision"][-1]
    assert decision["approval"] == {"id": aid, "state": "approved"}


def test_extended_protocol_denial_discards_until_sync(tmp_path: Path) -> None:
    s, _, store = held_session(tmp_path)
    batch = (fe.Parse("", DELETE).encode() + fe.Bind("", "").encode()
             + fe.Execute("", 0).encode() + fe.Sync().encode())
    s.client_data(batch)
    aid = next(a.approval_id for a in s.take()[2] if isinstance(a, AwaitApproval))
    store.decide(aid, REVIEWER, approve=False)
    s.relay.approval_done(aid, "denied")
    _, u, _ = s.take()
    sent = decode_frontend(u)
    assert [type(m) for m in sent] == [fe.Parse, fe.Sync]
    assert sent[0].sql == _POISON_SQL
    s.upstream_data(POISON_ERROR + be.ReadyForQuery(b"I").encode())
    msgs = decode_all(s.take()[0])
    assert [type(m) for m in msgs] == [be.ErrorResponse, be.ReadyForQuery]
    assert "approval_denied" in msgs[0].get("M")


def test_without_an_approval_store_review_is_refused(tmp_path: Path) -> None:
    s, _ = ready_session(tmp_path)  # no store: refused at once, as before
    s.client_data(fe.Query(DELETE).encode())
    _, u, actions = s.take()
    assert decode_frontend(u) == [fe.Query(_POISON_SQL)]
    assert not [a for a in actions if isinstance(a, AwaitApproval)]


def test_cancel_request_ends_the_hold_with_57014(tmp_path: Path) -> None:
    s, env, store = held_session(tmp_path)
    aid = hold(s)
    s.relay.approval_cancelled()
    _, u, _ = s.take()
    assert decode_frontend(u) == [fe.Query(_POISON_SQL)]  # nothing runs upstream
    s.upstream_data(POISON_ERROR + be.ReadyForQuery(b"I").encode())
    msgs = decode_all(s.take()[0])
    assert msgs[0].sqlstate == "57014"
    assert msgs[0].get("M") == "canceling statement due to user request"
    assert store.state_of(aid) == "expired"
    assert audit_lines(env)[-1]["approval"] == {"id": aid, "state": "cancelled"}
    # a reviewer acting later changes nothing
    s.relay.approval_done(aid, "approved")
    assert s.take()[1] == b""
