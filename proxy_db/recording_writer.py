"""The server's sink for Postgres recordings (`Env.recorder`): `SegmentWriter`.

Each segment handed over by a `proxy_db.recording.SessionRecording` is rendered, cleaned and
written (`addons.recorder.Recorder.record_tcp`) by one background thread, in order, so the
event loop only queues it. `close()` waits for the queue (gateway shutdown). Failures are
logged and counted, never fatal.

Cleaning = every configured secret replaced by the marker, then `addons.masking.scrub`
(every detector hit redacted), per message, in that order: `SegmentWriter.reference()` of
each message of `recording.render()`. What is written is byte for byte that
(tests/proxy_db/test_recording_writer.py compares both on generated segments), but every
piece of work is done once:
- a statement's cleaned message is remembered (sessions repeat their statements);
- an answer whose bytes were seen before (after the same column description) is not rendered
  again: row-less answers (INSERT/UPDATE/BEGIN tags) and repeated results;
- a one-row answer of a SHAPE seen before (the same bytes around one DataRow: the same
  RowDescription before it, the same command tag after it) is not framed again: only its row
  is read; the header, its rule and the tag are the shape's;
- lines that repeat (headers, rules, tags) are remembered once found clean; all the other
  lines of a segment are scanned by the detectors in ONE call, joined by newlines, and only
  lines with a hit are scrubbed.
Scanning lines joined by newlines (or a message line by line) finds exactly what scanning each
message finds, because no detector's pattern, look-around or validator reaches across a
newline (tests/proxy_db/test_recording_writer.py checks it) except a private key's body,
which runs on to its END line: so a segment whose lines contain "-----BEGIN" or a
configured secret, or any segment when a secret itself spans lines, is cleaned message by
message (`reference`) instead.
"""

from __future__ import annotations

import bisect
import logging
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from proxy_db import recording
from proxy_db.recording import Segment, as_answer, frame_spans
from proxy_db.recording_text import (
    MAX_CELL,
    MAX_TEXT,
    TRUNCATED,
    Columns,
    answer_lines,
    row_cells,
    statement_text,
)

log = logging.getLogger("portcullis.recorder")

MARKER = "[removed by portcullis]"
CACHED = 4096  # statements, answers and lines a writer remembers (then it starts over)
SEEN_BYTES = 512  # answers up to this size are remembered whole
SHAPES = 8  # one-row answer shapes remembered (most recently used first)
_I32 = struct.Struct("!i")
_ROW1 = struct.Struct("!cIhi")  # a DataRow's type, length, count and first value's length

# (slots in the messages, lines, bytes of an answer without rows (remembered in `seen`), where
# its lines to scan start in `check`)
Pending = tuple[list[int], list[str], bytes | None, int]


class Shape:
    """A one-row answer's bytes before and after its DataRow and what they render to."""

    __slots__ = ("columns_in", "prefix", "suffix", "skip", "columns", "header", "widths", "names",
                 "head", "tag", "single", "known")

    def __init__(self, columns_in: Columns | None, prefix: bytes, suffix: bytes,
                 columns: Columns | None, tag: str) -> None:
        self.columns_in = columns_in
        self.prefix = prefix
        self.suffix = suffix
        self.skip = len(suffix)
        self.columns = columns  # of the row, and after the answer
        self.header = [c[0] for c in columns] if columns is not None else None
        self.widths = list(map(len, self.header or ()))
        # the header line and its rule (one part: both repeat) when no value is wider
        self.names = " | ".join(self.header or ()).rstrip()
        self.head = self.names + "\n" + "-+-".join(["-" * w for w in self.widths])
        self.tag = tag
        # one column in text format: the common case, read in `render` itself
        self.single = columns is not None and len(columns) == 1 and columns[0][1] != 1
        self.known = False  # the header (as above) and the tag are known to be clean

    def render(self, mid: bytes, known: set[str]) -> tuple[list[str], int, Sequence[int]] | None:
        """What `answer_lines` makes of an answer of this shape whose bytes between `prefix`
        and `suffix` are `mid`, as parts joined by newlines, or None when `mid` is not one
        DataRow of the same width. With the index of the row's line and those of the lines
        not known to be clean."""
        size = len(mid)
        parts: list[str] | None = None
        if self.single and size >= 11:
            t, length, count, n = _ROW1.unpack_from(mid)
            if (t == b"D" and length == size - 1 and count == 1 and n == size - 11
                    and n <= MAX_CELL):
                try:
                    cell = mid[11:].decode("utf-8")
                except UnicodeDecodeError:
                    cell = ""
                if cell.isprintable() and cell:
                    w = len(cell)
                    head = self.head if w <= self.widths[0] else f"{self.names}\n{'-' * w}"
                    parts = [head, cell.rstrip(), self.tag]
        if parts is None:
            parts = self._row(mid)
            if parts is None:
                return None
        at = len(parts) - 2  # the row: before the tag, after the header if there is one
        if self.known and parts[0] is self.head:
            return parts, at, ()
        repeating = [i for i in range(len(parts)) if i != at and parts[i] not in known]
        if not repeating and parts[0] is self.head:
            self.known = True
        return parts, at, repeating

    def _row(self, mid: bytes) -> list[str] | None:
        """`render` for any DataRow (the general layout of one row)."""
        if len(mid) < 7 or mid[0] != 68 or _I32.unpack_from(mid, 1)[0] != len(mid) - 1:
            return None  # 68: "D"
        try:
            row = row_cells(mid[5:], self.columns)
        except Exception:  # noqa: BLE001 - rendered the long way ("[unreadable message]")
            return None
        header = self.header
        if header is None:  # no column names: one row is as wide as its own cells
            return [" | ".join(row).rstrip(), self.tag]
        if len(row) != len(header):
            return None
        widths = list(map(max, self.widths, map(len, row)))
        if widths == self.widths:
            head = self.head
        else:
            head = (" | ".join(map(str.ljust, header, widths)).rstrip() + "\n"
                    + "-+-".join(["-" * w for w in widths]))
        if len(row) == 1:
            return [head, row[0].rstrip(), self.tag]
        return [head, " | ".join(map(str.ljust, row, widths)).rstrip(), self.tag]


