"""Audit log: one hash-chained JSON line per decision, one per outcome (SPEC §7).

Engine only (no mitmproxy, no asyncio): both the HTTP addons and proxy_db call
`AuditLog.decision()` before forwarding and `AuditLog.outcome()` afterwards. The clock is
injected. If a line cannot be written, `AuditUnavailable` is raised and the caller refuses the
request: nothing goes upstream unaudited.

Each line is `{... , "prev_hash", "hash"}` where `hash` = SHA-256 over the canonical JSON of the
line without `hash` (sorted keys, compact separators, UTF-8) and `prev_hash` is the previous
line's hash (64 zeros for the first line). Editing, deleting or reordering lines breaks the chain.

Canonical JSON is produced by orjson (`OPT_SORT_KEYS`), falling back to the standard library for
values orjson refuses (integers over 64 bits); the two agree byte for byte except that the
standard library writes floats below 1e-4 in exponent form, so `verify_file` accepts a line whose
hash matches either form.

Outcome lines may be deferred (`outcome(..., defer=True)`): they are chained and hashed at once,
kept in memory, and written with the next line that must be on disk before something is
forwarded (any decision), or by `flush()`. A decision line is never deferred.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import orjson

from addons.model import AuditUnavailable, Decision, Identity

GENESIS = "0" * 64
log = logging.getLogger("portcullis.audit")


def _stdlib_canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def canonical(record: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:
        # orjson refuses integers over 64 bits, which the standard library writes exactly;
        # anything else it refuses (objects, non-string keys) the standard library refuses too.
        return _stdlib_canonical(record)


def record_hash(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical(body)).hexdigest()


def _hash_matches(record: dict[str, Any]) -> bool:
    body = {k: v for k, v in record.items() if k != "hash"}
    want = record["hash"]
    if hashlib.sha256(canonical(body)).hexdigest() == want:
        return True
    try:  # the standard library's float spelling (1e-05), as older lines were written
        return hashlib.sha256(_stdlib_canonical(body)).hexdigest() == want
    except (TypeError, ValueError):
        return False


_second: tuple[int, str] = (-1, "")


def _iso(ts: float) -> str:
    """RFC 3339 UTC with milliseconds (truncated); the date part is formatted once a second."""
    global _second
    sec = int(ts)
    cached = _second
    if cached[0] != sec:
        cached = (sec, datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
        _second = cached
    ms = min(999, round((ts - sec) * 1_000_000) // 1000)
    return f"{cached[1]}.{ms:03d}Z"


# Record ids: 48 random bits per process and a counter (unique, cheap; ids are not secrets).
_ID_PREFIX = secrets.token_hex(6)
_id_counter = itertools.count(1)


def new_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter) & 0xFFFFFFFF:08x}"


class AuditLog:
    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time,
                 fsync: bool = False) -> None:
        self.path = Path(path)
        self.clock = clock
        self.fsync = fsync
        self.lock = threading.Lock()
        self.prev_hash = GENESIS
        self._fh: Any = None
        self._pending: list[bytes] = []  # deferred lines, already chained
        # repeated_decision(): (identity, operation, decision, LineTemplate) by their ids
        self._templates: dict[tuple[Any, ...], tuple[Any, Any, Any, LineTemplate]] = {}
        self._open()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            last = _last_line(self.path)
            if last:
                try:
                    self.prev_hash = json.loads(last)["hash"]
                except (ValueError, KeyError, TypeError):
                    # A broken tail: keep chaining from its raw hash so verify names the bad line.
                    self.prev_hash = hashlib.sha256(last.encode()).hexdigest()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._fh = os.fdopen(fd, "ab", buffering=0)

    def close(self) -> None:
        with self.lock:
            if self._fh is not None:
                try:
                    self._write_out([])
                except OSError:
                    log.error("audit: %d deferred line(s) could not be written at close",
                              len(self._pending))
                self._fh.close()
                self._fh = None

    @property
    def pending(self) -> int:
        """Deferred lines not yet on disk."""
        return len(self._pending)

    def flush(self) -> None:
        """Write deferred lines. Raises AuditUnavailable when they cannot be written (they stay
        pending, so the chain on disk never skips a line)."""
        with self.lock:
            if not self._pending:
                return
            try:
                self._write_out([])
            except OSError as e:
                raise AuditUnavailable(f"audit log cannot be written: {type(e).__name__}") from e

    def _write_out(self, lines: list[bytes]) -> None:
        if self._fh is None:
            raise OSError("audit log is closed")
        data = b"".join(self._pending + lines) if self._pending else b"".join(lines)
        if not data:
            return
        written = self._fh.write(data)
        if written != len(data):
            raise OSError("short write")
        if self.fsync:
            os.fsync(self._fh.fileno())
        self._pending.clear()

    def write(self, record: dict[str, Any], defer: bool = False) -> dict[str, Any]:
        """Chain, hash and append one record (with any deferred lines before it). Raises
        AuditUnavailable on any failure. `defer=True` chains the record now and leaves the
        writing to the next non-deferred write or `flush()`."""
        with self.lock:
            try:
                if self._fh is None:
                    raise OSError("audit log is closed")
                rec = dict(record)
                rec["prev_hash"] = self.prev_hash
                # Serialise once: the hash covers the canonical form without "hash", and the
                # line is that form with the hash appended (verify re-canonicalises anyway).
                rec["hash"] = self._append(canonical(rec), defer)
            except (OSError, ValueError, TypeError) as e:
                raise AuditUnavailable(f"audit log cannot be written: {type(e).__name__}") from e
            return rec

    def _append(self, body: bytes, defer: bool) -> str:
        """Hash `body` (a canonical record with `prev_hash`, lock held), append the line, move
        the chain on; returns the hash."""
        digest = hashlib.sha256(body).hexdigest()
        line = body[:-1] + b',"hash":"' + digest.encode() + b'"}\n'
        if defer:
            self._pending.append(line)
        else:
            self._write_out([line])
        self.prev_hash = digest
        return digest

    def decision(self, *, protocol: str, target: str | None, client: str | None,
                 identity: Identity | None, operation: dict[str, Any],
                 decision: Decision | None, effect: str | None = None,
                 rules: list[str] | None = None, reason: str | None = None,
                 approval: Any = None, record_id: str | None = None) -> str:
        """Write a decision line; returns its id. `effect`/`rules` override for refusals made
        before policy ran (unauthenticated, unknown target, bad request)."""
        rid = record_id or new_id()
        rec = self._decision_record(protocol, target, client, identity, operation, decision,
                                    effect, rules, reason, approval)
        rec["id"] = rid
        rec["time"] = _iso(self.clock())
        self.write(rec)
        return rid

    @staticmethod
    def _decision_record(protocol: str, target: str | None, client: str | None,
                         identity: Identity | None, operation: dict[str, Any],
                         decision: Decision | None, effect: str | None, rules: Any,
                         reason: str | None, approval: Any) -> dict[str, Any]:
        eff = effect or (decision.effect if decision else "deny")
        return {
            "id": "",
            "type": "decision",
            "time": "",
            "protocol": protocol,
            "target": target,
            "client": client,
            "identity": identity.to_json() if identity else None,
            "operation": operation,
            "decision": eff,
            "rules": list(rules if rules is not None else (decision.rules if decision else [])),
            "reason": _scrubbed_reason(
                reason if reason is not None else (decision.reason if decision else None)),
            "approval": approval,
        }

    def repeated_decision(self, *, protocol: str, target: str | None, client: str | None,
                          identity: Identity | None, operation: dict[str, Any],
                          decision: Decision) -> str:
        """`decision()` for a caller that passes the very same identity, operation dict (never
        modified) and decision again and again: every execution of a prepared statement in
        one Postgres session. The fixed part of the line is serialised once
        (`LineTemplate`); each line is then assembled from it, byte-identical to what
        `decision()` writes."""
        key = (protocol, target, client, id(identity), id(operation), id(decision))
        hit = self._templates.get(key)
        if hit is None or hit[0] is not identity or hit[1] is not operation \
                or hit[2] is not decision:
            rec = self._decision_record(protocol, target, client, identity, operation,
                                        decision, None, None, None, None)
            tpl = LineTemplate.build(rec)
            if tpl is None:  # a value only the standard library serialises: no shortcut
                return self.decision(protocol=protocol, target=target, client=client,
                                     identity=identity, operation=operation,
                                     decision=decision)
            if len(self._templates) >= 4096:
                self._templates.clear()
            hit = self._templates[key] = (identity, operation, decision, tpl)
        rid = new_id()
        ts = _iso(self.clock())
        c0, c1, c2, c3 = hit[3].chunks
        with self.lock:
            try:
                if self._fh is None:
                    raise OSError("audit log is closed")
                self._append(b"".join((c0, rid.encode(), c1, self.prev_hash.encode(), c2,
                                       ts.encode(), c3)), False)
            except (OSError, ValueError, TypeError) as e:
                raise AuditUnavailable(f"audit log cannot be written: {type(e).__name__}") from e
        return rid

    def outcome(self, decision_id: str, outcome: dict[str, Any], masked: dict[str, Any] | None,
                duration_ms: float | None, defer: bool = False) -> str:
        rid = new_id()
        masked = masked or {"count": 0, "rules": []}
        dur = round(duration_ms, 3) if duration_ms is not None else None
        ts = _iso(self.clock())
        try:
            # The canonical line, written out (keys in sorted order) rather than sorted and
            # serialised as a dict: the same bytes (tests/test_audit.py), a third of the cost.
            head = b"".join((b'{"decision_id":', orjson.dumps(decision_id), b',"duration_ms":',
                             orjson.dumps(dur), b',"id":"', rid.encode(), b'","masked":',
                             orjson.dumps(masked, option=orjson.OPT_SORT_KEYS), b',"outcome":',
                             orjson.dumps(outcome, option=orjson.OPT_SORT_KEYS),
                             b',"prev_hash":"'))
        except orjson.JSONEncodeError:
            head = b""
        if not head:
            self.write({"id": rid, "type": "outcome", "time": ts, "decision_id": decision_id,
                        "outcome": outcome, "masked": masked, "duration_ms": dur}, defer=defer)
            return rid
        tail = b'","time":"' + ts.encode() + b'","type":"outcome"}'
        with self.lock:
            try:
                if self._fh is None:
                    raise OSError("audit log is closed")
                self._append(head + self.prev_hash.encode() + tail, defer)
            except (OSError, ValueError, TypeError) as e:
                raise AuditUnavailable(f"audit log cannot be written: {type(e).__name__}") from e
        return rid


class LineTemplate:
    """The canonical JSON of a record whose only changing fields are `id`, `prev_hash` and
    `time` (plain ASCII: hex ids and hashes, RFC 3339 times), cut into the four pieces around
    them. `build()` checks the pieces against `canonical()` once and returns None when they
    disagree, so a template never writes a line `verify_file` would reject."""

    __slots__ = ("chunks",)
    PROBE = ("0123456789abcdef0000", "f" * 64, "2000-01-01T00:00:00.000Z")

    def __init__(self, chunks: tuple[bytes, bytes, bytes, bytes]) -> None:
        self.chunks = chunks

    @classmethod
    def build(cls, record: dict[str, Any]) -> LineTemplate | None:
        dynamic = ("id", "prev_hash", "time")
        pieces: list[bytes] = []
        cur = b"{"
        try:
            for n, key in enumerate(sorted({**record, **dict.fromkeys(dynamic, "")})):
                sep = b"," if n else b""
                if key in dynamic:
                    pieces.append(cur + sep + orjson.dumps(key) + b':"')
                    cur = b'"'
                else:
                    cur += sep + orjson.dumps(key) + b":" + orjson.dumps(
                        record[key], option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError:
            return None
        pieces.append(cur + b"}")
        if len(pieces) != 4:
            return None
        c0, c1, c2, c3 = pieces
        rid, prev, ts = cls.PROBE
        probe = {**record, "id": rid, "prev_hash": prev, "time": ts}
        if c0 + rid.encode() + c1 + prev.encode() + c2 + ts.encode() + c3 != canonical(probe):
            return None
        return cls((c0, c1, c2, c3))


@lru_cache(maxsize=1024)
def _scrubbed_reason(reason: str | None) -> str | None:
    """Refusal reasons can quote what the client sent (a Kubernetes fieldSelector, a path):
    detector hits in them are redacted like the operation summary. Most reasons are a
    rule's fixed text, hence the cache."""
    if not reason:
        return reason
    from addons import masking

    return masking.scrub(reason)


