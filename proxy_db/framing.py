"""Incremental framing of the PostgreSQL byte stream, with hard size limits.

Two framers, because the protocol has two shapes:
- the startup phase: `int32 length, int32 code, ...` with no type byte (StartupMessage,
  SSLRequest, GSSENCRequest, CancelRequest), capped at 10,000 bytes like PostgreSQL itself;
- everything after it: `type byte, int32 length (itself included), body`.

Framers never do I/O: `feed(bytes)` and take complete frames out. Anything malformed or over a
limit raises `ProtocolError`; the session answers with a FATAL protocol error and closes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from proxy_db.messages import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    SSL_REQUEST_CODE,
    CancelRequest,
    GSSENCRequest,
    Message,
    ProtocolError,
    SSLRequest,
    StartupMessage,
)

_I32 = struct.Struct("!i")
_HDR = struct.Struct("!cI")
# One-byte `bytes` objects for every type code, so frames share them instead of slicing.
_TYPES = [bytes([i]) for i in range(256)]


@dataclass(frozen=True, slots=True)
class Limits:
    """Hard caps. Anything bigger is a protocol error, never a memory blow-up."""

    startup: int = 10_000  # PostgreSQL's own MAX_STARTUP_PACKET_LENGTH
    frontend: int = 64 * 1024 * 1024  # one client message (a huge Query or Bind)
    backend: int = 256 * 1024 * 1024  # one server message (a DataRow with a large value)
    buffered: int = 512 * 1024 * 1024  # bytes held while a session waits (catalog lookups)


DEFAULT_LIMITS = Limits()


class StartupFramer:
    """Frames startup-phase packets. Call `next()` after `feed()` until it returns None."""

    __slots__ = ("_buf", "limit")

    def __init__(self, limit: int = DEFAULT_LIMITS.startup) -> None:
        self._buf = bytearray()
        self.limit = limit

    def feed(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) > self.limit + 4:
            # A well-behaved client never has more than one startup packet in flight.
            raise ProtocolError("startup packet too large")

    @property
    def pending(self) -> int:
        return len(self._buf)

    def take_rest(self) -> bytes:
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

    def next(self) -> Message | None:
        if len(self._buf) < 4:
            return None
        (length,) = _I32.unpack_from(self._buf, 0)
        if length < 8 or length > self.limit:
            raise ProtocolError(f"invalid startup packet length {length}")
        if len(self._buf) < length:
            return None
        body = bytes(self._buf[4:length])
        del self._buf[:length]
        (code,) = _I32.unpack_from(body, 0)
        if code == SSL_REQUEST_CODE or code == GSSENC_REQUEST_CODE:
            if length != 8:
                raise ProtocolError("bad encryption request length")
            return SSLRequest() if code == SSL_REQUEST_CODE else GSSENCRequest()
        if code == CANCEL_REQUEST_CODE:
            if length != 16:
                raise ProtocolError("bad cancel request length")
            return CancelRequest(_I32.unpack_from(body, 4)[0], _I32.unpack_from(body, 8)[0])
        if code >> 16 != 3:
            raise ProtocolError(f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}")
        return StartupMessage.decode(body)


class MessageFramer:
    """Frames typed messages. `feed(data)` returns every complete `(type, raw)` frame, where
    `raw` is the whole message (header included) so it can be forwarded without re-encoding.

    A large message arriving in many chunks is collected in a list and joined once, so
    framing stays linear in the message size."""

    __slots__ = ("_buf", "_parts", "_have", "_need", "limit", "allowed")

    def __init__(self, limit: int, allowed: frozenset[bytes] | None = None) -> None:
        self._buf = b""
        self._parts: list[bytes] = []
        self._have = 0
        self._need = 0
        self.limit = limit
        self.allowed = allowed

    @property
    def pending(self) -> int:
        return self._have if self._need else len(self._buf)

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        if self._need:
            self._parts.append(data)
            self._have += len(data)
            if self._have < self._need:
                return []
            buf = b"".join(self._parts)
            self._parts, self._have, self._need = [], 0, 0
        else:
            buf = self._buf + data if self._buf else data
        out: list[tuple[bytes, bytes]] = []
        pos = 0
        n = len(buf)
        limit = self.limit + 4
        allowed = self.allowed
        while n - pos >= 5:
            type_, length = _HDR.unpack_from(buf, pos)
            if length < 4 or length > limit:
                raise ProtocolError(f"invalid message length {length} for type {type_!r}")
            if allowed is not None and type_ not in allowed:
                raise ProtocolError(f"unexpected message type {type_!r}")
            end = pos + 1 + length
            if end > n:
                if length > 65536:
                    self._parts = [buf[pos:]]
                    self._have = n - pos
                    self._need = 1 + length
                    self._buf = b""
                    return out
                break
            out.append((_TYPES[buf[pos]], buf[pos:end]))
            pos = end
        self._buf = buf[pos:] if pos < n else b""
        return out


def body(raw: bytes) -> bytes:
    """The body of a framed message."""
    return raw[5:]
