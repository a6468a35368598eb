"""Recordings of Postgres sessions (SPEC §7): statements as audited, results as the client got them.

Sans-IO: `SessionRecording` is fed by the session (`statement()` from the relay's decisions,
`to_client()` from `Session.take()`) and hands finished `Segment`s to a sink (`Env.recorder`).
`render()` turns a segment into the `(from_client, text, timestamp)` messages of one mitmproxy
TCP flow (the text itself: `proxy_db/recording_text.py`); `SegmentWriter`, the sink the server
uses (`proxy_db/recording_writer.py`), renders, cleans and writes them
(`addons.recorder.Recorder.record_tcp`) on one background thread, in order.

What is recorded:
- client -> server: each decided statement as the audit has it (the normalised text, constants
  replaced by $n) and `[denied by rule X]` for a refused one. The client's own bytes are never
  kept: not the password message (the agent's token), not Bind parameters, not COPY FROM data.
- server -> client: the backend messages the CLIENT received (after masking), taken from the
  bytes the session sent, rendered as text tables; errors and notices as sent. The upstream's
  raw answers and the upstream login never pass through here.
- the writer replaces every configured secret and runs `addons.masking.scrub` over every
  message (defence in depth: masked values are already replaced in what the client got;
  detector hits in unmasked columns are redacted in the recording too).

Hot path: `statement()` appends a tuple, `to_client()` a reference to bytes already joined
for the socket (an answer is the list of chunks sent until it grows big). Nothing is decoded
until a segment is rendered (off the event loop).

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
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxy_db.recording_text import (
    MAX_CELL,
    MAX_STATEMENT,
    MAX_TEXT,
    SKIPPED,
    TRUNCATED,
    Columns,
    answer_lines,
    statement_text,
)

__all__ = ["MAX_CELL", "MAX_STATEMENT", "MAX_TEXT", "Answer", "Segment", "SessionRecording",
           "answer_text", "render", "statement_text", "writer_for"]

log = logging.getLogger("portcullis.recorder")

MAX_MESSAGES = 200
MAX_SEGMENT_BYTES = 8 << 20
MAX_ROWS = 100
MAX_ANSWER_BYTES = 1 << 20
COMPACT_BYTES = 256 << 10

_HDR = struct.Struct("!cI")
_ROWS = frozenset((b"D", b"d"))
# Messages that end a result (the row count starts again) and messages never rendered.
_BOUNDARY = frozenset((b"T", b"C", b"I", b"E", b"H", b"W", b"Z", b"s"))
_SILENT = frozenset((b"R", b"K", b"Z", b"1", b"2", b"3", b"n", b"t", b"s", b"c", b"v"))


def frame_spans(data: bytes) -> list[tuple[bytes, int, int]]:
    """(type, start, stop) of each whole backend message in `data`, as `Answer.reduce` frames
    them (a `SegmentWriter` looks for the DataRow of a one-row answer with it)."""
    out = []
    pos, end = 0, len(data)
    while end - pos >= 5:
        t, n = _HDR.unpack_from(data, pos)
        stop = pos + 1 + n
        if n < 4 or stop > end:
            break
        out.append((t, pos, stop))
        pos = stop
    return out


class Answer:
    """Backend messages the client received between two recorded statements, once framed.

    An answer is kept as the list of chunks sent (the hot path appends to it) until its unread
    bytes pass COMPACT_BYTES; then it becomes an Answer, framed and reduced to what will be
    rendered within the caps (`as_answer` makes one of a chunk list for rendering)."""

    __slots__ = ("raw", "frames", "rows", "skipped", "kept", "dropped", "tail")

    def __init__(self, raw: list[bytes] | None = None) -> None:
        self.raw: list[bytes] = raw if raw is not None else []  # chunks not yet framed
        self.frames: list[tuple[bytes, Any]] = []  # kept (type, body) and (SKIPPED, count)
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
        self.raw = []
        frames = self.frames
        rows, skipped, kept, dropped = self.rows, self.skipped, self.kept, self.dropped
        cap = MAX_ANSWER_BYTES
        unpack = _HDR.unpack_from
        pos, end = 0, len(data)
        while end - pos >= 5:
            t, n = unpack(data, pos)
            stop = pos + 1 + n
            if n < 4 or stop > end:
                break
            if t in _ROWS:
                rows += 1
                if rows > MAX_ROWS:
                    skipped += 1
                    pos = stop
                    continue
            else:
                if t in _BOUNDARY:
                    if skipped:
                        frames.append((SKIPPED, skipped))
                    rows = skipped = 0
                if t in _SILENT:
                    pos = stop
                    continue
            if kept >= cap:
                dropped += 1
            else:
                frames.append((t, data[pos + 5:stop]))
                kept += n + 1
            pos = stop
        self.rows, self.skipped, self.kept, self.dropped = rows, skipped, kept, dropped
        self.tail = data[pos:]

    def _end_result(self) -> None:
        if self.skipped:
            self.frames.append((SKIPPED, self.skipped))
        self.rows = self.skipped = 0

    def finish(self) -> list[tuple[bytes, Any]]:
        self.reduce()
        self._end_result()
        return self.frames



def as_answer(item: list[bytes] | Answer) -> Answer:
    """An answer entry (chunks as sent, or an Answer once reduced) as an Answer."""
    return item if isinstance(item, Answer) else Answer(item)


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
    # (from_client, (op, effect, rules) | chunks sent | Answer, time)
    entries: list[tuple[bool, Any, float]]

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
                 "_answer", "_check_at")

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
        self._answer: list[bytes] | None = None  # chunks of the answer being received
        self._check_at = 0  # `held` above which the answer is reduced (see `_reduce`)

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
        chunks = self._answer
        if chunks is None:
            if len(self.entries) >= self.max_messages:
                self.flush()
            chunks = self._answer = [data]
            self.entries.append((False, chunks, self.clock()))
            held = self.held
            self._check_at = held + COMPACT_BYTES
        else:
            chunks.append(data)
            held = self.held
        self.held = held = held + len(data)
        if held > self._check_at:
            self._reduce()

    def _reduce(self) -> None:
        """The current answer's unread bytes passed COMPACT_BYTES: frame them, keep only what
        will be rendered; the segment ends early when it holds over MAX_SEGMENT_BYTES."""
        entries = self.entries
        _, item, ts = entries[-1]
        a = as_answer(item)
        before = sum(map(len, a.raw)) + a.kept + len(a.tail)
        a.reduce()
        entries[-1] = (False, a, ts)
        self._answer = a.raw  # the next chunks go there
        self.held += a.kept + len(a.tail) - before
        self._check_at = self.held + COMPACT_BYTES
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
# Rendering (off the hot path; the text itself: proxy_db/recording_text.py)


def render(seg: Segment) -> list[tuple[bool, str, float]]:
    """The segment as TCP messages: statements from the client, answers from the server."""
    out: list[tuple[bool, str, float]] = []
    columns: Columns | None = None  # carried over: Describe, then Execute
    for from_client, item, ts in seg.entries:
        if from_client:
            text = statement_text(*item)
        else:
            text, columns = answer_text(as_answer(item), columns)
            if not text:
                continue
        if len(text) > MAX_TEXT:
            text = text[:MAX_TEXT] + TRUNCATED
        out.append((from_client, text, ts))
    return out


def answer_text(a: Answer, columns: Columns | None) -> tuple[str, Columns | None]:
    lines, _, _, columns = answer_lines(a.finish(), columns, a.dropped)
    return "\n".join(lines), columns


# ---------------------------------------------------------------------------------------------
# The server's sink: proxy_db/recording_writer.py (imported when first used)


def writer_for(runtime: Any) -> Any:
    """The server's sink when the runtime has a recorder (None: sessions are not recorded)."""
    from proxy_db.recording_writer import writer_for as make

    return make(runtime)


def __getattr__(name: str) -> Any:
    if name == "SegmentWriter":
        from proxy_db.recording_writer import SegmentWriter

        return SegmentWriter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
