"""Upstream login, sans-IO: the gateway logs in to PostgreSQL with the target's credentials.

`UpstreamLogin` is fed the server's bytes and returns the bytes to send back, until the server
says ReadyForQuery. It speaks SCRAM-SHA-256 (with `tls-server-end-point` channel binding when the
connection is TLS and the server offers SCRAM-SHA-256-PLUS; scramp does the maths), md5, and
trust; a cleartext-password request is answered only over TLS or to a loopback server. The
agent's token never reaches this module: the session builds the startup parameters itself.

The TLS decision (`ssl_plan`, `client_ssl_context`) follows libpq's `sslmode` semantics.
"""

from __future__ import annotations

import hashlib
import ipaddress
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

import scramp
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from proxy_db.backend import (
    AuthenticationCleartextPassword,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    BackendKeyData,
    ErrorResponse,
    NegotiateProtocolVersion,
    NoticeResponse,
    ParameterStatus,
    ReadyForQuery,
    decode_backend,
)
from proxy_db.framing import MessageFramer
from proxy_db.messages import PROTOCOL_3_0, PasswordMessage, ProtocolError, StartupMessage, frame

LOGIN_MESSAGE_LIMIT = 1024 * 1024


class UpstreamLoginError(Exception):
    """The upstream refused the login or broke the protocol. Never carries a secret."""

    def __init__(self, reason: str, sqlstate: str = "08006") -> None:
        super().__init__(reason)
        self.reason = reason
        self.sqlstate = sqlstate


def tls_server_end_point(der: bytes) -> bytes:
    """RFC 5929 channel-binding data: the server certificate's hash (MD5/SHA-1 -> SHA-256)."""
    cert = x509.load_der_x509_certificate(der)
    try:
        algo = cert.signature_hash_algorithm
    except Exception:  # noqa: BLE001 - unknown signature algorithms (e.g. Ed25519)
        algo = None
    if algo is None or algo.name in ("md5", "sha1"):
        algo = hashes.SHA256()
    h = hashes.Hash(algo)
    h.update(der)
    return h.finalize()


def md5_password(user: str, password: str, salt: bytes) -> bytes:
    inner = hashlib.md5((password + user).encode()).hexdigest()  # noqa: S324 - the protocol
    return b"md5" + hashlib.md5(inner.encode() + salt).hexdigest().encode()  # noqa: S324


