"""Recordings of Postgres sessions (SPEC §7): statements as audited, results as the client got them.

Sans-IO: `SessionRecording` is fed by the session (`statement()` from the relay's decisions,
`to_client()` from `Session.take()`) and hands finished `Segment`s to a sink (`Env.recorder`).
`render()` turns a segment into the `(from_client, text, timestamp)` messages of one mitmproxy
TCP flow; `SegmentWriter`, the sink the server uses, renders and writes them
(`addons.recorder.Recorder.record_tcp`) on one background thread, in order.

What is recorded:
- client -> server: each decided statement as the audit has it (the normalised text, constants
  replaced by $n) and `[denied by rule X]` for a refused one. The client's own bytes are never
  kept: not the password message (the agent's token), not Bind parameters, not COPY FROM data.
- server -> client: the backend messages the CLIENT received (after masking), taken from the
  bytes the session sent, rendered as text tables; errors and notices as sent. The upstream's
  raw answers and the upstream login never pass through here.
- the writer replaces every configured secret, and `Recorder.record_tcp` runs
  `addons.masking.scrub` over the text (defence in depth: masked values are already replaced in
  what the client got; detector hits in unmasked columns are redacted in the recording too).

Hot path: `statement()` appends a tuple, `to_client()` a reference to bytes already joined
for the socket. Nothing is decoded until a segment is rendered (off the event loop).

Caps (memory and file size):
- MAX_MESSAGES (200) messages per segment (statements + answers); a longer session becomes
  several TCP flows, numbered by `metadata["portcullis"]["segment"]`; MAX_SEGMENT_BYTES (8 MiB)
  held per segment also ends it early.
- MAX_ROWS (100) rows or COPY lines per result, then `... N more rows`.
- MAX_ANSWER_BYTES (1 MiB) of kept messages per answer, then `... N more messages not recorded`;
  an answer's unread bytes are reduced every COMPACT_BYTES (256 KiB), so a huge result costs
  bounded memory.
- MAX_CELL (200) characters per value, MAX_STATEMENT (4,000) per statement, MAX_TEXT (64 Ki)
  per rendered message.
"""

from __future__ import annotations

import logging
import re
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from itertools import zip_longest
from typing import Any

from proxy_db.backend import (
    ErrorResponse,
    FunctionCallResponse,
    NotificationResponse,
    ParameterStatus,
)

log = logging.getLogger("portcullis.recorder")

MAX_MESSAGES = 200
MAX_SEGMENT_BYTES = 8 << 20
MAX_ROWS = 100
MAX_ANSWER_BYTES = 1 << 20
COMPACT_BYTES = 256 << 10
MAX_CELL = 200
MAX_STATEMENT = 4000
MAX_TEXT = 64 << 10
MARKER = "[removed by portcullis]"

_HDR = struct.Struct("!cI")
_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
Columns = tuple[tuple[str, int], ...]  # (name, format code) of a RowDescription
_ROWS = frozenset((b"D", b"d"))
# Messages that end a result (the row count starts again) and messages never rendered.
_BOUNDARY = frozenset((b"T", b"C", b"I", b"E", b"H", b"W", b"Z", b"s"))
_SILENT = frozenset((b"R", b"K", b"Z", b"1", b"2", b"3", b"n", b"t", b"s", b"c", b"v"))
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SKIPPED = b"+"  # a pseudo-frame: rows over MAX_ROWS


class Answer:
    """Backend messages the client received between two recorded statements."""

    __slots__ = ("raw", "nbytes", "frames", "rows", "skipped", "kept", "dropped", "tail")

    def __init__(self) -> None:
        self.raw: list[bytes] = []  # chunks as sent, not yet framed
        self.nbytes = 0
        self.frames: list[tuple[bytes, Any]] = []  # kept (type, body) and (_SKIPPED, count)
        self.rows = 0  # rows of the current result seen so far
        self.skipped = 0  # rows of the current result over MAX_ROWS
        self.kept = 0
        self.dropped = 0  # messages over MAX_ANSWER_BYTES
        self.tail = b""

    def reduce(self) -> None:
        """Frame the unread bytes, keeping what will be rendered within the caps."""
        if not self.raw:
            return
        data = b"".join(self.raw)
        if self.tail:
            data = self.tail + data
        self.raw, self.nbytes = [], 0
        frames = self.frames
        pos, end = 0, len(data)
        while end - pos >= 5:
            t, n = _HDR.unpack_from(data, pos)
            stop = pos + 1 + n
            if n < 4 or stop > end:
                break
            if t in _ROWS:
                self.rows += 1
                if self.rows > MAX_ROWS:
                    self.skipped += 1
                    pos = stop
                    continue
            else:
                if t in _BOUNDARY:
                    self._end_result()
                if t in _SILENT:
                    pos = stop
                    continue
            if self.kept >= MAX_ANSWER_BYTES:
                self.dropped += 1
            else:
                frames.append((t, data[pos + 5:stop]))
                self.kept += n + 1
            pos = stop
        self.tail = data[pos:]

    def _end_result(self) -> None:
        if self.skipped:
            self.frames.append((_SKIPPED, self.skipped))
        self.rows = self.skipped = 0

    def finish(self) -> list[tuple[bytes, Any]]:
        self.reduce()
        self._end_result()
        return self.frames


