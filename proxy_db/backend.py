"""PostgreSQL v3 backend (server -> client) messages: one dataclass and one codec per message."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar, Protocol

from proxy_db.messages import (
    CopyData,
    CopyDone,
    Message,
    ProtocolError,
    Reader,
    _Empty,
    _formats,
    _read_formats,
    _values,
    cstr,
)

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_FIELD = struct.Struct("!IhIhih")


# ---------------------------------------------------------------------------------------------
# Authentication ('R'): one class per request code


@dataclass(frozen=True, slots=True)
class AuthenticationOk(Message):
    type: ClassVar[bytes] = b"R"
    code: ClassVar[int] = 0

    def body(self) -> bytes:
        return _I32.pack(0)


@dataclass(frozen=True, slots=True)
class AuthenticationCleartextPassword(Message):
    type: ClassVar[bytes] = b"R"
    code: ClassVar[int] = 3

    def body(self) -> bytes:
        return _I32.pack(3)


@dataclass(frozen=True, slots=True)
class AuthenticationMD5Password(Message):
    type: ClassVar[bytes] = b"R"
    code: ClassVar[int] = 5
    salt: bytes

    def __post_init__(self) -> None:
        if len(self.salt) != 4:
            raise ValueError("md5 salt must be 4 bytes")

    def body(self) -> bytes:
        return _I32.pack(5) + self.salt


@dataclass(frozen=True, slots=True)
class AuthenticationSASL(Message):
    type: ClassVar[bytes] = b"R"
    code: ClassVar[int] = 10
    mechanisms: tuple[str, ...]

    def body(self) -> bytes:
        return _I32.pack(10) + b"".join(cstr(m) for m in self.mechanisms) + b"\0"


@dataclass(frozen=True, slots=True)
class AuthenticationSASLContinue(Message):
    type: ClassVar[bytes] = b"R"
    code: ClassVar[int] = 11
    data: bytes

    def body(self) -> bytes:
        return _I32.pack(11) + self.data


@dataclass(frozen=True, slots=True)
class AuthenticationSASLFinal(Message):
    type: ClassVar[bytes] = b"R"
    code: ClassVar[int] = 12
    data: bytes

    def body(self) -> bytes:
        return _I32.pack(12) + self.data


@dataclass(frozen=True, slots=True)
class AuthenticationOther(Message):
    """A request we do not implement (Kerberos, GSS, SSPI...): the login fails."""

    type: ClassVar[bytes] = b"R"
    code: int
    data: bytes = b""

    def body(self) -> bytes:
        return _I32.pack(self.code) + self.data


class Authentication:
    """Decoder for 'R': dispatches on the request code."""

    type: ClassVar[bytes] = b"R"

    @staticmethod
    def decode(body: bytes) -> Message:
        r = Reader(body)
        code = r.int32()
        if code in (0, 3):
            r.end()
            return AuthenticationOk() if code == 0 else AuthenticationCleartextPassword()
        if code == 5:
            salt = r.raw(4)
            r.end()
            return AuthenticationMD5Password(salt)
        if code == 10:
            mechs = []
            while True:
                m = r.cstr()
                if not m:
                    break
                mechs.append(m)
            r.end()
            return AuthenticationSASL(tuple(mechs))
        if code == 11:
            return AuthenticationSASLContinue(r.rest())
        if code == 12:
            return AuthenticationSASLFinal(r.rest())
        return AuthenticationOther(code, r.rest())


# ---------------------------------------------------------------------------------------------
# Session state


@dataclass(frozen=True, slots=True)
class ParameterStatus(Message):
    type: ClassVar[bytes] = b"S"
    name: str
    value: str

    def body(self) -> bytes:
        return cstr(self.name) + cstr(self.value)

    @classmethod
    def decode(cls, body: bytes) -> ParameterStatus:
        r = Reader(body)
        name, value = r.cstr(), r.cstr()
        r.end()
        return cls(name, value)


@dataclass(frozen=True, slots=True)
class BackendKeyData(Message):
    type: ClassVar[bytes] = b"K"
    pid: int
    secret: int

    def body(self) -> bytes:
        return _I32.pack(self.pid) + _I32.pack(self.secret)

    @classmethod
    def decode(cls, body: bytes) -> BackendKeyData:
        r = Reader(body)
        pid, secret = r.int32(), r.int32()
        r.end()
        return cls(pid, secret)


@dataclass(frozen=True, slots=True)
class ReadyForQuery(Message):
    type: ClassVar[bytes] = b"Z"
    status: bytes  # b"I" idle | b"T" in transaction | b"E" failed transaction

    def __post_init__(self) -> None:
        if self.status not in (b"I", b"T", b"E"):
            raise ValueError("transaction status must be I, T or E")

    def body(self) -> bytes:
        return self.status

    @classmethod
    def decode(cls, body: bytes) -> ReadyForQuery:
        if body not in (b"I", b"T", b"E"):
            raise ProtocolError("bad ReadyForQuery status")
        return cls(body)


@dataclass(frozen=True, slots=True)
class NegotiateProtocolVersion(Message):
    type: ClassVar[bytes] = b"v"
    newest_minor: int
    unsupported: tuple[str, ...] = ()

    def body(self) -> bytes:
        return (_I32.pack(self.newest_minor) + _I32.pack(len(self.unsupported))
                + b"".join(cstr(o) for o in self.unsupported))

    @classmethod
    def decode(cls, body: bytes) -> NegotiateProtocolVersion:
        r = Reader(body)
        minor, n = r.int32(), r.int32()
        if n < 0 or n > 1000:
            raise ProtocolError("bad option count")
        opts = tuple(r.cstr() for _ in range(n))
        r.end()
        return cls(minor, opts)


# ---------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True, slots=True)
class FieldDescription:
    name: str
    table_oid: int = 0
    attnum: int = 0
    type_oid: int = 25  # text
    type_size: int = -1
    type_mod: int = -1
    format: int = 0


@dataclass(frozen=True, slots=True)
class RowDescription(Message):
    type: ClassVar[bytes] = b"T"
    fields: tuple[FieldDescription, ...]

    def body(self) -> bytes:
        out = [_I16.pack(len(self.fields))]
        for f in self.fields:
            out.append(cstr(f.name))
            out.append(_FIELD.pack(f.table_oid, f.attnum, f.type_oid, f.type_size, f.type_mod,
                                   f.format))
        return b"".join(out)

    @classmethod
    def decode(cls, body: bytes) -> RowDescription:
        r = Reader(body)
        fields = []
        for _ in range(r.count()):
            name = r.cstr()
            vals = _FIELD.unpack(r.raw(_FIELD.size))
            if vals[5] not in (0, 1):
                raise ProtocolError("format code must be 0 or 1")
            fields.append(FieldDescription(name, *vals))
        r.end()
        return cls(tuple(fields))


@dataclass(frozen=True, slots=True)
class DataRow(Message):
    type: ClassVar[bytes] = b"D"
    values: tuple[bytes | None, ...]

    def body(self) -> bytes:
        return _I16.pack(len(self.values)) + _values(self.values)

    @classmethod
    def decode(cls, body: bytes) -> DataRow:
        r = Reader(body)
        values = tuple(r.value() for _ in range(r.count()))
        r.end()
        return cls(values)


@dataclass(frozen=True, slots=True)
class CommandComplete(Message):
    type: ClassVar[bytes] = b"C"
    tag: str

    def body(self) -> bytes:
        return cstr(self.tag)

    @classmethod
    def decode(cls, body: bytes) -> CommandComplete:
        r = Reader(body)
        tag = r.cstr()
        r.end()
        return cls(tag)

    def rows(self) -> int | None:
        """Row count from the tag ("SELECT 5", "INSERT 0 3", "COPY 7"), None when absent."""
        last = self.tag.rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() and " " in self.tag else None


# Error and notice field codes (protocol "Error and Notice Message Fields").
SEVERITY, SEVERITY_V, SQLSTATE, MESSAGE, DETAIL, HINT, WHERE = "S", "V", "C", "M", "D", "H", "W"
TEXT_FIELDS = ("M", "D", "H", "W", "q", "s", "t", "c", "d", "n")


@dataclass(frozen=True, slots=True)
class ErrorResponse(Message):
    type: ClassVar[bytes] = b"E"
    fields: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        for code, value in self.fields:
            if len(code) != 1 or code == "\0" or "\0" in value:
                raise ValueError("bad error field")

    @classmethod
    def make(cls, severity: str, sqlstate: str, message: str, **extra: str) -> ErrorResponse:
        fields = [(SEVERITY, severity), (SEVERITY_V, severity), (SQLSTATE, sqlstate),
                  (MESSAGE, message)]
        fields += [(k, v) for k, v in extra.items()]
        return cls(tuple(fields))

    def get(self, code: str) -> str | None:
        for c, v in self.fields:
            if c == code:
                return v
        return None

    @property
    def sqlstate(self) -> str | None:
        return self.get(SQLSTATE)

    @property
    def fatal(self) -> bool:
        return (self.get(SEVERITY_V) or self.get(SEVERITY)) in ("FATAL", "PANIC")

    def body(self) -> bytes:
        return b"".join(c.encode("ascii") + cstr(v) for c, v in self.fields) + b"\0"

    @classmethod
    def decode(cls, body: bytes) -> ErrorResponse:
        r = Reader(body)
        fields = []
        while True:
            code = r.byte()
            if code == b"\0":
                break
            try:
                fields.append((code.decode("ascii"), r.cstr()))
            except UnicodeDecodeError as e:
                raise ProtocolError("bad error field code") from e
        r.end()
        return cls(tuple(fields))


@dataclass(frozen=True, slots=True)
class NoticeResponse(ErrorResponse):
    type: ClassVar[bytes] = b"N"


@dataclass(frozen=True, slots=True)
class EmptyQueryResponse(_Empty):
    type: ClassVar[bytes] = b"I"


@dataclass(frozen=True, slots=True)
class ParseComplete(_Empty):
    type: ClassVar[bytes] = b"1"


@dataclass(frozen=True, slots=True)
class BindComplete(_Empty):
    type: ClassVar[bytes] = b"2"


@dataclass(frozen=True, slots=True)
class CloseComplete(_Empty):
    type: ClassVar[bytes] = b"3"


@dataclass(frozen=True, slots=True)
class NoData(_Empty):
    type: ClassVar[bytes] = b"n"


@dataclass(frozen=True, slots=True)
class PortalSuspended(_Empty):
    type: ClassVar[bytes] = b"s"


@dataclass(frozen=True, slots=True)
class ParameterDescription(Message):
    type: ClassVar[bytes] = b"t"
    types: tuple[int, ...]

    def body(self) -> bytes:
        return _I16.pack(len(self.types)) + b"".join(_U32.pack(t) for t in self.types)

    @classmethod
    def decode(cls, body: bytes) -> ParameterDescription:
        r = Reader(body)
        n = r.uint16()
        types = tuple(r.uint32() for _ in range(n))
        r.end()
        return cls(types)


@dataclass(frozen=True, slots=True)
class CopyInResponse(Message):
    type: ClassVar[bytes] = b"G"
    format: int
    column_formats: tuple[int, ...]

    def body(self) -> bytes:
        return bytes([self.format]) + _formats(self.column_formats)

    @classmethod
    def decode(cls, body: bytes) -> CopyInResponse:
        r = Reader(body)
        fmt = r.byte()[0]
        if fmt not in (0, 1):
            raise ProtocolError("bad copy format")
        cols = _read_formats(r)
        r.end()
        return cls(fmt, cols)


@dataclass(frozen=True, slots=True)
class CopyOutResponse(CopyInResponse):
    type: ClassVar[bytes] = b"H"


@dataclass(frozen=True, slots=True)
class CopyBothResponse(CopyInResponse):
    type: ClassVar[bytes] = b"W"


@dataclass(frozen=True, slots=True)
class NotificationResponse(Message):
    type: ClassVar[bytes] = b"A"
    pid: int
    channel: str
    payload: str

    def body(self) -> bytes:
        return _I32.pack(self.pid) + cstr(self.channel) + cstr(self.payload)

    @classmethod
    def decode(cls, body: bytes) -> NotificationResponse:
        r = Reader(body)
        pid, channel, payload = r.int32(), r.cstr(), r.cstr()
        r.end()
        return cls(pid, channel, payload)


@dataclass(frozen=True, slots=True)
class FunctionCallResponse(Message):
    type: ClassVar[bytes] = b"V"
    value: bytes | None

    def body(self) -> bytes:
        return _values((self.value,))

    @classmethod
    def decode(cls, body: bytes) -> FunctionCallResponse:
        r = Reader(body)
        v = r.value()
        r.end()
        return cls(v)


class BackendDecoder(Protocol):
    """What BACKEND maps a type byte to: a message class (or `Authentication`) whose
    `decode(body)` builds the message."""

    def decode(self, body: bytes, /) -> Message: ...


BACKEND: dict[bytes, BackendDecoder] = {
    m.type: m
    for m in (Authentication, ParameterStatus, BackendKeyData, ReadyForQuery,
              NegotiateProtocolVersion, RowDescription, DataRow, CommandComplete, ErrorResponse,
              NoticeResponse, EmptyQueryResponse, ParseComplete, BindComplete, CloseComplete,
              NoData, PortalSuspended, ParameterDescription, CopyInResponse, CopyOutResponse,
              CopyBothResponse, NotificationResponse, FunctionCallResponse, CopyData, CopyDone)
}


def decode_backend(type_: bytes, body: bytes) -> Message:
    cls = BACKEND.get(type_)
    if cls is None:
        raise ProtocolError(f"unknown backend message type {type_!r}")
    return cls.decode(body)
