"""The upstream -> client half of the READY phase (see relay.py for the rules).

`Answers` is mixed into `relay.Relay`, which owns the state: every upstream message is matched
with the `Pending` entry it completes, result rows go through their row plan, upstream errors,
notices and notification payloads are scrubbed, and each execution's outcome is audited.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

from addons.model import PortcullisError
from proxy_db import results
from proxy_db.backend import (
    CommandComplete,
    ErrorResponse,
    FunctionCallResponse,
    NoticeResponse,
    NotificationResponse,
    ParameterStatus,
    ReadyForQuery,
    RowDescription,
)
from proxy_db.catalog import CatalogCache, Relation
from proxy_db.framing import MessageFramer
from proxy_db.gate import Verdict
from proxy_db.messages import ProtocolError
from proxy_db.session import LookupRelations, pinned_ok, write_outcome

log = logging.getLogger("portcullis.postgres")
RFQ = None  # a Local whose data is RFQ is ReadyForQuery with the status current when it leaves
_RFQ_BYTES = {s: ReadyForQuery(s).encode() for s in (b"I", b"T", b"E")}


class Pending:
    """An upstream answer we are waiting for. kind: Q F P B DS DP DI E C S, or XQ / XP for
    the failing statement that stands in for a refused one (`extra` = our error)."""

    __slots__ = ("kind", "ex", "name", "extra")

    def __init__(self, kind: str, ex: Exec | None = None, name: str = "", extra: Any = None):
        self.kind = kind
        self.ex = ex
        self.name = name
        self.extra = extra


class Local:
    __slots__ = ("data",)

    def __init__(self, data: bytes | None) -> None:
        self.data = data


class Exec:
    """One decided execution: a Query message, an Execute, or a fast-path call."""

    __slots__ = ("verdict", "audit_id", "started", "rows", "masked", "masked_cols",
                 "masked_rules", "plan", "rowdesc", "sql", "index", "error", "tag", "policy",
                 "statement")

    def __init__(self, verdict: Verdict, audit_id: str | None, started: float, sql: str,
                 policy: Any, statement: str | None = None) -> None:
        self.verdict = verdict
        self.audit_id = audit_id
        self.started = started
        self.sql = sql
        self.policy = policy
        self.statement = statement  # extended: the prepared statement name
        self.rows = 0
        self.masked = 0
        self.masked_cols: set[str] = set()
        self.masked_rules: set[str] = set()
        # plan: results.PASS (no masking), None (not known yet), or a RowPlan
        self.plan: Any = results.PASS if not getattr(policy, "masks", None) else None
        # (raw RowDescription message, Bind result formats to apply) once known
        self.rowdesc: tuple[bytes, tuple[int, ...]] | None = None
        self.index = 0  # statement index within a Query message
        self.error: str | None = None
        self.tag: str | None = None


class Answers:
    """Upstream side of `relay.Relay` (state is initialised there)."""

    s: Any
    env: Any
    txn: bytes
    uf: MessageFramer
    queue: deque[Pending | Local]
    discarding: bool
    catalog: CatalogCache
    portals: dict[str, tuple[str, tuple[int, ...]]]
    portal_rowdesc: dict[str, bytes]
    stmt_rowdesc: dict[str, bytes]
    plans: dict[tuple[Any, ...], tuple[Any, int, Any]]
    upstream_backlog: list[tuple[bytes, bytes]]
    upstream_paused: str | None
    upstream_portals: dict[str, tuple[str, tuple[int, ...]]]
    _detectors_policy: Any
    _detectors: tuple[str, ...]

    def _check_backlog(self, backlog: list[tuple[bytes, bytes]]) -> None:
        if sum(len(r) for _, r in backlog) > self.env.limits.buffered:
            raise ProtocolError("too much data while waiting for the catalog")

    # ---------------------------------------------------------------------------------------
    # upstream -> client

    def upstream_data(self, data: bytes) -> None:
        frames = self.uf.feed(data)
        if self.upstream_paused:
            self.upstream_backlog.extend(frames)
            self._check_backlog(self.upstream_backlog)
            return
        self._upstream_frames(frames)

    def _upstream_frames(self, frames: list[tuple[bytes, bytes]]) -> None:
        out = self.s._out_client
        n = len(frames)
        i = 0
        while i < n:
            if self.s.closed:
                return
            if self.upstream_paused:
                self.upstream_backlog.extend(frames[i:])
                return
            t, raw = frames[i]
            if t == b"D":
                head = self.queue[0] if self.queue else None
                ex = head.ex if isinstance(head, Pending) else None
                if ex is None:
                    raise ProtocolError("DataRow outside a statement")
                plan = ex.plan
                if plan is None:
                    if not self._make_plan(ex):
                        continue  # paused for a catalog lookup: this row is re-read on resume
                    plan = ex.plan
                ex.rows += 1
                out.append(raw if plan is results.PASS else plan.apply(raw, ex))
            else:
                self._upstream_message(t, raw)
            i += 1

    def _drain(self) -> None:
        q = self.queue
        while q:
            item = q[0]
            if not isinstance(item, Local):
                break
            q.popleft()
            self.s.send_client(_RFQ_BYTES[self.txn] if item.data is None else item.data)

    def _complete(self) -> Pending:
        p = self.queue.popleft()
        assert isinstance(p, Pending)
        self._drain()
        return p

    def _upstream_message(self, t: bytes, raw: bytes) -> None:
        if t in (b"N", b"S", b"A"):
            self._async_message(t, raw)
            return
        self._drain()
        if not self.queue:
            if t == b"E":  # e.g. FATAL on administrator shutdown
                self.s.send_client(self._scrub_error(raw, None))
                return
            raise ProtocolError(f"unsolicited upstream message {t!r}")
        head = self.queue[0]
        assert isinstance(head, Pending)
        kind = head.kind
        if t == b"E":
            self._upstream_error(head, raw)
            return
        if kind == "XQ" and t in (b"I", b"Z"):
            if t == b"Z":
                self.txn = raw[5:6]
            self.s.send_client(raw)
            if t == b"Z":
                self._complete()
        elif kind in ("Q", "F"):
            self._in_query(head, t, raw)
        elif kind == "E":
            self._in_execute(head, t, raw)
        elif kind == "P" and t == b"1":
            self.stmt_rowdesc.pop(head.name, None)
            self.s.send_client(raw)
            self._complete()
        elif kind == "B" and t == b"2":
            self.portal_rowdesc.pop(head.name, None)
            self.upstream_portals[head.name] = head.extra
            self.s.send_client(raw)
            self._complete()
        elif kind in ("DS", "DP", "DI") and t in (b"t", b"T", b"n"):
            if t == b"T":
                self._remember_rowdesc(head, raw)
            if kind != "DI":
                self.s.send_client(raw)
            if t != b"t":
                self._complete()
        elif kind == "C" and t == b"3":
            self.s.send_client(raw)
            self._complete()
        elif kind == "S" and t == b"Z":
            self.txn = raw[5:6]
            self.s.send_client(raw)
            self._complete()
        else:
            raise ProtocolError(f"upstream sent {t!r} while {kind} was pending")

    def _remember_rowdesc(self, head: Pending, raw: bytes) -> None:
        """Keep the raw RowDescription (decoded only when a plan is built)."""
        if head.kind == "DS":
            self.stmt_rowdesc[head.name] = raw
        else:
            self.portal_rowdesc[head.name] = raw

    def _in_query(self, head: Pending, t: bytes, raw: bytes) -> None:
        ex = head.ex
        assert ex is not None
        if t == b"T":
            if ex.plan is not results.PASS:
                ex.rowdesc = (raw, ())
                ex.plan = None
            self.s.send_client(raw)
        elif t in (b"C", b"I"):
            if t == b"C":
                ex.tag = CommandComplete.decode(raw[5:]).tag
            ex.index += 1
            ex.rowdesc = None
            if ex.plan is not results.PASS and head.kind == "Q":
                ex.plan = None
            self.s.send_client(raw)
        elif t == b"Z":
            self.txn = raw[5:6]
            self._finish(ex)
            self.s.send_client(raw)
            self._complete()
        elif t == b"H" or t == b"W":
            self._copy_out(ex, raw)
        elif t == b"V" and ex.verdict.masks:
            # A fast-path result has no column to match: under any mask it is withheld.
            ex.masked += 1
            ex.masked_rules.update(m.id for m in ex.verdict.masks)
            self.s.send_client(FunctionCallResponse(None).encode())
        elif t == b"d":
            self._copy_data(ex, raw)
        elif t in (b"G", b"c", b"V"):
            self.s.send_client(raw)
        else:
            raise ProtocolError(f"upstream sent {t!r} during a query")

    def _copy_out(self, ex: Exec, raw: bytes) -> None:
        """COPY TO STDOUT began. The gate refused it if a column mask may apply; detector
        masks are applied to each text/CSV line; binary COPY under masks ends the session."""
        masks = [m for m in ex.verdict.masks if m.detectors]
        if [m for m in ex.verdict.masks if m.columns] or (masks and raw[5:6] == b"\x01"):
            self.s.refuse(PortcullisError("masked COPY"), "portcullis: COPY output of masked "
                          "data refused")
            return
        ex.plan = results.CopyMasker(masks, self.env.mask_key) if masks else results.PASS
        self.s.send_client(raw)

    def _copy_data(self, ex: Exec, raw: bytes) -> None:
        if ex.plan is None or ex.plan is results.PASS:
            self.s.send_client(raw)
        else:
            self.s.send_client(ex.plan.apply_copy(raw, ex))

    def _in_execute(self, head: Pending, t: bytes, raw: bytes) -> None:
        ex = head.ex
        assert ex is not None
        if t in (b"C", b"I", b"s"):
            if t == b"C":
                ex.tag = CommandComplete.decode(raw[5:]).tag
            self._finish(ex)
            self.s.send_client(raw)
            self._complete()
        elif t in (b"H", b"W"):
            self._copy_out(ex, raw)
        elif t == b"d":
            self._copy_data(ex, raw)
        elif t in (b"G", b"c"):
            self.s.send_client(raw)
        else:
            raise ProtocolError(f"upstream sent {t!r} during Execute")

    def _upstream_error(self, head: Pending, raw: bytes) -> None:
        ex = head.ex
        if head.kind in ("XQ", "XP"):
            self.s.send_client(head.extra)  # our refusal in place of the stand-in's error
        else:
            self.s.send_client(self._scrub_error(raw, ex))
        if ex is not None:
            ex.error = ErrorResponse.decode(raw[5:]).sqlstate or "XX000"
        if head.kind in ("Q", "F", "S", "XQ"):
            return  # ReadyForQuery follows
        if ex is not None:
            self._finish(ex)
        # The upstream now skips to Sync: so do we (and so do gateway errors of this batch).
        q = self.queue
        if not any(isinstance(p, Pending) and p.kind == "S" for p in q):
            self.discarding = True  # the client has not sent this batch's Sync yet
        while q and not (isinstance(q[0], Pending) and q[0].kind == "S"):
            item = q.popleft()
            if isinstance(item, Local):
                self.s.send_client(_RFQ_BYTES[self.txn] if item.data is None else item.data)
            elif isinstance(item, Pending) and item.ex is not None and item.ex is not ex:
                item.ex.error = "skipped"
                self._finish(item.ex)

    def _async_message(self, t: bytes, raw: bytes) -> None:
        if t == b"S":
            ps = ParameterStatus.decode(raw[5:])
            if not pinned_ok(ps.name, ps.value):
                self.s.refuse(ProtocolError("unsafe setting"),
                              f"portcullis: {ps.name} changed to {ps.value!r}; the gateway "
                              "requires UTF8 and standard_conforming_strings=on")
                return
            self.s.send_client(raw)
        elif t == b"N":
            head = self.queue[0] if self.queue else None
            self.s.send_client(self._scrub_error(raw, head.ex if isinstance(head, Pending)
                                                 else None))
        elif self.env.policies.current.masks:  # 'A': a NOTIFY payload is data too
            n = NotificationResponse.decode(raw[5:])
            payload = results.redact(n.payload, self._policy_detectors())
            self.s.send_client(raw if payload == n.payload else NotificationResponse(
                n.pid, n.channel, payload).encode())
        else:
            self.s.send_client(raw)

    def _scrub_error(self, raw: bytes, ex: Exec | None) -> bytes:
        policy = self.env.policies.current
        if not policy.masks:
            return raw
        cls = NoticeResponse if raw[:1] == b"N" else ErrorResponse
        msg = cls.decode(raw[5:])
        hide = ex is not None and bool(ex.verdict.column_masks or isinstance(ex.plan,
                                                                             results.RowPlan))
        return cls(results.scrub_error_fields(msg.fields, self._policy_detectors(), hide)
                   ).encode()

    def _policy_detectors(self) -> tuple[str, ...]:
        """Every detector of the policy in force: for text that belongs to no result column
        (errors, notices, notification payloads)."""
        policy = self.env.policies.current
        if policy is not self._detectors_policy:
            self._detectors_policy = policy
            self._detectors = tuple(sorted({d for m in policy.masks for d in m.detectors}))
        return self._detectors

    # ---------------------------------------------------------------------------------------
    # result masking

    def _make_plan(self, ex: Exec) -> bool:
        """Build the row plan for `ex`; False when paused for a catalog lookup (or refused)."""
        if ex.rowdesc is None:
            head = self.queue[0]
            if isinstance(head, Pending) and head.kind == "E":
                ex.rowdesc = self._rowdesc_for(head)
            if ex.rowdesc is None:
                self.s.refuse(PortcullisError("no row description"), "portcullis: result "
                              "rows without a known row shape cannot be masked")
                return False
        raw, formats = ex.rowdesc
        key = (raw, formats, ex.verdict.mask_ids, ex.verdict.normalized, ex.index)
        cached = self.plans.get(key)
        if cached is not None and cached[0] is ex.policy and cached[1] == self.catalog.generation:
            ex.plan = cached[2]
            return True
        rd = results.with_formats(RowDescription.decode(raw[5:]), formats)
        need = results.lookups_needed(rd, ex, self.catalog)
        if need is not None:
            oids, names = need
            self.upstream_paused = "catalog"
            self.s.act(LookupRelations(frozenset(oids), frozenset(names)))
            return False
        ex.plan = results.build_plan(rd, ex, self.catalog, self.s.identity, self.s.target.name,
                                     self.env.mask_key)
        if len(self.plans) > 1024:
            self.plans.clear()
        self.plans[key] = (ex.policy, self.catalog.generation, ex.plan)
        return True

    def _rowdesc_for(self, head: Pending) -> tuple[bytes, tuple[int, ...]] | None:
        raw = self.portal_rowdesc.get(head.name)
        if raw is not None:
            return raw, ()
        bound = self.upstream_portals.get(head.name)
        if bound is not None and bound[0] in self.stmt_rowdesc:
            return self.stmt_rowdesc[bound[0]], bound[1]
        return None

    def relations_found(self, relations: list[Relation], names: frozenset[str]) -> None:
        for rel in relations:
            self.catalog.add(rel)
        for name in names:  # remember misses too, so a lookup never repeats forever
            self.catalog.names.setdefault(name, -1)
        self.upstream_paused = None
        backlog, self.upstream_backlog = self.upstream_backlog, []
        self._upstream_frames(backlog)

    def lookup_failed(self, reason: str) -> None:
        log.error("catalog lookup failed: %s", reason)
        self.s.refuse(PortcullisError("catalog"), "portcullis: cannot resolve result columns "
                      "for masking; refusing to send unmasked rows")

    def _finish(self, ex: Exec) -> None:
        if ex.verdict.changes_catalog:
            self.catalog.clear()
        if ex.audit_id is None:
            return
        outcome: dict[str, Any] = {"status": "error" if ex.error else "ok", "rows": ex.rows}
        if ex.error:
            outcome["sqlstate"] = ex.error
        if ex.tag:
            outcome["command"] = ex.tag.split(" ", 1)[0]
        masked = {"count": ex.masked, "rules": sorted(ex.masked_rules),
                  "columns": sorted(ex.masked_cols)}
        args = (ex.audit_id, outcome, masked, (self.env.monotonic() - ex.started) * 1000)
        ex.audit_id = None
        if self.env.defer_outcomes:
            # The server chains it after sending upstream and writes it before the answer.
            self.s.deferred.append(args)
        else:
            write_outcome(self.env.audit, args)
