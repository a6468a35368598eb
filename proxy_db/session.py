"""One client session of the Postgres gateway, sans-IO.

The server feeds bytes in (`client_data`, `upstream_data`) and results of slow work
(`tls_established`, `token_verified`, `upstream_connected`, `relations_found`, ...), then takes
bytes and actions out (`take()`). Nothing here touches a socket or an event loop, so every
protocol state is testable as a transcript of bytes.

Session states and the events that move between them (any other pair is a bug -> closed):

    STARTUP    --ssl_request-->    TLS         ('S' sent; the server upgrades the socket)
    STARTUP    --gssenc_request--> STARTUP     ('N': no GSS encryption)
    STARTUP    --cancel-->         CLOSED      (forwarded to the upstream backend, no reply)
    STARTUP    --startup-->        AUTH        (AuthenticationCleartextPassword sent)
    TLS        --tls_established--> STARTUP    (encrypted; a second SSLRequest gets 'N')
    AUTH       --password-->       VERIFYING   (the JWT goes to the identity engine)
    VERIFYING  --verified-->       CONNECTING  (target chosen by dbname; upstream login starts)
    CONNECTING --connected-->      READY       (AuthenticationOk ... ReadyForQuery sent)
    READY      --message-->        READY       (relay.py: every statement decided and audited)
    any        --refuse-->         CLOSED      (FATAL sent: bad token, unknown db, protocol...)
    any        --closed-->         CLOSED

Refusals carry their SQLSTATE (`addons.model` errors) and become one FATAL ErrorResponse here.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from addons.model import AuthError, Identity, PortcullisError, UnknownTarget
from proxy_db.backend import (
    AuthenticationCleartextPassword,
    AuthenticationOk,
    BackendKeyData,
    ErrorResponse,
    NegotiateProtocolVersion,
    ParameterStatus,
    ReadyForQuery,
)
from proxy_db.framing import DEFAULT_LIMITS, Limits, MessageFramer, StartupFramer
from proxy_db.messages import (
    CancelRequest,
    GSSENCRequest,
    PasswordMessage,
    ProtocolError,
    SSLRequest,
    StartupMessage,
)

log = logging.getLogger("portcullis.postgres")


class State(enum.Enum):
    STARTUP = "startup"
    TLS = "tls"
    AUTH = "auth"
    VERIFYING = "verifying"
    CONNECTING = "connecting"
    READY = "ready"
    CLOSED = "closed"


S = State
TRANSITIONS: dict[tuple[State, str], State] = {
    (S.STARTUP, "ssl_request"): S.TLS,
    (S.STARTUP, "gssenc_request"): S.STARTUP,
    (S.STARTUP, "cancel"): S.CLOSED,
    (S.STARTUP, "startup"): S.AUTH,
    (S.TLS, "tls_established"): S.STARTUP,
    (S.AUTH, "password"): S.VERIFYING,
    (S.VERIFYING, "verified"): S.CONNECTING,
    (S.CONNECTING, "connected"): S.READY,
    (S.READY, "message"): S.READY,
}
ANY_STATE_EVENTS = {"refuse": S.CLOSED, "closed": S.CLOSED}

# Startup parameters a client may set; they are passed upstream. Everything else is dropped
# (`options` and `replication` are refused outright): the gateway builds the upstream startup.
PASSTHROUGH_PARAMS = ("application_name", "DateStyle", "TimeZone", "extra_float_digits",
                      "IntervalStyle")
UTF8_NAMES = ("utf8", "unicode")
LOG_LINE = object()  # marks a deferred decision log line in Session.deferred
# Settings the gateway pins: the SQL classifier lexes text as UTF-8 with standard strings.
PINNED = {"client_encoding": "UTF8", "standard_conforming_strings": "on"}


# ---------------------------------------------------------------------------------------------
# Actions the server performs for the session


@dataclass(frozen=True, slots=True)
class StartTLS:
    pass


@dataclass(frozen=True, slots=True)
class VerifyToken:
    token: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class ConnectUpstream:
    target: Any  # addons.config.TargetConfig
    params: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class ForwardCancel:
    pid: int
    secret: int = field(repr=False)


@dataclass(frozen=True, slots=True)
class LookupRelations:
    oids: frozenset[int]
    names: frozenset[str]


@dataclass(frozen=True, slots=True)
class LookupFunction:
    oid: int


@dataclass(frozen=True, slots=True)
class AwaitApproval:
    """Hold the session's client side until approval `approval_id` is decided or times out;
    then call `relay.approval_done(approval_id, state)`."""

    approval_id: str


@dataclass(frozen=True, slots=True)
class CloseSession:
    reason: str


@dataclass
class Env:
    """What a session may use. Plain objects; the server builds one from the Runtime."""

    policies: Any  # .current -> PolicySet
    audit: Any  # addons.audit.AuditLog
    targets: Any  # .by_database(name) -> TargetConfig | None
    mask_key: bytes = b""
    tls_available: bool = False
    require_tls: bool = False
    catalogs: dict[str, Any] = field(default_factory=dict)  # target name -> CatalogCache
    clock: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic
    limits: Limits = DEFAULT_LIMITS
    # Outcome lines chained by `run_deferred()` after the upstream write; the server writes them
    # (`AuditLog.flush()`, one write for all) before the answer goes to the client.
    defer_outcomes: bool = False
    # addons.approvals.ApprovalStore: `review` statements are held for approval (None: refused)
    approvals: Any = None
    # recording.Segment sink (recording.SegmentWriter); None: the session is not recorded
    recorder: Callable[[Any], None] | None = None
    # .info(msg, *args): the decisions logger, or addons.decisionlog.DecisionLines
    decisions: Any = field(
        default_factory=lambda: logging.getLogger("portcullis.decisions"))


def write_outcome(audit: Any, args: tuple[Any, ...], defer: bool = False) -> None:
    """`defer=True`: chain the line now; the server writes every chained line in one write
    before the answer goes to the client (the statement has already run either way)."""
    try:
        audit.outcome(*args, defer=defer)
    except Exception:  # noqa: BLE001 - the statement already ran; say so loudly
        log.error("audit outcome for %s could not be written", args[0])


def fatal(err: PortcullisError | ProtocolError, message: str | None = None) -> bytes:
    return ErrorResponse.make("FATAL", err.sqlstate, message or str(err)).encode()


class Session:
    """The startup, TLS and authentication phases; READY is handled by `relay.Relay`."""

    def __init__(self, env: Env, client: str = "-") -> None:
        self.env = env
        self.client = client
        self.state = State.STARTUP
        self.encrypted = False
        self.identity: Identity | None = None
        self.target: Any = None
        self.startup: StartupMessage | None = None
        self.user = "-"
        self.database = "-"
        self.close_reason: str | None = None
        self._startup = StartupFramer(env.limits.startup)
        self._framer: MessageFramer | None = None
        self._out_client: list[bytes] = []
        self._out_upstream: list[bytes] = []
        self._actions: list[Any] = []
        self._held: list[bytes] = []  # client bytes that arrived before READY
        self.relay: Any = None
        # audit outcomes and ALLOW log lines (Env.defer_outcomes), written by run_deferred()
        self.deferred: list[tuple[Any, ...]] = []
        self.recording: Any = None  # recording.SessionRecording once READY (Env.recorder)

    # -- plumbing -------------------------------------------------------------------------------
    def take(self) -> tuple[bytes, bytes, list[Any]]:
        """Bytes for the client, bytes for the upstream, and actions, since the last call."""
        c = b"".join(self._out_client)
        if self.recording is not None and c:
            self.recording.to_client(c)
        u = b"".join(self._out_upstream)
        a = self._actions
        self._out_client, self._out_upstream, self._actions = [], [], []
        return c, u, a

    def run_deferred(self) -> None:
        """Chain deferred audit outcome lines and write decision log lines, in the order they
        were deferred (the server calls this after sending this round's upstream bytes and
        writes the chained lines before it sends the client's)."""
        if self.deferred:
            work, self.deferred = self.deferred, []
            for args in work:
                if args[0] is LOG_LINE:
                    self.env.decisions.info(*args[1])
                else:
                    write_outcome(self.env.audit, args, defer=self.env.defer_outcomes)

    def send_client(self, data: bytes) -> None:
        self._out_client.append(data)

    def send_upstream(self, data: bytes) -> None:
        self._out_upstream.append(data)

    def act(self, action: Any) -> None:
        self._actions.append(action)

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    def _to(self, event: str) -> None:
        nxt = ANY_STATE_EVENTS.get(event) or TRANSITIONS.get((self.state, event))
        if nxt is None:
            raise ProtocolError(f"{event} is not allowed in state {self.state.value}")
        self.state = nxt

    def refuse(self, err: PortcullisError | ProtocolError, message: str | None = None) -> None:
        """FATAL to the client and close everything."""
        if self.closed:
            return
        self.send_client(fatal(err, message))
        self.close(message or str(err))

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.close_reason = reason
        self._to("closed")
        self.act(CloseSession(reason))
        self.end_recording(reason)

    def end_recording(self, reason: str) -> None:
        """Hand the recording's last segment over (idempotent; the server calls it too)."""
        rec, self.recording = self.recording, None
        if rec is not None:
            rec.finish(reason, b"".join(self._out_client))

    # -- input ----------------------------------------------------------------------------------
    def client_data(self, data: bytes) -> None:
        if self.closed or not data:
            return
        try:
            if self.state is State.READY:
                self.relay.client_data(data)
            elif self.state in (State.STARTUP, State.TLS):
                self._startup.feed(data)
                self._startup_packets()
            elif self.state is State.AUTH:
                self._auth_data(data)
            else:  # VERIFYING / CONNECTING: a client should be waiting; hold (bounded)
                self._held.append(data)
                if sum(len(b) for b in self._held) > self.env.limits.startup:
                    raise ProtocolError("client sent data before authentication completed")
        except ProtocolError as e:
            self.refuse(e, f"portcullis: protocol error: {e}")

    def upstream_data(self, data: bytes) -> None:
        if self.closed or not data:
            return
        if self.state is not State.READY:
            self.refuse(ProtocolError("upstream spoke out of turn"))
            return
        try:
            self.relay.upstream_data(data)
        except ProtocolError as e:
            self.refuse(e, f"portcullis: upstream protocol error: {e}")

    def upstream_closed(self) -> None:
        self.close("upstream closed the connection")

    # -- startup phase ---------------------------------------------------------------------------
    def _startup_packets(self) -> None:
        while not self.closed and self.state is State.STARTUP:
            msg = self._startup.next()
            if msg is None:
                return
            if isinstance(msg, SSLRequest):
                self._ssl_request()
            elif isinstance(msg, GSSENCRequest):
                self._to("gssenc_request")
                self.send_client(b"N")
            elif isinstance(msg, CancelRequest):
                self._to("cancel")
                self.act(ForwardCancel(msg.pid, msg.secret))
                self.act(CloseSession("cancel request"))
                self.close_reason = "cancel request"
            else:
                assert isinstance(msg, StartupMessage)
                self._startup_message(msg)
        if self.state is State.TLS and self._startup.pending:
            # Bytes after SSLRequest before the handshake would be read as if encrypted
            # (CVE-2021-23214): refuse.
            raise ProtocolError("data received after SSLRequest before the TLS handshake")

    def _ssl_request(self) -> None:
        if self.encrypted or not self.env.tls_available:
            self.send_client(b"N")
            return
        if self._startup.pending:
            raise ProtocolError("data received after SSLRequest before the TLS handshake")
        self._to("ssl_request")
        self.send_client(b"S")
        self.act(StartTLS())

    def tls_established(self) -> None:
        self._to("tls_established")
        self.encrypted = True

    def _startup_message(self, msg: StartupMessage) -> None:
        self.startup = msg
        self.user = msg.get("user") or "-"
        self.database = msg.get("database") or msg.get("user") or ""
        if self.env.require_tls and not self.encrypted:
            self.refuse(_TlsRequired("TLS required"), "portcullis: this gateway requires TLS "
                        "(connect with sslmode=require)")
            return
        if msg.get("user") is None:
            self.refuse(AuthError("no user"), "portcullis: no user name in the startup packet")
            return
        if msg.get("replication") is not None:
            self.refuse(_FeatureNotSupported("replication"),
                        "portcullis: replication connections are not allowed")
            return
        if msg.get("options") is not None:
            self.refuse(_FeatureNotSupported("options"),
                        "portcullis: startup options are not allowed through the gateway")
            return
        enc = msg.get("client_encoding")
        if enc is not None and not is_utf8(enc):
            self.refuse(_InvalidParameter("client_encoding"),
                        "portcullis: client_encoding must be UTF8 behind the gateway")
            return
        self._to("startup")
        unsupported = tuple(k for k, _ in msg.params if k.startswith("_pq_."))
        if (msg.protocol & 0xFFFF) != 0 or unsupported:
            self.send_client(NegotiateProtocolVersion(0, unsupported).encode())
        self._framer = MessageFramer(self.env.limits.startup, frozenset((b"p",)))
        self.send_client(AuthenticationCleartextPassword().encode())

    # -- authentication --------------------------------------------------------------------------
    def _auth_data(self, data: bytes) -> None:
        assert self._framer is not None
        frames = self._framer.feed(data)
        if not frames:
            return
        if len(frames) > 1 or self._framer.pending:
            raise ProtocolError("unexpected data after the password message")
        try:
            token = PasswordMessage.decode(frames[0][1][5:]).password()
        except ProtocolError:
            raise ProtocolError("malformed password message") from None
        self._to("password")
        self.act(VerifyToken(token))

    def token_verified(self, identity: Identity) -> None:
        if self.closed:
            return
        self.identity = identity
        target = self.env.targets.by_database(self.database)
        if target is None or getattr(target, "protocol", "postgres") != "postgres":
            self._audit_refusal(UnknownTarget(f"database {self.database!r} is not a target"),
                                "unknown_target")
            self.refuse(UnknownTarget("unknown database"),
                        f'portcullis: database "{self.database}" does not exist')
            return
        self.target = target
        self._to("verified")
        assert self.startup is not None
        params: list[tuple[str, str]] = []
        for key in PASSTHROUGH_PARAMS:
            val = self.startup.get(key)
            if val is not None:
                params.append((key, val))
        params += list(PINNED.items())
        self.act(ConnectUpstream(target, tuple(params)))

    def token_rejected(self, err: Exception) -> None:
        if self.closed:
            return
        reason = err.reason if isinstance(err, AuthError) else "token verification failed"
        self._audit_refusal(AuthError(reason), "unauthenticated")
        self.refuse(AuthError(reason), f"portcullis: authentication failed: {reason}")

    def upstream_connected(self, params: list[tuple[str, str]], status: bytes,
                           client_key: tuple[int, int]) -> None:
        if self.closed:
            return
        for name, value in params:
            if not pinned_ok(name, value):
                self.refuse(ProtocolError("unsafe upstream setting"),
                            f"portcullis: upstream session has {name}={value}; the gateway "
                            "requires " + f"{name}={PINNED[name]}")
                return
        from proxy_db.relay import Relay

        self._to("connected")
        out = [AuthenticationOk().encode()]
        out += [ParameterStatus(k, v).encode() for k, v in params]
        out.append(BackendKeyData(*client_key).encode())
        out.append(ReadyForQuery(status).encode())
        self.send_client(b"".join(out))
        self.relay = Relay(self, status)
        if self.env.recorder is not None:
            from proxy_db.recording import SessionRecording

            self.recording = SessionRecording.for_session(self)
        log.info("session open client=%s sub=%s target=%s db=%s", self.client,
                 self.identity.sub if self.identity else "-", self.target.name, self.database)
        held, self._held = b"".join(self._held), []
        if held:
            self.client_data(held)

    def upstream_failed(self, reason: str) -> None:
        if self.closed:
            return
        from addons.model import UpstreamFailure

        log.warning("upstream login failed for target %s: %s",
                    getattr(self.target, "name", "-"), reason)
        self.refuse(UpstreamFailure("upstream unavailable"),
                    "portcullis: upstream database unavailable")

    # -- audit of refusals before any statement -------------------------------------------------
    def _audit_refusal(self, err: PortcullisError, rule: str) -> None:
        try:
            self.env.audit.decision(
                protocol="postgres", target=getattr(self.target, "name", None),
                client=self.client, identity=self.identity,
                operation={"protocol": "postgres", "summary": f"connect database={self.database}"},
                decision=None, effect="deny", rules=[rule], reason=err.reason)
        except Exception:  # noqa: BLE001 - the session is refused either way
            log.error("audit write failed for a refused connection from %s", self.client)
        self.env.decisions.info("DENY connect db=%s sub=%s rules=%s", self.database,
                                self.identity.sub if self.identity else "-", rule)


def is_utf8(encoding: str) -> bool:
    """PostgreSQL ignores case and punctuation in encoding names ('utf-8' from asyncpg)."""
    return "".join(ch for ch in encoding.lower() if ch.isalnum()) in UTF8_NAMES


def pinned_ok(name: str, value: str) -> bool:
    if name == "client_encoding":
        return is_utf8(value)
    if name == "standard_conforming_strings":
        return value.lower() == "on"
    return True


class _FeatureNotSupported(PortcullisError):
    status = 400
    sqlstate = "0A000"
    error = "not_supported"


class _InvalidParameter(PortcullisError):
    status = 400
    sqlstate = "22023"
    error = "invalid_parameter"


class _TlsRequired(PortcullisError):
    """Like pg_hba's "no encryption" refusal: an authorisation-specification error."""

    status = 403
    sqlstate = "28000"
    error = "tls_required"