def _last_line(path: Path) -> str:
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        block = b""
        pos = size
        while pos > 0:
            step = min(4096, pos)
            pos -= step
            fh.seek(pos)
            block = fh.read(step) + block
            if block.rstrip(b"\n").count(b"\n") >= 1:
                break
        lines = block.rstrip(b"\n").split(b"\n")
        return lines[-1].decode("utf-8", "replace") if lines and lines[-1] else ""


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    records: int
    bad_line: int | None = None
    message: str = ""


def iter_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with Path(path).open("r", encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if line.strip():
                yield n, json.loads(line)


def verify_file(path: str | Path) -> VerifyResult:
    """Check the hash chain; name the first bad line."""
    prev = GENESIS
    count = 0
    ids: set[str] = set()
    try:
        fh = Path(path).open("r", encoding="utf-8")
    except OSError as e:
        return VerifyResult(False, 0, None, f"cannot read {path}: {e.strerror}")
    with fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                return VerifyResult(False, count, n, "empty line")
            try:
                rec = json.loads(line)
            except ValueError:
                return VerifyResult(False, count, n, "not valid JSON")
            if not isinstance(rec, dict) or "hash" not in rec or "prev_hash" not in rec:
                return VerifyResult(False, count, n, "missing hash fields")
            if rec["prev_hash"] != prev:
                return VerifyResult(False, count, n, "prev_hash does not match the previous "
                                    "record (line deleted, inserted or reordered)")
            if not _hash_matches(rec):
                return VerifyResult(False, count, n, "hash mismatch (record edited)")
            rid = rec.get("id")
            if not isinstance(rid, str) or not rid:
                return VerifyResult(False, count, n, "record without an id")
            if rec.get("type") == "outcome" and rec.get("decision_id") not in ids:
                return VerifyResult(False, count, n, "outcome refers to an unknown decision")
            ids.add(rid)
            prev = rec["hash"]
            count += 1
    return VerifyResult(True, count)


# ---------------------------------------------------------------------------------------------
# mitmproxy adapter


def operation_record(op: Any) -> dict[str, Any]:
    """`op.to_json()` with detector hits redacted in its free-text fields (summary, HTTP path,
    exec/attach command), for the audit log and the approvals store: nothing the gateway writes
    holds such a value (SPEC §7). The operation itself is not modified."""
    from addons import masking

    rec = op.to_json()
    rec["summary"] = masking.scrub(rec.get("summary") or "")
    if op.http and op.http.get("path"):
        rec["http"] = {**op.http, "path": masking.scrub(op.http["path"])}
    if op.kubernetes and op.kubernetes.get("command"):
        rec["kubernetes"] = {**op.kubernetes, "command": masking.scrub(op.kubernetes["command"])}
    return rec


def _http_operation_record(flow: Any) -> dict[str, Any]:
    from addons import flows, masking

    ops = flow.metadata.get(flows.OPERATIONS)
    if ops:
        if len(ops) == 1:
            rec = operation_record(ops[0])
        else:
            rec = {"operations": [operation_record(o) for o in ops],
                   "summary": "; ".join(o.summary for o in ops)}
    else:
        req = flow.request
        path = req.path.split("?", 1)[0] if req.method != "CONNECT" else ""
        rec = {"protocol": "http", "summary": f"{req.method} {req.host}:{req.port}{path}"}
    rec["summary"] = masking.scrub(rec.get("summary", ""))
    return rec


class AuditAddon:
    """Writes the decision line before a request is forwarded, the outcome line after."""

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit
        self.decisions = logging.getLogger("portcullis.decisions")

    def _decide_line(self, flow: Any) -> None:
        from addons import flows

        target = flow.metadata.get(flows.TARGET)
        identity = flow.metadata.get(flows.IDENTITY)
        decision = flow.metadata.get(flows.DECISION)
        refused = flow.metadata.get(flows.REFUSED)
        effect = rules = reason = None
        if refused is not None and (decision is None or decision.effect == "allow"):
            effect, rules, reason = "deny", [refused.error], refused.reason
        op = _http_operation_record(flow)
        approval = None
        if flow.metadata.get(flows.APPROVED) or flow.metadata.get(flows.APPROVAL):
            approval = {"id": flow.metadata.get(flows.APPROVAL),
                        "state": "approved" if flow.metadata.get(flows.APPROVED) else (
                            refused.error if refused is not None else None)}
            if flow.metadata.get(flows.APPROVED) == "grant":
                approval["state"] = "granted"
        rid = self.audit.decision(
            protocol=target.protocol if target else "http",
            target=target.name if target else None, client=flows.client_address(flow),
            identity=identity, operation=op, decision=decision, effect=effect, rules=rules,
            reason=reason, approval=approval, record_id=flows.request_id(flow))
        flow.metadata[flows.AUDIT_ID] = rid
        flow.metadata[flows.STARTED] = time.monotonic()
        from addons.metrics import DECISIONS

        DECISIONS.labels(target.protocol if target else "http",
                         effect or (decision.effect if decision else "deny")).inc()
        self.decisions.info(
            "%s %s sub=%s target=%s rules=%s id=%s",
            (effect or (decision.effect if decision else "deny")).upper(), op["summary"],
            identity.sub if identity else "-", target.name if target else "-",
            ",".join(rules if rules is not None else (decision.rules if decision else [])) or "-",
            rid)

    def _guarded(self, flow: Any, proxy: bool) -> None:
        from addons import flows
        from addons.model import AuditUnavailable

        try:
            self._decide_line(flow)
        except Exception as e:  # noqa: BLE001 - unaudited means refused
            err = e if isinstance(e, AuditUnavailable) else AuditUnavailable(
                f"audit failed: {type(e).__name__}")
            flows.log.error("audit write failed; refusing request %s", flows.request_id(flow))
            flows.refuse(flow, err, proxy=proxy)

    def http_connect(self, flow: Any) -> None:
        # Only refusals at CONNECT are decisions; an accepted tunnel carries requests that are
        # each decided and audited on their own.
        if flow.response is not None:
            self._guarded(flow, proxy=True)

    def request(self, flow: Any) -> None:
        self._guarded(flow, proxy=False)

    def _outcome(self, flow: Any, outcome: dict[str, Any], again: bool = False) -> bool:
        """Write the outcome line (once per flow, or `again`); False when it could not be
        written."""
        from addons import flows

        rid = flow.metadata.get(flows.AUDIT_ID)
        if rid is None or (flow.metadata.get("portcullis.outcome_written") and not again):
            return True
        flow.metadata["portcullis.outcome_written"] = True
        started = flow.metadata.get(flows.STARTED)
        duration = (time.monotonic() - started) * 1000 if started is not None else None
        try:
            self.audit.outcome(rid, outcome, flow.metadata.get(flows.MASKED), duration)
        except Exception:  # noqa: BLE001 - reported by the caller
            flows.log.error("audit outcome for %s could not be written", rid)
            return False
        return True

    def response(self, flow: Any) -> None:
        from addons import flows
        from addons.model import AuditUnavailable

        if flow.response is None:
            return
        if not self._outcome(flow, {"status": flow.response.status_code}) and (
                not flow.response.stream):
            # The answer has not left the gateway yet: an unaudited answer is not delivered.
            flows.refuse(flow, AuditUnavailable("audit log cannot be written; answer withheld"))

    def error(self, flow: Any) -> None:
        self._outcome(flow, {"error": str(flow.error.msg) if flow.error else "error"})

    def websocket_end(self, flow: Any) -> None:
        from addons import flows

        # The upgrade's outcome (101) was written when the WebSocket opened; a session in which
        # something was masked (exec output) gets a second outcome line saying what, at its end.
        masked = (flow.metadata.get(flows.MASKED) or {}).get("count")
        self._outcome(flow, {"status": 101, "websocket": "closed"}, again=bool(masked))