def shape_of(raw: bytes, columns_in: Columns | None, columns: Columns | None,
             frames: list[tuple[bytes, Any]]) -> Shape | None:
    """The shape of a one-row answer rendered the long way: kept frames [RowDescription,]
    DataRow, CommandComplete (anything else in between is never rendered), no cap reached."""
    kinds = [t for t, _ in frames]
    if kinds not in ([b"T", b"D", b"C"], [b"D", b"C"]) or len(raw) > recording.MAX_ANSWER_BYTES:
        return None
    rows = [(start, stop) for t, start, stop in frame_spans(raw) if t in (b"D", b"d")]
    if len(rows) != 1:
        return None
    start, stop = rows[0]
    return Shape(columns_in, raw[:start], raw[stop:], columns,
                 frames[-1][1][:-1].decode("utf-8", "replace"))


class SegmentWriter:
    """`Env.recorder` for the server (see the module's docstring)."""

    def __init__(self, recorder: Any, secrets: list[str] | None = None,
                 sockname: tuple[str, int] | None = None) -> None:
        self.recorder = recorder
        self.secrets = sorted({s for s in secrets or () if len(s) >= 4}, key=len, reverse=True)
        self.sockname = sockname or ("", 0)
        self.failures = 0
        self._by_line = not any("\n" in s for s in self.secrets)
        self._statements: dict[str, bytes] = {}  # statement text -> cleaned message
        # bytes of an answer without rows -> its message (b"": not shown)
        self._seen: dict[bytes, bytes] = {}
        self._shapes: list[Shape] = []
        # the last answer rendered: (bytes, columns before, columns after, its message, or
        # while the segment is rendered the slots of the messages waiting for it)
        self._last: tuple[bytes | None, Columns | None, Columns | None, Any] = (
            None, None, None, b"")
        self._known: set[str] = set()  # repeating lines that cleaning leaves as they are
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
        """Configured secrets out (the detectors' scrub follows in `reference`)."""
        for s in self.secrets:
            if s in text:
                text = text.replace(s, MARKER)
        return text.encode()

    def reference(self, text: str) -> bytes:
        """One rendered message as recorded: capped, secrets out, detector hits redacted."""
        from addons.masking import scrub

        if len(text) > MAX_TEXT:
            text = text[:MAX_TEXT] + TRUNCATED
        return scrub(self.clean(text).decode()).encode()

    def messages(self, seg: Segment) -> list[tuple[bool, bytes, float]]:
        """The segment's messages as recorded: `reference()` of each of `render(seg)`."""
        out: list[tuple[bool, bytes, float]] = []
        pending: list[Pending] = []
        check: list[str] = []  # the lines still to scan (each answer's from its `start`)
        learn: list[int] = []  # those of them that repeat: remembered when clean
        statements, seen, shapes, known = self._statements, self._seen, self._shapes, self._known
        columns: Columns | None = None  # carried over: Describe, then Execute
        last = self._last
        for from_client, item, ts in seg.entries:
            if from_client:
                text = statement_text(*item)
                data = statements.get(text)
                if data is None:
                    data = self.reference(text)
                    if len(statements) >= CACHED:
                        statements.clear()
                    statements[text] = data
                out.append((True, data, ts))
                continue
            if type(item) is list:  # chunks as sent (an Answer: reduced while it streamed)
                raw = item[0] if len(item) == 1 else b"".join(item)
                if raw == last[0] and columns == last[1]:  # the same answer again
                    columns, done = last[2], last[3]
                    if type(done) is bytes:
                        out.append((False, done, ts))
                    else:  # the answer before, in this segment: its message is not made yet
                        done.append(len(out))
                        out.append((False, b"", ts))
                    continue
                data = seen.get(raw)
                if data is not None:  # an answer without rows seen before
                    if data:
                        out.append((False, data, ts))
                    continue
                for shape in shapes:
                    if (raw.startswith(shape.prefix) and raw.endswith(shape.suffix)
                            and shape.columns_in == columns):
                        got = shape.render(raw[len(shape.prefix):len(raw) - shape.skip], known)
                        if got is None:
                            break
                        if shape is not shapes[0]:  # most recently used first
                            shapes.remove(shape)
                            shapes.insert(0, shape)
                        lines, i, repeating = got
                        slots = [len(out)]
                        pending.append((slots, lines, None, len(check)))
                        check.append(lines[i])
                        for i in repeating:
                            learn.append(len(check))
                            check.append(lines[i])
                        last = (raw, columns, shape.columns, slots)
                        columns = shape.columns
                        out.append((False, b"", ts))
                        break
                else:
                    got = None
                if got is not None:
                    continue
            before = columns
            a = as_answer(item)
            lines, values, repeating, columns = answer_lines(a.finish(), columns, a.dropped, known)
            memo = None  # bytes of an answer without rows: remembered in `seen`
            if type(item) is list:
                kinds = {t for t, _ in a.frames}
                if b"D" not in kinds and b"T" not in kinds and len(raw) <= SEEN_BYTES:
                    memo = raw  # its text depends on its bytes only
                elif len(values) == 1:
                    self._learn(shape_of(raw, before, columns, a.frames))
            if not lines or (len(lines) == 1 and not lines[0]):
                if memo is not None:
                    seen[memo] = b""  # nothing to show (render() leaves it out)
                continue
            slots = [len(out)]
            pending.append((slots, lines, memo, len(check)))
            for i in values:
                check.append(lines[i])
            for i in repeating:
                learn.append(len(check))
                check.append(lines[i])
            if type(item) is list:
                last = (raw, before, columns, slots)
            out.append((False, b"", ts))
        if pending:
            self._clean_answers(out, pending, check, learn)
        if type(last[3]) is list:  # the last answer, now that its message is made
            last = (last[0], last[1], last[2], out[last[3][0]][1])
        self._last = last
        return out

    def _learn(self, shape: Shape | None) -> None:
        if shape is None:
            return
        for old in self._shapes:
            if (old.columns_in == shape.columns_in and old.prefix == shape.prefix
                    and old.suffix == shape.suffix):
                return
        self._shapes.insert(0, shape)
        del self._shapes[SHAPES:]

    def _clean_answers(self, out: list[tuple[bool, bytes, float]], answers: list[Pending],
                       check: list[str], learn: list[int]) -> None:
        """Fill in the answers' messages after one detector pass over the lines in `check`.
        An answer with a hit is cleaned whole (`reference`: what scanning it line by line
        would give, as said above)."""
        from addons.masking import detect

        joined = "\n".join(check)
        ok = (self._by_line and "-----BEGIN" not in joined
              and not any(s in joined for s in self.secrets))
        hits = detect(joined) if ok else []
        hit: set[int] = set()  # positions in `check` of the lines with a hit
        if hits:
            ends, pos = [], -1
            for line in check:
                pos += len(line) + 1
                ends.append(pos)  # where the newline after each line is (or the end)
            k = 0
            for start, stop, _ in hits:
                while ends[k] < start:
                    k += 1
                if stop > ends[k]:  # never, as said above; if it did: message by message
                    ok = False
                    break
                hit.add(k)
        if ok:
            self._remember(check, learn, hit)
        starts = [a[3] for a in answers] if hit else []
        dirty = {bisect.bisect_right(starts, k) - 1 for k in hit}  # answers with a hit
        seen = self._seen
        if len(seen) + len(answers) > CACHED:
            seen.clear()
        for n, (slots, lines, memo, _) in enumerate(answers):
            text = "\n".join(lines)
            if ok and len(text) <= MAX_TEXT and n not in dirty:
                data = text.encode()  # the common case: every line clean as rendered
            else:
                data = self.reference(text)
            for slot in slots:
                out[slot] = (False, data, out[slot][2])
            if memo is not None:
                seen[memo] = data

    def _remember(self, check: list[str], learn: list[int], hit: set[int]) -> None:
        """Repeating lines found clean (no detector hit; no secret: else not `ok`)."""
        if learn:
            known = self._known
            if len(known) + len(learn) > CACHED:
                known.clear()
            for k in learn:
                if k not in hit:
                    known.add(check[k])

    def write(self, seg: Segment) -> None:
        try:
            msgs = self.messages(seg)
            meta = seg.metadata()
            meta["portcullis"]["close_reason"] = self.clean(
                meta["portcullis"]["close_reason"]).decode()
            ok = self.recorder.record_tcp(seg.client, seg.upstream, msgs, meta,
                                          sockname=self.sockname, comment=seg.comment(),
                                          started=seg.started, ended=seg.ended, scrubbed=True)
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