def is_loopback(host: str) -> bool:
    if host == "localhost" or host.startswith("/"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class SslPlan:
    request: bool  # send SSLRequest first
    required: bool  # 'N' is a failure
    verify: bool  # verify the certificate chain
    check_hostname: bool


def ssl_plan(sslmode: str) -> SslPlan:
    return {
        "disable": SslPlan(False, False, False, False),
        "prefer": SslPlan(True, False, False, False),
        "require": SslPlan(True, True, False, False),
        "verify-ca": SslPlan(True, True, True, False),
        "verify-full": SslPlan(True, True, True, True),
    }[sslmode]


def client_ssl_context(plan: SslPlan, ca_file: str | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if plan.verify:
        ctx.check_hostname = plan.check_hostname
        ctx.verify_mode = ssl.CERT_REQUIRED
        if ca_file:
            ctx.load_verify_locations(ca_file)
        else:
            ctx.load_default_certs()
    else:
        # libpq's prefer/require: encrypted, unauthenticated; SCRAM channel binding still
        # detects a man in the middle.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class UpstreamLogin:
    """One login conversation. `startup()` first, then `receive()` until `done`."""

    def __init__(self, user: str, database: str, password: str | None,
                 params: Sequence[tuple[str, str]] = (), *, host: str = "",
                 tls_peer_cert: bytes | None = None) -> None:
        self.user = user
        self.database = database
        self._password = password
        self.extra = tuple(params)
        self.host = host
        self.tls = tls_peer_cert is not None
        self._cb = tls_server_end_point(tls_peer_cert) if tls_peer_cert else None
        self._framer = MessageFramer(LOGIN_MESSAGE_LIMIT)
        self._scram: scramp.ScramClient | None = None
        self.method: str | None = None
        self.mechanism: str | None = None
        self.authenticated = False
        self.done = False
        self.params: list[tuple[str, str]] = []
        self.key: tuple[int, int] | None = None
        self.status = b"I"
        self.notices: list[NoticeResponse] = []
        self.leftover: list[tuple[bytes, bytes]] = []

    def startup(self) -> bytes:
        params = (("user", self.user), ("database", self.database)) + self.extra
        return StartupMessage(PROTOCOL_3_0, params).encode()

    def receive(self, data: bytes) -> bytes:
        """Feed server bytes; returns what to send. Raises UpstreamLoginError."""
        try:
            frames = self._framer.feed(data)
        except ProtocolError as e:
            raise UpstreamLoginError(f"upstream protocol error: {e}") from e
        out = []
        for i, (type_, raw) in enumerate(frames):
            if self.done:
                self.leftover.extend(frames[i:])
                break
            try:
                msg = decode_backend(type_, raw[5:])
            except ProtocolError as e:
                raise UpstreamLoginError(f"upstream protocol error: {e}") from e
            out.append(self._handle(msg))
        return b"".join(out)

    def _need_password(self) -> str:
        if self._password is None:
            raise UpstreamLoginError("upstream requires a password but the target has none",
                                     "28P01")
        return self._password

    def _handle(self, msg: object) -> bytes:
        if isinstance(msg, ErrorResponse) and not isinstance(msg, NoticeResponse):
            # The server's text may name the upstream user; never the password.
            state = msg.sqlstate or "08006"
            raise UpstreamLoginError(f"upstream refused the login: {msg.get('M')}", state)
        if isinstance(msg, NoticeResponse):
            self.notices.append(msg)
            return b""
        if isinstance(msg, NegotiateProtocolVersion):
            return b""  # we asked for 3.0 with no options; nothing to downgrade
        if not self.authenticated:
            return self._auth(msg)
        if isinstance(msg, ParameterStatus):
            self.params.append((msg.name, msg.value))
            return b""
        if isinstance(msg, BackendKeyData):
            self.key = (msg.pid, msg.secret)
            return b""
        if isinstance(msg, ReadyForQuery):
            self.status = msg.status
            self.done = True
            return b""
        raise UpstreamLoginError(f"unexpected upstream message {type(msg).__name__} at login")

    def _auth(self, msg: object) -> bytes:
        if isinstance(msg, AuthenticationOk):
            if self._scram is not None and self.method != "scram-done":
                raise UpstreamLoginError("upstream ended SCRAM without proving itself")
            self.method = self.method or "trust"
            self.authenticated = True
            return b""
        if isinstance(msg, AuthenticationMD5Password) and self.method is None:
            self.method = "md5"
            return PasswordMessage(md5_password(self.user, self._need_password(), msg.salt)
                                   + b"\0").encode()
        if isinstance(msg, AuthenticationCleartextPassword) and self.method is None:
            if not (self.tls or is_loopback(self.host)):
                raise UpstreamLoginError("upstream asked for a cleartext password over an "
                                         "unencrypted connection", "28000")
            self.method = "password"
            return PasswordMessage(self._need_password().encode() + b"\0").encode()
        if isinstance(msg, AuthenticationSASL) and self.method is None:
            return self._scram_first(msg.mechanisms)
        if isinstance(msg, AuthenticationSASLContinue) and self.method == "scram":
            assert self._scram is not None
            try:
                self._scram.set_server_first(msg.data.decode("utf-8"))
                final = self._scram.get_client_final()
            except (scramp.ScramException, UnicodeDecodeError) as e:
                raise UpstreamLoginError(f"SCRAM failed: {e}", "28P01") from e
            return frame(b"p", final.encode())
        if isinstance(msg, AuthenticationSASLFinal) and self.method == "scram":
            assert self._scram is not None
            try:
                self._scram.set_server_final(msg.data.decode("utf-8"))
            except (scramp.ScramException, UnicodeDecodeError) as e:
                raise UpstreamLoginError(f"upstream failed SCRAM server proof: {e}",
                                         "28P01") from e
            self.method = "scram-done"
            return b""
        raise UpstreamLoginError(f"unsupported upstream authentication {type(msg).__name__}",
                                 "28000")

    def _scram_first(self, offered: tuple[str, ...]) -> bytes:
        mechs = [m for m in offered if m in ("SCRAM-SHA-256", "SCRAM-SHA-256-PLUS")]
        if not mechs:
            raise UpstreamLoginError(f"no supported SASL mechanism in {list(offered)}", "28000")
        cb = ("tls-server-end-point", self._cb) if self._cb is not None else None
        if cb is None:
            mechs = [m for m in mechs if not m.endswith("-PLUS")]
        if not mechs:
            raise UpstreamLoginError("upstream insists on channel binding without TLS", "28000")
        try:
            self._scram = scramp.ScramClient(mechs, self.user, self._need_password(),
                                             channel_binding=cb)
            first = self._scram.get_client_first()
        except scramp.ScramException as e:
            raise UpstreamLoginError(f"SCRAM failed: {e}", "28P01") from e
        self.method = "scram"
        self.mechanism = self._scram.mechanism_name
        name = self.mechanism.encode() + b"\0"
        data = first.encode()
        return frame(b"p", name + len(data).to_bytes(4, "big") + data)
