"""PostgreSQL v3 wire messages (startup + frontend; backend ones are in `backend.py`).

One frozen, slotted dataclass and one codec per message.

Every message validates itself on construction and knows how to `encode()` itself; `decode()`
classmethods take the message body (without the type byte and length word) and raise
`ProtocolError` on anything malformed: truncation, trailing bytes, bad counts, invalid UTF-8.
Nothing here does I/O. Size limits live in `framing.py`; this module never sees an oversized body.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

PROTOCOL_3_0 = 196608  # 3 << 16
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

_I16 = struct.Struct("!h")
_U16 = struct.Struct("!H")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_HDR = struct.Struct("!cI")


class ProtocolError(Exception):
    """The peer broke the protocol. SQLSTATE 08P01; the session ends with a FATAL error."""

    sqlstate = "08P01"


class Reader:
    """Cursor over one message body; every read checks bounds."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ProtocolError("message truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def int16(self) -> int:
        return _I16.unpack(self._take(2))[0]

    def uint16(self) -> int:
        return _U16.unpack(self._take(2))[0]

    def int32(self) -> int:
        return _I32.unpack(self._take(4))[0]

    def uint32(self) -> int:
        return _U32.unpack(self._take(4))[0]

    def byte(self) -> bytes:
        return self._take(1)

    def raw(self, n: int) -> bytes:
        return self._take(n)

    def rest(self) -> bytes:
        return self._take(len(self.data) - self.pos)

    def cbytes(self) -> bytes:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise ProtocolError("unterminated string")
        out = self.data[self.pos : end]
        self.pos = end + 1
        return out

    def cstr(self) -> str:
        try:
            return self.cbytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError("string is not valid UTF-8") from e

    def count(self) -> int:
        n = self.int16()
        if n < 0:
            raise ProtocolError("negative count")
        return n

    def value(self) -> bytes | None:
        """An int32-length-prefixed value; -1 is NULL."""
        n = self.int32()
        if n == -1:
            return None
        if n < 0:
            raise ProtocolError("negative value length")
        return self._take(n)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ProtocolError("trailing bytes in message")


