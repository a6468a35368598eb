"""The READY phase: every client message decided, every upstream answer put in its place.

Rules (PostgreSQL's own, which clients rely on):
- Simple Query: the whole message is decided at once; if any statement is refused, none runs:
  the client gets ErrorResponse + ReadyForQuery and the upstream never sees the text.
- Extended protocol: the text is decided at Parse, execution is re-checked at Execute (token
  expiry, policy version, audit). A refused message produces one ErrorResponse; the session then
  discards client messages until Sync and answers exactly one ReadyForQuery for that Sync (the
  upstream's own one when part of the batch already went upstream). The error is sent at once,
  not at Sync, so a client that sends Flush and waits (asyncpg) sees it.
- Responses keep their order: `queue` holds one `Pending` per message forwarded upstream (what
  completes it) and `Local` answers the gateway makes itself; a Local leaves as soon as every
  upstream answer queued before it has arrived. After an upstream error in a batch, the upstream
  skips to Sync, and so do the pending entries (and gateway errors queued in that batch).
- Results: RowDescription OIDs are resolved through the catalog (cached per upstream) and rows
  are masked by `results.RowPlan`; upstream errors and notices are scrubbed the same way.
"""

from __future__ import annotations

import logging
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

from addons.identity import still_valid
from addons.model import AuditUnavailable, AuthError, PortcullisError
from proxy_db.answers import RFQ, Answers, Exec, Local, Pending
from proxy_db.backend import ErrorResponse
from proxy_db.catalog import CatalogCache
from proxy_db.framing import MessageFramer
from proxy_db.gate import ApprovalRequired, Gate, Verdict
from proxy_db.messages import (
    Bind,
    Close,
    Describe,
    Execute,
    FunctionCall,
    Parse,
    ProtocolError,
    Query,
)
from proxy_db.session import LOG_LINE, AwaitApproval, LookupFunction

log = logging.getLogger("portcullis.postgres")
_EMPTY_TEXT = Query("").encode()
# Stand-ins for refused statements: rejected by the upstream's parser, so nothing runs.
_POISON_SQL = "PORTCULLIS REFUSED THIS STATEMENT"
_POISON_QUERY = Query(_POISON_SQL).encode()