@dataclass(slots=True)
class Segment:
    """A part of one session, handed to the sink: becomes one TCP flow."""

    target: str
    database: str
    sub: str
    client: tuple[str, int]
    upstream: tuple[str, int]
    number: int
    started: float
    ended: float
    final: bool
    reason: str | None
    entries: list[tuple[bool, Any, float]]  # (from_client, (op, effect, rules) | Answer, time)

    def metadata(self) -> dict[str, Any]:
        return {"portcullis": {
            "protocol": "postgres", "target": self.target, "database": self.database,
            "sub": self.sub, "client": f"{self.client[0]}:{self.client[1]}",
            "segment": self.number, "final": self.final, "close_reason": self.reason or ""}}

    def comment(self) -> str:
        more = "" if self.final else " (continued in the next segment)"
        return (f"postgres {self.target} db={self.database} sub={self.sub} "
                f"client={self.client[0]}:{self.client[1]} segment {self.number}{more}")


class SessionRecording:
    """One session's recording in progress. `statement()` and `to_client()` are the hot path."""

    __slots__ = ("sink", "clock", "target", "database", "sub", "client", "upstream",
                 "max_messages", "entries", "number", "started", "held", "finished", "failures",
                 "_answer")

    def __init__(self, sink: Callable[[Segment], None], clock: Callable[[], float], *,
                 target: str, database: str, sub: str, client: tuple[str, int],
                 upstream: tuple[str, int], max_messages: int = MAX_MESSAGES) -> None:
        self.sink = sink
        self.clock = clock
        self.target = target
        self.database = database
        self.sub = sub
        self.client = client
        self.upstream = upstream
        self.max_messages = max_messages
        self.entries: list[tuple[bool, Any, float]] = []
        self.number = 1
        self.started = clock()
        self.held = 0
        self.finished = False
        self.failures = 0
        self._answer: Answer | None = None

    @classmethod
    def for_session(cls, session: Any) -> SessionRecording:
        env = session.env
        up = getattr(session.target, "upstream", None)
        upstream = (str(up.host), int(up.port)) if up is not None else ("-", 0)
        return cls(env.recorder, env.clock, target=session.target.name,
                   database=session.database,
                   sub=session.identity.sub if session.identity else "-",
                   client=split_address(session.client), upstream=upstream)

    def statement(self, op: dict[str, Any], effect: str, rules: Any) -> None:
        """A decided statement; `op` is the audit's operation (built once per verdict)."""
        if len(self.entries) >= self.max_messages:
            self.flush()
        self._answer = None
        self.entries.append((True, (op, effect, rules), self.clock()))

    def to_client(self, data: bytes) -> None:
        """Bytes the session sent to the client (whole backend messages)."""
        a = self._answer
        if a is None:
            if len(self.entries) >= self.max_messages:
                self.flush()
            a = self._answer = Answer()
            self.entries.append((False, a, self.clock()))
        a.raw.append(data)
        a.nbytes += len(data)
        self.held += len(data)
        if a.nbytes > COMPACT_BYTES:
            before = a.nbytes + a.kept + len(a.tail)
            a.reduce()
            self.held += a.kept + len(a.tail) - before
            if self.held > MAX_SEGMENT_BYTES:
                self.flush()

    def flush(self, final: bool = False, reason: str | None = None) -> None:
        entries, self.entries = self.entries, []
        self._answer = None
        self.held = 0
        if not entries:
            return
        now = self.clock()
        seg = Segment(self.target, self.database, self.sub, self.client, self.upstream,
                      self.number, self.started, now, final, reason, entries)
        self.number += 1
        self.started = now
        try:
            self.sink(seg)
        except Exception:  # noqa: BLE001 - never fatal to the session
            self.failures += 1
            log.exception("postgres recording segment could not be handed over")

    def finish(self, reason: str, pending: bytes = b"") -> None:
        """The session ended; `pending` = bytes sent to the client but not yet taken."""
        if self.finished:
            return
        self.finished = True
        if pending:
            self.to_client(pending)
        self.flush(final=True, reason=reason)