def cstr(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else s
    if b"\0" in b:
        raise ValueError("string contains NUL")
    return b + b"\0"


def frame(type_: bytes, body: bytes) -> bytes:
    return _HDR.pack(type_, len(body) + 4) + body


def _values(values: tuple[bytes | None, ...]) -> bytes:
    parts = []
    for v in values:
        if v is None:
            parts.append(b"\xff\xff\xff\xff")
        else:
            parts.append(_I32.pack(len(v)) + v)
    return b"".join(parts)


def _formats(codes: tuple[int, ...]) -> bytes:
    return _I16.pack(len(codes)) + b"".join(_I16.pack(c) for c in codes)


def _read_formats(r: Reader) -> tuple[int, ...]:
    codes = tuple(r.int16() for _ in range(r.count()))
    if any(c not in (0, 1) for c in codes):
        raise ProtocolError("format code must be 0 or 1")
    return codes


@lru_cache(maxsize=64)
def _formats_struct(n: int) -> struct.Struct:
    return struct.Struct(f"!{n}h")


def _count_at(body: bytes, pos: int, end: int) -> int:
    """A non-negative int16 count at `pos`."""
    if pos + 2 > end:
        raise ProtocolError("message truncated")
    n: int = _I16.unpack_from(body, pos)[0]
    if n < 0:
        raise ProtocolError("negative count")
    return n


def _formats_at(body: bytes, pos: int, end: int) -> tuple[tuple[int, ...], int]:
    """A format-code list at `pos` and the position after it (validated like `_read_formats`)."""
    n = _count_at(body, pos, end)
    pos += 2
    if pos + 2 * n > end:
        raise ProtocolError("message truncated")
    codes: tuple[int, ...] = _formats_struct(n).unpack_from(body, pos) if n else ()
    for c in codes:
        if c != 0 and c != 1:
            raise ProtocolError("format code must be 0 or 1")
    return codes, pos + 2 * n


def _no_nul(*names: str) -> None:
    for n in names:
        if "\0" in n:
            raise ValueError("string contains NUL")


class Message:
    """Base: `type` is the one-byte message type (b"" for startup-phase packets)."""

    __slots__ = ()
    type: ClassVar[bytes] = b""

    def body(self) -> bytes:
        return b""

    def encode(self) -> bytes:
        return frame(self.type, self.body())


class _Empty(Message):
    """Messages without a body decode from an empty body only."""

    __slots__ = ()

    @classmethod
    def decode(cls, body: bytes):  # noqa: ANN206 - returns cls
        if body:
            raise ProtocolError(f"{cls.__name__} has a body")
        return cls()


# ---------------------------------------------------------------------------------------------
# Startup phase (no type byte; int32 length, int32 code)


@dataclass(frozen=True, slots=True)
class StartupMessage(Message):
    protocol: int
    params: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        for k, v in self.params:
            _no_nul(k, v)

    def get(self, key: str) -> str | None:
        for k, v in self.params:
            if k == key:
                return v
        return None

    def encode(self) -> bytes:
        body = _I32.pack(self.protocol)
        body += b"".join(cstr(k) + cstr(v) for k, v in self.params) + b"\0"
        return _I32.pack(len(body) + 4) + body

    @classmethod
    def decode(cls, body: bytes) -> StartupMessage:
        """`body` is everything after the length word (the protocol code included)."""
        r = Reader(body)
        protocol = r.int32()
        params: list[tuple[str, str]] = []
        seen: set[str] = set()
        while True:
            key = r.cstr()
            if key == "":
                break
            if key in seen:
                raise ProtocolError(f"duplicate startup parameter {key!r}")
            seen.add(key)
            params.append((key, r.cstr()))
        r.end()
        return cls(protocol, tuple(params))


@dataclass(frozen=True, slots=True)
class SSLRequest(Message):
    def encode(self) -> bytes:
        return _I32.pack(8) + _I32.pack(SSL_REQUEST_CODE)


@dataclass(frozen=True, slots=True)
class GSSENCRequest(Message):
    def encode(self) -> bytes:
        return _I32.pack(8) + _I32.pack(GSSENC_REQUEST_CODE)


@dataclass(frozen=True, slots=True)
class CancelRequest(Message):
    pid: int
    secret: int

    def encode(self) -> bytes:
        return _I32.pack(16) + _I32.pack(CANCEL_REQUEST_CODE) + _I32.pack(self.pid) + _I32.pack(
            self.secret)


# ---------------------------------------------------------------------------------------------
# Frontend (client -> server)


@dataclass(frozen=True, slots=True)
class PasswordMessage(Message):
    """'p': cleartext/md5 password, or a SASL initial response / response (raw body)."""

    type: ClassVar[bytes] = b"p"
    data: bytes

    def body(self) -> bytes:
        return self.data

    @classmethod
    def decode(cls, body: bytes) -> PasswordMessage:
        return cls(body)

    def password(self) -> str:
        """The cleartext password: one NUL-terminated UTF-8 string and nothing after it."""
        r = Reader(self.data)
        value = r.cstr()
        r.end()
        return value


@dataclass(frozen=True, slots=True)
class Query(Message):
    type: ClassVar[bytes] = b"Q"
    sql: str

    def __post_init__(self) -> None:
        _no_nul(self.sql)

    def body(self) -> bytes:
        return cstr(self.sql)

    @classmethod
    def decode(cls, body: bytes) -> Query:
        r = Reader(body)
        sql = r.cstr()
        r.end()
        return cls(sql)


@dataclass(frozen=True, slots=True)
class Parse(Message):
    type: ClassVar[bytes] = b"P"
    name: str
    sql: str
    param_types: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _no_nul(self.name, self.sql)

    def body(self) -> bytes:
        types = b"".join(_U32.pack(t) for t in self.param_types)
        return cstr(self.name) + cstr(self.sql) + _I16.pack(len(self.param_types)) + types

    @classmethod
    def decode(cls, body: bytes) -> Parse:
        r = Reader(body)
        name, sql = r.cstr(), r.cstr()
        types = tuple(r.uint32() for _ in range(r.count()))
        r.end()
        return cls(name, sql, types)


@dataclass(frozen=True, slots=True)
class Bind(Message):
    type: ClassVar[bytes] = b"B"
    portal: str
    statement: str
    param_formats: tuple[int, ...] = ()
    params: tuple[bytes | None, ...] = ()
    result_formats: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _no_nul(self.portal, self.statement)

    def body(self) -> bytes:
        return (cstr(self.portal) + cstr(self.statement) + _formats(self.param_formats)
                + _I16.pack(len(self.params)) + _values(self.params)
                + _formats(self.result_formats))

    @classmethod
    def decode(cls, body: bytes) -> Bind:
        r = Reader(body)
        portal, statement = r.cstr(), r.cstr()
        pf = _read_formats(r)
        params = tuple(r.value() for _ in range(r.count()))
        rf = _read_formats(r)
        r.end()
        return cls(portal, statement, pf, params, rf)

    @staticmethod
    def peek(body: bytes) -> tuple[str, str, tuple[int, ...]]:
        """(portal, statement, result formats) without materialising the parameters: the
        relay needs only these, and Bind is on every prepared execution. Validates the same
        framing as `decode` (tests/proxy_db/test_messages.py checks they agree)."""
        end = len(body)
        e1 = body.find(b"\0")
        e2 = body.find(b"\0", e1 + 1) if e1 >= 0 else -1
        if e2 < 0:
            raise ProtocolError("unterminated string")
        try:
            portal = body[:e1].decode("utf-8") if e1 else ""
            statement = body[e1 + 1 : e2].decode("utf-8") if e2 > e1 + 1 else ""
        except UnicodeDecodeError as e:
            raise ProtocolError("string is not valid UTF-8") from e
        _, pos = _formats_at(body, e2 + 1, end)
        n = _count_at(body, pos, end)
        pos += 2
        unpack = _I32.unpack_from
        for _ in range(n):
            if pos + 4 > end:
                raise ProtocolError("message truncated")
            size = unpack(body, pos)[0]
            pos += 4
            if size > 0:
                pos += size
            elif size < -1:
                raise ProtocolError("negative value length")
        formats, pos = _formats_at(body, pos, end)
        if pos != end:
            raise ProtocolError("trailing bytes in message")
        return portal, statement, formats

    def result_format(self, column: int) -> int:
        """Format of result column `column` (0-based) per the protocol's 0/1/N rule."""
        if not self.result_formats:
            return 0
        if len(self.result_formats) == 1:
            return self.result_formats[0]
        return self.result_formats[column] if column < len(self.result_formats) else 0


@dataclass(frozen=True, slots=True)
class Describe(Message):
    type: ClassVar[bytes] = b"D"
    kind: bytes  # b"S" statement | b"P" portal
    name: str

    def __post_init__(self) -> None:
        if self.kind not in (b"S", b"P"):
            raise ValueError("Describe kind must be S or P")
        _no_nul(self.name)

    def body(self) -> bytes:
        return self.kind + cstr(self.name)

    @classmethod
    def decode(cls, body: bytes) -> Describe:
        r = Reader(body)
        kind = r.byte()
        if kind not in (b"S", b"P"):
            raise ProtocolError("Describe kind must be S or P")
        name = r.cstr()
        r.end()
        return cls(kind, name)


@dataclass(frozen=True, slots=True)
class Execute(Message):
    type: ClassVar[bytes] = b"E"
    portal: str
    max_rows: int = 0

    def body(self) -> bytes:
        return cstr(self.portal) + _I32.pack(self.max_rows)

    @classmethod
    def decode(cls, body: bytes) -> Execute:
        r = Reader(body)
        portal = r.cstr()
        max_rows = r.int32()
        r.end()
        return cls(portal, max_rows)


@dataclass(frozen=True, slots=True)
class Close(Message):
    type: ClassVar[bytes] = b"C"
    kind: bytes
    name: str

    def __post_init__(self) -> None:
        if self.kind not in (b"S", b"P"):
            raise ValueError("Close kind must be S or P")
        _no_nul(self.name)

    def body(self) -> bytes:
        return self.kind + cstr(self.name)

    @classmethod
    def decode(cls, body: bytes) -> Close:
        r = Reader(body)
        kind = r.byte()
        if kind not in (b"S", b"P"):
            raise ProtocolError("Close kind must be S or P")
        name = r.cstr()
        r.end()
        return cls(kind, name)


@dataclass(frozen=True, slots=True)
class Sync(_Empty):
    type: ClassVar[bytes] = b"S"


@dataclass(frozen=True, slots=True)
class Flush(_Empty):
    type: ClassVar[bytes] = b"H"


@dataclass(frozen=True, slots=True)
class Terminate(_Empty):
    type: ClassVar[bytes] = b"X"


@dataclass(frozen=True, slots=True)
class FunctionCall(Message):
    type: ClassVar[bytes] = b"F"
    oid: int
    arg_formats: tuple[int, ...] = ()
    args: tuple[bytes | None, ...] = ()
    result_format: int = 0

    def body(self) -> bytes:
        return (_U32.pack(self.oid) + _formats(self.arg_formats) + _I16.pack(len(self.args))
                + _values(self.args) + _I16.pack(self.result_format))

    @classmethod
    def decode(cls, body: bytes) -> FunctionCall:
        r = Reader(body)
        oid = r.uint32()
        af = _read_formats(r)
        args = tuple(r.value() for _ in range(r.count()))
        rf = r.int16()
        r.end()
        return cls(oid, af, args, rf)


@dataclass(frozen=True, slots=True)
class CopyData(Message):
    type: ClassVar[bytes] = b"d"
    data: bytes

    def body(self) -> bytes:
        return self.data

    @classmethod
    def decode(cls, body: bytes) -> CopyData:
        return cls(body)


@dataclass(frozen=True, slots=True)
class CopyDone(_Empty):
    type: ClassVar[bytes] = b"c"


@dataclass(frozen=True, slots=True)
class CopyFail(Message):
    type: ClassVar[bytes] = b"f"
    message: str

    def body(self) -> bytes:
        return cstr(self.message)

    @classmethod
    def decode(cls, body: bytes) -> CopyFail:
        r = Reader(body)
        msg = r.cstr()
        r.end()
        return cls(msg)


FRONTEND: dict[bytes, type] = {
    m.type: m
    for m in (PasswordMessage, Query, Parse, Bind, Describe, Execute, Close, Sync, Flush,
              Terminate, FunctionCall, CopyData, CopyDone, CopyFail)
}