class Relay(Answers):
    """Client side of the READY phase; the upstream side is `answers.Answers`."""

    def __init__(self, session: Any, status: bytes) -> None:
        self.s = session
        self.env = session.env
        self.txn = status
        limits = self.env.limits
        self.cf = MessageFramer(limits.frontend)
        self.uf = MessageFramer(limits.backend)
        self.queue: deque[Pending | Local] = deque()
        self.discarding = False
        self.batch_forwarded = False
        self.gate = Gate(session.target.name)
        self._poison_parse = Parse(f"portcullis_refused_{secrets.token_hex(8)}",
                                   _POISON_SQL).encode()
        self.catalog: CatalogCache = self.env.catalogs.setdefault(session.target.name,
                                                                  CatalogCache())
        # Parsed statements and bound portals as the client sees them (decisions at Parse).
        self.statements: dict[str, tuple[Verdict, str]] = {}
        self.portals: dict[str, tuple[str, tuple[int, ...]]] = {}
        # Whether the row shape of a portal/statement will be known before its rows arrive.
        self.described_portals: set[str] = set()
        self.described_statements: set[str] = set()
        # Row descriptions as the upstream reported them (in upstream order).
        self.portal_rowdesc: dict[str, bytes] = {}
        self.stmt_rowdesc: dict[str, bytes] = {}
        # Row plans by (RowDescription, formats, masks, statement shape): per-row work only.
        self.plans: dict[tuple[Any, ...], tuple[Any, int, Any]] = {}
        self.client_backlog: list[tuple[bytes, bytes]] = []
        self.client_paused: str | None = None
        self.upstream_backlog: list[tuple[bytes, bytes]] = []
        self.upstream_paused: str | None = None
        self.pending_function: tuple[FunctionCall, bytes] | None = None
        # A `review` message waiting for its approval: (approval id, verdict, SQL, extended,
        # what to run once approved). The client's later messages wait in client_backlog.
        self.held: tuple[str, Verdict, str, bool, Callable[[Verdict], None]] | None = None
        self.upstream_portals: dict[str, tuple[str, tuple[int, ...]]] = {}
        self._detectors_policy: Any = None
        self._detectors: tuple[str, ...] = ()

    # ---------------------------------------------------------------------------------------
    # client -> upstream

    def client_data(self, data: bytes) -> None:
        frames = self.cf.feed(data)
        if self.client_paused:
            self.client_backlog.extend(frames)
            self._check_backlog(self.client_backlog)
            return
        self._client_frames(frames)

    def _client_frames(self, frames: list[tuple[bytes, bytes]]) -> None:
        for i, (type_, raw) in enumerate(frames):
            if self.s.closed:
                return
            if self.client_paused:
                self.client_backlog.extend(frames[i:])
                return
            self._client_message(type_, raw)

    def _client_message(self, t: bytes, raw: bytes) -> None:
        if self.discarding and t not in (b"S", b"X"):
            if t == b"H" and self.batch_forwarded:
                self.s.send_upstream(raw)
            return
        if t == b"Q":
            self._query(raw)
        elif t == b"P":
            self._parse(raw)
        elif t == b"B":
            self._bind(raw)
        elif t == b"E":
            self._execute(raw)
        elif t == b"S":
            self._sync(raw)
        elif t == b"D":
            d = Describe.decode(raw[5:])
            if d.kind == b"P":
                self.described_portals.add(d.name)
            else:
                self.described_statements.add(d.name)
            self._forward(raw, Pending("DP" if d.kind == b"P" else "DS", name=d.name))
        elif t == b"C":
            c = Close.decode(raw[5:])
            if c.kind == b"S":
                self.statements.pop(c.name, None)
                self.described_statements.discard(c.name)
                self.gate.forget(c.name)
            else:
                self.portals.pop(c.name, None)
            self._forward(raw, Pending("C"))
        elif t == b"H":
            if self.batch_forwarded:
                self.s.send_upstream(raw)
        elif t in (b"d", b"c", b"f"):
            self.s.send_upstream(raw)  # COPY FROM STDIN data: its statement was decided
        elif t == b"F":
            self._function_call(raw)
        elif t == b"X":
            self.s.send_upstream(raw)
            self.s.close("client terminated")
        else:
            raise ProtocolError(f"unexpected client message {t!r}")

    def _forward(self, raw: bytes, pending: Pending) -> None:
        self.s.send_upstream(raw)
        self.queue.append(pending)
        self.batch_forwarded = True

    def _local(self, data: bytes | None) -> None:
        self.queue.append(Local(data))
        self._drain()

    def _identity_ok(self) -> bool:
        """Continuous verification: an expired token ends the session (FATAL 28P01)."""
        ident = self.s.identity
        if ident is not None and not still_valid(ident, self.env.clock()):
            self._audit_denial(None, "token-expired", "token expired",
                               {"protocol": "postgres", "summary": "(statement after expiry)"})
            self.s.refuse(AuthError("token expired"), "portcullis: token expired")
            return False
        return True

    def _query(self, raw: bytes) -> None:
        q = Query.decode(raw[5:])
        if not self._identity_ok():
            return
        policy = self.env.policies.current
        v = self.gate.decide(policy, self.s.identity, q.sql)
        if v.empty:
            # Only comments: the upstream answers EmptyQueryResponse for a canonical empty text.
            self._forward(_EMPTY_TEXT, Pending("XQ"))
            self.batch_forwarded = False
            return
        self._run_query(v, raw, q.sql, policy)

    def _run_query(self, v: Verdict, raw: bytes, sql: str, policy: Any) -> None:
        # The resume callback is only built for a verdict that may be held (not per statement).
        hold = None if v.allowed else (lambda av: self._run_query(av, raw, sql, policy))
        ex = self._admit(v, sql, policy, hold=hold)
        if ex is None:
            return
        self._forward(raw, Pending("Q", ex))
        self.batch_forwarded = False  # a Query is its own batch

    def _admit(self, v: Verdict, sql: str, policy: Any, statement: str | None = None,
               extended: bool = False, hold: Callable[[Verdict], None] | None = None
               ) -> Exec | None:
        """Audit the decision; on refusal answer with the error and return None. A `review`
        verdict with `hold` given is held for approval instead (None is returned too)."""
        op = v.audit_operation()
        if not v.allowed:
            if hold is not None and self._hold(v, sql, extended, hold):
                return None
            err = v.refusal
            assert err is not None
            self._audit_denial(v, err.extra.get("rule") or v.decision.rule, v.decision.reason, op)
            self._refuse(ErrorResponse.make("ERROR", err.sqlstate, err.reason).encode(),
                         extended)
            return None
        try:
            if v.approval is None:
                # The same verdict, operation and identity on every execution of a statement:
                # the line's fixed part is serialised once per session and verdict.
                audit_id = self.env.audit.repeated_decision(
                    protocol="postgres", target=self.s.target.name, client=self.s.client,
                    identity=self.s.identity, operation=op, decision=v.decision)
            else:
                audit_id = self.env.audit.decision(
                    protocol="postgres", target=self.s.target.name, client=self.s.client,
                    identity=self.s.identity, operation=op, decision=v.decision,
                    approval=v.approval)
        except Exception as e:  # noqa: BLE001 - unaudited means refused
            err2 = e if isinstance(e, AuditUnavailable) else AuditUnavailable("audit failed")
            log.error("audit write failed; refusing statement from %s", self.s.client)
            self._refuse(ErrorResponse.make("ERROR", err2.sqlstate,
                                            f"portcullis: {err2.reason}").encode(), extended)
            return None
        self._log("ALLOW", op["summary"], v.decision.rules, audit_id)
        if self.s.recording is not None:
            self.s.recording.statement(op, "allow", v.decision.rules)
        return Exec(v, audit_id, self.env.monotonic(), sql, policy, statement)

    def _audit_denial(self, v: Verdict | None, rule: str, reason: str,
                      op: dict[str, Any], approval: dict[str, Any] | None = None) -> None:
        try:
            rid = self.env.audit.decision(
                protocol="postgres", target=self.s.target.name, client=self.s.client,
                identity=self.s.identity, operation=op,
                decision=v.decision if v is not None else None, effect="deny", rules=[rule],
                reason=reason, approval=approval)
        except Exception:  # noqa: BLE001 - refused anyway
            log.error("audit write failed for a denied statement from %s", self.s.client)
            rid = "-"
        self._log("DENY", op["summary"], (rule,), rid)
        if self.s.recording is not None:
            self.s.recording.statement(op, "deny", (rule,))

    def _log(self, effect: str, summary: str, rules: Any, rid: str) -> None:
        ident = self.s.identity
        args = ("%s %s sub=%s target=%s rules=%s id=%s", effect, summary,
                ident.sub if ident else "-", self.s.target.name, ",".join(rules) or "-", rid)
        if self.env.defer_outcomes and effect == "ALLOW":
            # The audit line is already written; the log line can wait until the statement
            # is on its way upstream (the server runs `run_deferred()` after its writes).
            self.s.deferred.append((LOG_LINE, args))
        else:
            self.env.decisions.info(*args)

    def _refuse(self, error: bytes, extended: bool) -> None:
        """Answer a refused message with `error` by sending the upstream a statement that
        fails to parse (nothing runs) and putting our error in place of the upstream's. The
        upstream then does what PostgreSQL does after any error: a transaction block becomes
        aborted, the extended protocol skips to Sync, and exactly one ReadyForQuery carries
        the true transaction status."""
        if extended:
            self._forward(self._poison_parse, Pending("XP", extra=error))
            self.discarding = True
        else:
            self._forward(_POISON_QUERY, Pending("XQ", extra=error))
            self.batch_forwarded = False

    def _parse(self, raw: bytes) -> None:
        p = Parse.decode(raw[5:])
        if not self._identity_ok():
            return
        policy = self.env.policies.current
        v = self.gate.decide_parse(policy, self.s.identity, p.name, p.sql)
        if not v.allowed:
            if self._hold(v, p.sql, True,
                          lambda av: self._parse_admitted(av, p.name, p.sql, raw)):
                return
            err = v.refusal
            assert err is not None
            self._audit_denial(v, err.extra.get("rule") or v.decision.rule, v.decision.reason,
                               v.audit_operation())
            self._refuse(ErrorResponse.make("ERROR", err.sqlstate, err.reason).encode(), True)
            return
        self._parse_admitted(v, p.name, p.sql, raw)

    def _parse_admitted(self, v: Verdict, name: str, sql: str, raw: bytes) -> None:
        self.statements[name] = (v, sql)
        self.described_statements.discard(name)
        self._forward(raw, Pending("P", name=name))

    def _bind(self, raw: bytes) -> None:
        portal, statement, formats = Bind.peek(raw[5:])
        self.portals[portal] = (statement, formats)
        self.described_portals.discard(portal)
        self._forward(raw, Pending("B", name=portal, extra=(statement, formats)))

    def _execute(self, raw: bytes) -> None:
        e = Execute.decode(raw[5:])
        if not self._identity_ok():
            return
        policy = self.env.policies.current
        bound = self.portals.get(e.portal)
        if bound is None:
            # A cursor made by DECLARE (its rows are masked through RowDescription): decide
            # the fetch as the SQL text FETCH would be.
            sql = 'FETCH ALL IN "' + e.portal.replace('"', '""') + '"'
            v, stmt = self.gate.decide(policy, self.s.identity, sql), None
        else:
            stmt = bound[0]
            known = self.statements.get(stmt)
            if known is None:
                v, sql = self.gate.decide_prepared(policy, self.s.identity, stmt), ""
            else:
                v, sql = known
                if v.policy is not policy:  # a new policy version since Parse: decide again
                    v = self.gate.decide(policy, self.s.identity, sql)
                    self.statements[stmt] = (v, sql)
        self._execute_admitted(v, e, raw, sql, policy, stmt)

    def _execute_admitted(self, v: Verdict, e: Execute, raw: bytes, sql: str, policy: Any,
                          stmt: str | None) -> None:
        hold = None if v.allowed else partial(self._execute_approved, e, raw, sql, policy, stmt)
        ex = self._admit(v, sql, policy, stmt, extended=True, hold=hold)
        if ex is None:
            return
        if ex.plan is None and not (e.portal in self.described_portals
                                    or (stmt is not None and stmt in self.described_statements)):
            # Masks are in force and the client never asked for the row shape: ask for it
            # ourselves (the answer is swallowed) so rows are never passed unmasked.
            self._forward(Describe(b"P", e.portal).encode(), Pending("DI", name=e.portal))
        self._forward(raw, Pending("E", ex, name=e.portal))

    def _execute_approved(self, e: Execute, raw: bytes, sql: str, policy: Any,
                          stmt: str | None, av: Verdict) -> None:
        if stmt is not None and stmt in self.statements:
            self.statements[stmt] = (av, sql)  # later executions of it are covered too
        self._execute_admitted(av, e, raw, sql, policy, stmt)

    def _sync(self, raw: bytes) -> None:
        self.discarding = False
        if self.batch_forwarded:
            self._forward(raw, Pending("S"))
        else:
            self._local(RFQ)  # leaves after earlier answers, with the status current then
        self.batch_forwarded = False

    def _function_call(self, raw: bytes) -> None:
        fc = FunctionCall.decode(raw[5:])
        if not self._identity_ok():
            return
        name = self.catalog.functions.get(fc.oid)
        if name is None:
            self.pending_function = (fc, raw)
            self.client_paused = "function"
            self.s.act(LookupFunction(fc.oid))
            return
        self._decide_function(fc, raw, name)

    def _decide_function(self, fc: FunctionCall, raw: bytes, name: str | None) -> None:
        policy = self.env.policies.current
        v = self.gate.decide_function(policy, self.s.identity, name, fc.oid)
        self._function_admitted(v, raw, policy)

    def _function_admitted(self, v: Verdict, raw: bytes, policy: Any) -> None:
        hold = None if v.allowed else (lambda av: self._function_admitted(av, raw, policy))
        ex = self._admit(v, "", policy, hold=hold)
        if ex is None:
            return
        self._forward(raw, Pending("F", ex))
        self.batch_forwarded = False

    def function_found(self, name: str | None) -> None:
        if self.pending_function is None:
            return
        fc, raw = self.pending_function
        self.pending_function = None
        if name is not None:
            self.catalog.functions[fc.oid] = name
        self.client_paused = None
        self._decide_function(fc, raw, name)
        self._resume_client()

    def _resume_client(self) -> None:
        backlog, self.client_backlog = self.client_backlog, []
        self._client_frames(backlog)

    # ---------------------------------------------------------------------------------------
    # approvals (SPEC §6): a `review` statement waits for a human; nothing after it runs first

    def _hold(self, v: Verdict, sql: str, extended: bool,
              resume: Callable[[Verdict], None]) -> bool:
        """Hold a `review` verdict for approval (True), or False when it must be refused
        (another refusal, or no approval store). A grant for every reviewed operation of
        this identity lets it run at once."""
        store = self.env.approvals
        ident = self.s.identity
        if store is None or ident is None or not isinstance(v.refusal, ApprovalRequired):
            return False
        review_ops = [d.operation for d in v.decision.operations if d.effect == "review"]
        if review_ops and all(store.granted(ident, op.fingerprint) for op in review_ops):
            resume(replace(v, refusal=None, approval={"id": None, "state": "granted"}))
            return True
        from addons import masking

        op = review_ops[0] if review_ops else v.operations[0]
        record = dict(v.audit_operation())
        # What the reviewer approves: the statement with detector hits redacted.
        record["statement"] = masking.scrub(sql)[:4000]
        approval = store.create(ident, op, record, v.decision)
        self.held = (approval.id, v, sql, extended, resume)
        self.client_paused = "approval"
        log.info("statement from %s held for approval %s (rule %s)", self.s.client,
                 approval.id, v.decision.rule)
        self.s.act(AwaitApproval(approval.id))
        return True

    def approval_cancelled(self) -> None:
        """The client cancelled the held statement (CancelRequest): the approval expires and
        the statement fails with 57014, as a cancelled statement does in PostgreSQL."""
        if self.held is None:
            return
        approval_id = self.held[0]
        state = self.env.approvals.expire(approval_id)
        self.approval_done(approval_id, "approved" if state == "approved" else "cancelled")

    def approval_done(self, approval_id: str, state: str) -> None:
        """The reviewer decided (approved / denied), the hold timed out (expired) or the
        client cancelled it (cancelled)."""
        if self.held is None or self.held[0] != approval_id:
            return
        _, v, sql, extended, resume = self.held
        self.held = None
        self.client_paused = None
        if state == "cancelled":
            message = "canceling statement due to user request"
            self._audit_denial(v, v.decision.rule, "cancelled by the client while held for "
                               "approval", v.audit_operation(),
                               approval={"id": approval_id, "state": "cancelled"})
            self._refuse(ErrorResponse.make("ERROR", "57014", message).encode(), extended)
        elif state == "approved":
            if not self._identity_ok():  # the hold may outlast the token: FATAL 28P01
                return
            resume(replace(v, refusal=None, approval={"id": approval_id, "state": "approved"}))
        else:  # denied / expired
            from addons.approvals import ApprovalError, ApprovalTimeout

            a = self.env.approvals.get(approval_id)
            err: PortcullisError
            if state == "denied":
                err = ApprovalError(a.decision_reason or "the reviewer denied this statement")
            else:
                err = ApprovalTimeout("no reviewer decided in time")
            message = f"portcullis: {err.error} (approval {approval_id}): {err.reason}"
            self._audit_denial(v, v.decision.rule, err.reason, v.audit_operation(),
                               approval={"id": approval_id, "state": err.error})
            self._refuse(ErrorResponse.make("ERROR", err.sqlstate, message).encode(), extended)
        self._resume_client()

