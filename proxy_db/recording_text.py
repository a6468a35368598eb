"""How a Postgres recording shows statements and backend messages as text (`proxy_db.recording`).

Pure functions over plain data. An answer is rendered to LINES: a table per result (column
names, a rule, one line per row), command tags, COPY lines, errors and notices. `answer_lines`
also says which lines show values and which only repeat (a table's header and rule, a command
tag, COPY headers): `SegmentWriter` checks the repeating ones against the detectors once and
scans the others once per segment, all joined (see there for why lines can be scanned apart).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Container
from functools import lru_cache
from itertools import zip_longest
from typing import Any

from proxy_db.backend import (
    ErrorResponse,
    FunctionCallResponse,
    NotificationResponse,
    ParameterStatus,
)

MAX_CELL = 200
MAX_STATEMENT = 4000
MAX_TEXT = 64 << 10
TRUNCATED = "\n... [truncated]"
SKIPPED = b"+"  # a pseudo-frame: rows over MAX_ROWS

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
Columns = tuple[tuple[str, int], ...]  # (name, format code) of a RowDescription
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_NONE: frozenset[str] = frozenset()


def statement_text(op: dict[str, Any], effect: str, rules: Any) -> str:
    sql = op.get("sql") or {}
    text = sql.get("normalized") or op.get("summary") or "(statement)"
    if len(text) > MAX_STATEMENT:
        text = text[:MAX_STATEMENT] + "…"
    if effect != "allow":
        text += f"\n[denied by rule {', '.join(rules) or '-'}]"
    return text


def answer_lines(frames: list[tuple[bytes, Any]], columns: Columns | None, dropped: int = 0,
                 known: Container[str] = _NONE
                 ) -> tuple[list[str], list[int], list[int], Columns | None]:
    """(lines, values, repeating, columns): the text of an answer's kept frames, line by line;
    the indices of the lines that show values (rows, COPY data, messages from the server) and
    of those that repeat (headers, rules, tags) and are not in `known`; the columns carried on
    to the next answer (Describe, then Execute)."""
    lines: list[str] = []
    values: list[int] = []
    repeating: list[int] = []
    rows: list[list[str]] | None = None  # of the table being built
    header: list[str] | None = None
    copy_binary = False
    for t, body in frames:
        try:
            if t == b"D":
                if rows is None:
                    rows = []
                    if header is None and columns is not None:
                        header = [c[0] for c in columns]  # described in an earlier answer
                rows.append(row_cells(body, columns))
                continue
            if t == b"d":
                values.append(len(lines))
                lines.append("[binary]" if copy_binary else _cell(body, 0))
                continue
            if header is not None or rows:
                _table(header, rows or [], lines, values, repeating, known)
            header = rows = None
            if t == b"C":
                line = body[:-1].decode("utf-8", "replace")
            elif t == b"T":
                columns = _columns(body)
                header = [c[0] for c in columns]
                continue
            elif t == SKIPPED:
                values.append(len(lines))
                lines.append(f"... {body} more rows")
                continue
            elif t in (b"H", b"W", b"G"):
                copy_binary = body[:1] == b"\x01"
                line = (("COPY OUT (binary)" if copy_binary else "COPY OUT (text)") if t != b"G"
                        else "COPY IN (data from the client is not recorded)")
            elif t == b"I":
                line = "(empty query)"
            else:
                values.append(len(lines))
                lines.append(_other(t, body))
                continue
            if line not in known:
                repeating.append(len(lines))
            lines.append(line)
        except Exception:  # noqa: BLE001 - a message we cannot render is named, not shown
            values.append(len(lines))
            lines.append(f"[unreadable message {t!r}]")
    if header is not None or rows:
        _table(header, rows or [], lines, values, repeating, known)
    if dropped:
        values.append(len(lines))
        lines.append(f"... {dropped} more messages not recorded")
    return lines, values, repeating, columns


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


def row_cells(body: bytes, columns: Columns | None) -> list[str]:
    """The cells of a DataRow as text (the formats of `columns` when they fit the row)."""
    count = _I16.unpack_from(body, 0)[0]
    fmts = columns if columns and len(columns) == count else None
    pos, out = 2, list[str]()
    for i in range(count):
        n = _I32.unpack_from(body, pos)[0]
        pos += 4
        if n < 0:
            out.append("NULL")
            continue
        value = body[pos:pos + n]
        pos += n
        if fmts is not None and fmts[i][1] == 1:
            out.append("[binary]")
            continue
        try:  # the common case inline: printable UTF-8 within MAX_CELL
            s = value.decode("utf-8")
            if s.isprintable() and len(s) <= MAX_CELL:
                out.append(s)
                continue
        except UnicodeDecodeError:
            pass
        out.append(_cell(value, 0))
    if pos != len(body):
        raise ValueError("bad DataRow")
    return out


def _other(t: bytes, body: bytes) -> str:
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
    if t == b"S":
        ps = ParameterStatus.decode(body)
        return f"parameter {ps.name} = {ps.value}"
    if t == b"A":
        n = NotificationResponse.decode(body)
        return f"NOTIFY {n.channel}: {n.payload}"
    if t == b"V":
        return "function result: " + _cell(FunctionCallResponse.decode(body).value, 0)
    return f"[message {t.decode('latin-1')}]"


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


def _table(header: list[str] | None, rows: list[list[str]], lines: list[str],
           values: list[int], repeating: list[int], known: Container[str]) -> None:
    """A result as aligned text: the header and its rule (repeating lines), then the rows."""
    if header is not None and len(rows) == 1 and len(rows[0]) == len(header):
        row = rows[0]  # the common case, without the general layout's work
        if len(row) == 1:
            widths = [max(len(header[0]), len(row[0]))]
            texts = [row[0].rstrip()]
        else:
            widths = list(map(max, map(len, header), map(len, row)))
            texts = [" | ".join(map(str.ljust, row, widths)).rstrip()]
    else:
        every = [header, *rows] if header is not None else rows
        widths = [max(map(len, col)) for col in zip_longest(*every, fillvalue="")]
        if len(widths) == 1:  # one column: no padding survives the rstrip
            texts = [r[0].rstrip() if r else "" for r in rows]
        else:
            texts = [" | ".join(map(str.ljust, r, widths)).rstrip() for r in rows]
    if header is not None:
        for line in (" | ".join(map(str.ljust, header, widths)).rstrip(),
                     "-+-".join(["-" * w for w in widths[:len(header)]])):
            if line not in known:
                repeating.append(len(lines))
            lines.append(line)
    start = len(lines)
    lines += texts
    values += range(start, len(lines))