def split_address(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    try:
        return host or addr, int(port)
    except ValueError:
        return addr, 0


# ---------------------------------------------------------------------------------------------
# Rendering (off the hot path)


def render(seg: Segment) -> list[tuple[bool, str, float]]:
    """The segment as TCP messages: statements from the client, answers from the server."""
    out: list[tuple[bool, str, float]] = []
    columns: Columns | None = None  # carried over: Describe, then Execute
    for from_client, item, ts in seg.entries:
        if from_client:
            text = statement_text(*item)
        else:
            text, columns = answer_text(item, columns)
            if not text:
                continue
        if len(text) > MAX_TEXT:
            text = text[:MAX_TEXT] + "\n... [truncated]"
        out.append((from_client, text, ts))
    return out


def statement_text(op: dict[str, Any], effect: str, rules: Any) -> str:
    sql = op.get("sql") or {}
    text = sql.get("normalized") or op.get("summary") or "(statement)"
    if len(text) > MAX_STATEMENT:
        text = text[:MAX_STATEMENT] + "…"
    if effect != "allow":
        text += f"\n[denied by rule {', '.join(rules) or '-'}]"
    return text


def answer_text(a: Answer, columns: Columns | None) -> tuple[str, Columns | None]:
    lines: list[str] = []
    table: list[list[str]] = []
    header: list[str] | None = None
    copy_binary = False

    def end_table() -> None:
        nonlocal header
        if header is not None or table:
            lines.extend(_table(header, table))
        header = None
        table.clear()

    for t, body in a.finish():
        try:
            if t == b"D":
                if header is None and not table and columns is not None:
                    header = [c[0] for c in columns]  # described in an earlier answer
                table.append(_cells(_row_values(body), columns))
            elif t == b"T":
                end_table()
                columns = _columns(body)
                header = [c[0] for c in columns]
            elif t == _SKIPPED:
                end_table()
                lines.append(f"... {body} more rows")
            elif t == b"d":
                lines.append("[binary]" if copy_binary else _cell(body, 0))
            elif t in (b"H", b"W", b"G"):
                end_table()
                copy_binary = body[:1] == b"\x01"
                fmt = "binary" if copy_binary else "text"
                lines.append(f"COPY OUT ({fmt})" if t != b"G"
                             else "COPY IN (data from the client is not recorded)")
            else:
                end_table()
                lines.append(_other(t, body))
        except Exception:  # noqa: BLE001 - a message we cannot render is named, not shown
            lines.append(f"[unreadable message {t!r}]")
    end_table()
    if a.dropped:
        lines.append(f"... {a.dropped} more messages not recorded")
    return "\n".join(lines), columns


@lru_cache(maxsize=512)
def _columns(body: bytes) -> Columns:
    """(name, format) of each RowDescription field (cached: a session repeats its shapes)."""
    count = _I16.unpack_from(body, 0)[0]
    pos, cols = 2, list[tuple[str, int]]()
    for _ in range(count):
        end = body.index(b"\0", pos)
        name = body[pos:end].decode("utf-8", "replace")
        pos = end + 1 + 18  # table oid, attnum, type oid, size, modifier, format
        cols.append((name, _I16.unpack_from(body, pos - 2)[0]))
    if pos != len(body):
        raise ValueError("bad RowDescription")
    return tuple(cols)


def _row_values(body: bytes) -> list[bytes | None]:
    count = _I16.unpack_from(body, 0)[0]
    pos, out = 2, list[bytes | None]()
    for _ in range(count):
        n = _I32.unpack_from(body, pos)[0]
        pos += 4
        if n < 0:
            out.append(None)
        else:
            out.append(body[pos:pos + n])
            pos += n
    if pos != len(body):
        raise ValueError("bad DataRow")
    return out


def _other(t: bytes, body: bytes) -> str:
    if t == b"C":
        return body[:-1].decode("utf-8", "replace")
    if t in (b"E", b"N"):
        msg = ErrorResponse.decode(body)
        sev = msg.get("V") or msg.get("S") or ("ERROR" if t == b"E" else "NOTICE")
        code = msg.get("C")
        out = [f"{sev}{' ' + code if code else ''}: {msg.get('M') or ''}"]
        for key, label in (("D", "DETAIL"), ("H", "HINT")):
            val = msg.get(key)
            if val:
                out.append(f"{label}: {val}")
        return "\n".join(out)
    if t == b"I":
        return "(empty query)"
    if t == b"S":
        ps = ParameterStatus.decode(body)
        return f"parameter {ps.name} = {ps.value}"
    if t == b"A":
        n = NotificationResponse.decode(body)
        return f"NOTIFY {n.channel}: {n.payload}"
    if t == b"V":
        return "function result: " + _cell(FunctionCallResponse.decode(body).value, 0)
    return f"[message {t.decode('latin-1')}]"


def _cells(values: list[bytes | None], columns: Columns | None) -> list[str]:
    if columns and len(columns) == len(values):
        return [_cell(v, c[1]) for v, c in zip(values, columns, strict=True)]
    return [_cell(v, 0) for v in values]


def _cell(value: bytes | None, fmt: int) -> str:
    """Text values as text; binary ones (format 1, or undecodable text: a RowDescription from
    Describe-statement says 0 before Bind chose binary) as [binary]."""
    if value is None:
        return "NULL"
    if fmt == 1:
        return "[binary]"
    try:
        s = value.decode("utf-8")
    except UnicodeDecodeError:
        return "[binary]"
    if not s.isprintable():
        if _CONTROL.search(s):
            return "[binary]"
        s = s.replace("\r", "\\r").replace("\n", "\\n")
    return s if len(s) <= MAX_CELL else s[:MAX_CELL] + "…"


def _table(header: list[str] | None, rows: list[list[str]]) -> list[str]:
    every = [header, *rows] if header is not None else rows
    widths = [max(map(len, col)) for col in zip_longest(*every, fillvalue="")]
    out = [" | ".join(map(str.ljust, r, widths)).rstrip() for r in every]
    if header is not None:
        out.insert(1, "-+-".join("-" * w for w in widths[:len(header)]))
    return out


# ---------------------------------------------------------------------------------------------
# The server's sink


class SegmentWriter:
    """`Env.recorder` for the server: segments are rendered, cleaned and written by one
    background thread, in order, so the event loop only queues them. `close()` waits for the
    queue (gateway shutdown). Failures are logged and counted, never fatal."""

    def __init__(self, recorder: Any, secrets: list[str] | None = None,
                 sockname: tuple[str, int] | None = None) -> None:
        self.recorder = recorder
        self.secrets = sorted({s for s in secrets or () if len(s) >= 4}, key=len, reverse=True)
        self.sockname = sockname or ("", 0)
        self.failures = 0
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="portcullis-pg-recorder")

    def __call__(self, seg: Segment) -> None:
        pool = self._pool
        if pool is not None:
            try:
                pool.submit(self.write, seg)
                return
            except RuntimeError:  # shut down meanwhile
                pass
        self.write(seg)

    def clean(self, text: str) -> bytes:
        """Configured secrets out (the detectors' scrub follows in `record_tcp`)."""
        for s in self.secrets:
            if s in text:
                text = text.replace(s, MARKER)
        return text.encode()

    def write(self, seg: Segment) -> None:
        try:
            msgs = [(fc, self.clean(text), ts) for fc, text, ts in render(seg)]
            meta = seg.metadata()
            meta["portcullis"]["close_reason"] = self.clean(
                meta["portcullis"]["close_reason"]).decode()
            ok = self.recorder.record_tcp(seg.client, seg.upstream, msgs, meta,
                                          sockname=self.sockname, comment=seg.comment(),
                                          started=seg.started, ended=seg.ended)
        except Exception:  # noqa: BLE001 - never fatal; the audit log has every decision
            ok = False
            log.exception("could not record postgres session segment")
        if ok is False:
            self.failures += 1

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


def writer_for(runtime: Any) -> SegmentWriter | None:
    """The server's sink when the runtime has a recorder (None: sessions are not recorded)."""
    recorder = getattr(runtime, "recorder", None)
    if recorder is None:
        return None
    cfg = runtime.config
    secrets = cfg.secrets() if hasattr(cfg, "secrets") else []
    return SegmentWriter(recorder, secrets, getattr(cfg, "listen_postgres", None))
