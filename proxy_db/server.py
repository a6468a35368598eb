"""The Postgres gateway's asyncio side: it only moves bytes and runs slow work for sessions.

`serve(runtime)` starts the listener on the gateway's event loop (mitmproxy's, when started by
`addons.gateway`) and returns the `asyncio.Server`. Each client connection drives one
`session.Session`; this file performs the actions a session asks for (TLS upgrade, token
verification off the loop when a JWKS fetch is needed, upstream login, cancel forwarding,
catalog look-ups on a separate gateway-owned connection per upstream) and writes the bytes it
produces. A failure in any of them refuses the session; other sessions are unaffected.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
from typing import Any

from addons.decisionlog import DecisionLines
from addons.identity import NeedsKeys
from addons.model import AuthError
from proxy_db import catalog as cat
from proxy_db import recording
from proxy_db.messages import CancelRequest, SSLRequest, Terminate
from proxy_db.session import (
    AwaitApproval,
    CloseSession,
    ConnectUpstream,
    Env,
    ForwardCancel,
    LookupFunction,
    LookupRelations,
    Session,
    StartTLS,
    VerifyToken,
)
from proxy_db.upstream_auth import (
    UpstreamLogin,
    UpstreamLoginError,
    client_ssl_context,
    ssl_plan,
)

log = logging.getLogger("portcullis.postgres")
READ_SIZE = 256 * 1024
CONNECT_TIMEOUT = 15.0
CATALOG_TIMEOUT = 15.0
AUTH_TIMEOUT = 60.0


async def open_upstream(target: Any, params: tuple[tuple[str, str], ...] = ()
                        ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, UpstreamLogin]:
    """Connect and log in to a target's PostgreSQL (sslmode as libpq). Raises
    UpstreamLoginError / OSError / asyncio.TimeoutError."""
    up = target.upstream
    reader, writer = await asyncio.wait_for(asyncio.open_connection(up.host, up.port),
                                            CONNECT_TIMEOUT)
    try:
        plan = ssl_plan(up.sslmode)
        peer_cert = None
        if plan.request:
            writer.write(SSLRequest().encode())
            answer = await asyncio.wait_for(reader.readexactly(1), CONNECT_TIMEOUT)
            if answer == b"S":
                ca = getattr(getattr(target, "tls", None), "ca_file", None)
                ctx = client_ssl_context(plan, str(ca) if ca else None)
                await writer.start_tls(ctx, server_hostname=up.host)
                sslobj = writer.get_extra_info("ssl_object")
                peer_cert = sslobj.getpeercert(binary_form=True) if sslobj else None
            elif answer != b"N" or plan.required:
                raise UpstreamLoginError("upstream does not offer TLS (sslmode="
                                         f"{up.sslmode})")
        password = up.password.reveal() if up.password is not None else None
        login = UpstreamLogin(up.user, up.dbname, password, params, host=up.host,
                              tls_peer_cert=peer_cert)
        writer.write(login.startup())
        while not login.done:
            data = await asyncio.wait_for(reader.read(READ_SIZE), CONNECT_TIMEOUT)
            if not data:
                raise UpstreamLoginError("upstream closed the connection during login")
            out = login.receive(data)
            if out:
                writer.write(out)
        return reader, writer, login
    except BaseException:
        writer.close()
        raise


class CatalogConnection:
    """One gateway-owned connection per upstream for catalog queries, used one at a time."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.lock = asyncio.Lock()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def run(self, query: cat.CatalogQuery) -> list[tuple[str | None, ...]]:
        async with self.lock:
            for attempt in (1, 2):
                try:
                    if self.writer is None or self.writer.is_closing():
                        self.reader, self.writer, _ = await open_upstream(
                            self.target, (("application_name", "portcullis-catalog"),
                                          ("client_encoding", "UTF8")))
                    assert self.reader is not None
                    self.writer.write(query.request())
                    while not query.done:
                        data = await asyncio.wait_for(self.reader.read(READ_SIZE),
                                                      CATALOG_TIMEOUT)
                        if not data:
                            raise cat.CatalogError("catalog connection closed")
                        query.feed(data)
                    if query.error:
                        raise cat.CatalogError(query.error)
                    return query.rows
                except (TimeoutError, OSError, UpstreamLoginError, asyncio.IncompleteReadError, cat.CatalogError) as e:
                    self.close()
                    if attempt == 2 or isinstance(e, cat.CatalogError) and query.error:
                        raise cat.CatalogError(str(e)) from e
                    query = cat.CatalogQuery(query.sql, query.params)
        raise cat.CatalogError("unreachable")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class Gateway:
    """Listener state shared by sessions: cancel keys, catalog caches and connections."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime
        self.cancel_keys: dict[tuple[int, int], tuple[Any, int, int]] = {}
        self.catalogs: dict[str, cat.CatalogCache] = {}
        self.catalog_conns: dict[str, CatalogConnection] = {}
        self.tls: ssl.SSLContext | None = None
        self.connections: set[Connection] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        # Session recordings (SPEC §7), rendered and written off the loop; None: not recorded
        self.recordings = recording.writer_for(runtime)
        self.decisions = DecisionLines()

    def env(self) -> Env:
        cfg = self.runtime.config
        return Env(policies=self.runtime.policies, audit=self.runtime.audit,
                   targets=self.runtime.targets, mask_key=self.runtime.mask_key,
                   tls_available=self.tls is not None,
                   require_tls=getattr(cfg, "postgres_tls", "prefer") == "require",
                   catalogs=self.catalogs, defer_outcomes=True,
                   approvals=getattr(self.runtime, "approvals", None),
                   recorder=self.recordings, decisions=self.decisions)

    def new_cancel_key(self, target: Any, upstream_key: tuple[int, int]) -> tuple[int, int]:
        while True:
            key = (secrets.randbelow(2**31 - 1) + 1, secrets.randbits(31))
            if key not in self.cancel_keys:
                self.cancel_keys[key] = (target, *upstream_key)
                return key

    async def forward_cancel(self, pid: int, secret: int) -> None:
        entry = self.cancel_keys.get((pid, secret))
        if entry is None:
            log.info("cancel request with an unknown key ignored")
            return
        target, up_pid, up_secret = entry
        for conn in list(self.connections):
            relay = conn.session.relay if conn.session is not None else None
            if conn.cancel_key == (pid, secret) and relay is not None and relay.held:
                # The statement is held for approval, so nothing runs upstream: the cancel
                # ends the hold (57014, as PostgreSQL answers a cancelled statement).
                conn._call(relay.approval_cancelled)
                conn.client_pauses.discard("approval")
                conn.pump()
                return
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(target.upstream.host, target.upstream.port),
                CONNECT_TIMEOUT)
            writer.write(CancelRequest(up_pid, up_secret).encode())
            await writer.drain()
            writer.close()
        except (TimeoutError, OSError) as e:
            log.warning("cancel forwarding to %s failed: %s", target.name, e)

    def audit_written(self) -> None:
        """Write the outcome lines chained since the last write (one `write()` for all)."""
        if self.runtime.audit.pending:
            self._flush_audit()

    def _flush_audit(self) -> None:
        try:
            self.runtime.audit.flush()
        except Exception:  # noqa: BLE001 - kept pending; the next decision write retries first
            log.error("audit: %d outcome line(s) could not be written yet",
                      self.runtime.audit.pending)

    def catalog_conn(self, target: Any) -> CatalogConnection:
        conn = self.catalog_conns.get(target.name)
        if conn is None:
            conn = self.catalog_conns[target.name] = CatalogConnection(target)
        return conn

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def close(self) -> None:
        for c in list(self.connections):
            c.close_all()
        for catalog in self.catalog_conns.values():
            catalog.close()
        self._flush_audit()
        if self.recordings is not None:
            self.recordings.close()  # waits until every session's last segment is written


class _Pauses:
    """Reading from a transport is paused while any reason holds (flow control, a lookup)."""

    def __init__(self) -> None:
        self.transport: asyncio.BaseTransport | None = None
        self.reasons: set[str] = set()

    def add(self, reason: str) -> None:
        if not self.reasons and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()  # type: ignore[attr-defined]
        self.reasons.add(reason)

    def discard(self, reason: str) -> None:
        if reason not in self.reasons:
            return
        self.reasons.discard(reason)
        if not self.reasons and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()  # type: ignore[attr-defined]


class Connection(asyncio.Protocol):
    """One client connection: feeds its Session and performs the session's actions."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.transport: asyncio.Transport | None = None
        self.up: asyncio.Transport | None = None
        self.up_writer: asyncio.StreamWriter | None = None
        self.session: Session | None = None
        self.cancel_key: tuple[int, int] | None = None
        self.client_pauses = _Pauses()
        self.up_pauses = _Pauses()
        self.tls_early: list[bytes] | None = None
        self.auth_timer: asyncio.TimerHandle | None = None

    # -- client transport callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; both have the same API.
        self.transport = transport  # type: ignore[assignment]
        self.client_pauses.transport = transport
        peer = transport.get_extra_info("peername") or ("-", 0)
        self.session = Session(self.gw.env(), client=f"{peer[0]}:{peer[1]}")
        self.gw.connections.add(self)
        # Like PostgreSQL's authentication_timeout: a client that never finishes logging in
        # does not keep its socket.
        self.auth_timer = asyncio.get_running_loop().call_later(AUTH_TIMEOUT, self._auth_timeout)

    def _auth_timeout(self) -> None:
        s = self.session
        if s is not None and not s.closed and s.relay is None:
            from addons.model import AuthError

            s.refuse(AuthError("timeout"), "portcullis: authentication timed out")
            self.pump()

    def data_received(self, data: bytes) -> None:
        assert self.session is not None
        if self.tls_early is not None:
            # Decrypted bytes can arrive before start_tls() returns to us: hold them.
            self.tls_early.append(data)
            return
        self._call(self.session.client_data, data)
        self.pump()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.session is not None and not self.session.closed:
            self.session.close("client closed the connection")
        self.close_all()

    def pause_writing(self) -> None:
        self.up_pauses.add("client-flow")

    def resume_writing(self) -> None:
        self.up_pauses.discard("client-flow")

    # -- plumbing
    def _call(self, fn: Any, *args: Any) -> None:
        """Run a session method; a bug in it refuses this session only (fail closed)."""
        try:
            fn(*args)
        except Exception:  # noqa: BLE001
            assert self.session is not None
            log.exception("internal error in postgres session %s", self.session.client)
            from addons.model import PortcullisError

            self.session.refuse(PortcullisError("internal error"), "portcullis: internal error")

    def pump(self) -> None:
        """Write what the session produced and start the actions it asked for.

        Order: the upstream bytes first (their decision lines are already on disk); then the
        outcome lines of the answers about to leave, in one audit write, so a client never
        sees an answer whose outcome is not on disk yet; then the client bytes."""
        assert self.session is not None
        to_client, to_upstream, actions = self.session.take()
        if to_upstream and self.up is not None and not self.up.is_closing():
            self.up.write(to_upstream)
        self.session.run_deferred()
        self.gw.audit_written()
        if to_client and self.transport is not None and not self.transport.is_closing():
            self.transport.write(to_client)
        for action in actions:
            self.perform(action)

    def perform(self, action: Any) -> None:
        s = self.session
        assert s is not None
        if isinstance(action, StartTLS):
            self.client_pauses.add("tls")  # nothing is read until the handshake owns the socket
            self.tls_early = []
            self.gw.spawn(self._start_tls())
        elif isinstance(action, VerifyToken):
            verifier = self.gw.runtime.verifier
            try:
                identity = verifier.verify(action.token, allow_fetch=False)
            except NeedsKeys:
                self.gw.spawn(self._verify_in_thread(action.token))
                return
            except AuthError as e:
                self._call(s.token_rejected, e)
            except Exception as e:  # noqa: BLE001 - any failure to verify is a refusal
                log.warning("token verification error: %s", type(e).__name__)
                self._call(s.token_rejected, e)
            else:
                self._call(s.token_verified, identity)
            self.pump()
        elif isinstance(action, ConnectUpstream):
            self.gw.spawn(self._connect(action))
        elif isinstance(action, ForwardCancel):
            self.gw.spawn(self.gw.forward_cancel(action.pid, action.secret))
        elif isinstance(action, LookupRelations):
            self.up_pauses.add("catalog")
            self.gw.spawn(self._lookup_relations(action))
        elif isinstance(action, LookupFunction):
            self.client_pauses.add("function")
            self.gw.spawn(self._lookup_function(action))
        elif isinstance(action, AwaitApproval):
            self.client_pauses.add("approval")
            self.gw.spawn(self._await_approval(action.approval_id))
        elif isinstance(action, CloseSession):
            log.info("session %s closed: %s", s.client, action.reason)
            self.close_all()

    def close_all(self) -> None:
        if self.auth_timer is not None:
            self.auth_timer.cancel()
        if self.session is not None:
            self.session.run_deferred()
            self.gw.audit_written()
            self.session.end_recording(self.session.close_reason or "connection closed")
        if self.cancel_key is not None:
            self.gw.cancel_keys.pop(self.cancel_key, None)
            self.cancel_key = None
        if self.up is not None and not self.up.is_closing():
            try:
                self.up.write(Terminate().encode())
            except (OSError, RuntimeError):
                pass
            self.up.close()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self.gw.connections.discard(self)

    # -- slow work
    async def _start_tls(self) -> None:
        assert self.gw.tls is not None and self.transport is not None and self.session
        loop = asyncio.get_running_loop()
        try:
            new = await loop.start_tls(self.transport, self, self.gw.tls, server_side=True)
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as e:
            log.info("TLS handshake with %s failed: %s", self.session.client, e)
            self.session.close("TLS handshake failed")
            self.close_all()
            return
        if new is None:
            self.close_all()
            return
        self.transport = new
        self.client_pauses.transport = new
        self.client_pauses.reasons.discard("tls")  # start_tls resumed reading itself
        early, self.tls_early = self.tls_early or [], None
        self._call(self.session.tls_established)
        if early:
            self._call(self.session.client_data, b"".join(early))
        self.pump()

    async def _verify_in_thread(self, token: str) -> None:
        assert self.session is not None
        try:
            identity = await asyncio.to_thread(self.gw.runtime.verifier.verify, token)
        except AuthError as e:
            self._call(self.session.token_rejected, e)
        except Exception as e:  # noqa: BLE001
            log.warning("token verification error: %s", type(e).__name__)
            self._call(self.session.token_rejected, e)
        else:
            self._call(self.session.token_verified, identity)
        self.pump()

    async def _connect(self, action: ConnectUpstream) -> None:
        s = self.session
        assert s is not None
        try:
            reader, writer, login = await open_upstream(action.target, action.params)
        except (TimeoutError, OSError, UpstreamLoginError, asyncio.IncompleteReadError, ssl.SSLError) as e:
            reason = e.reason if isinstance(e, UpstreamLoginError) else type(e).__name__
            self._call(s.upstream_failed, reason)
            self.pump()
            return
        if s.closed:
            writer.close()
            return
        # From here on the upstream socket is driven by callbacks, like the client's. The
        # StreamWriter is kept: its finaliser would close the transport.
        self.up_writer = writer
        transport = writer.transport
        self.up = transport  # type: ignore[assignment]
        self.up_pauses.transport = transport
        transport.set_protocol(_Upstream(self))
        key = login.key or (0, 0)
        self.cancel_key = self.gw.new_cancel_key(action.target, key)
        self._call(s.upstream_connected, login.params, login.status, self.cancel_key)
        leftover = b"".join(raw for _, raw in login.leftover) + bytes(
            getattr(reader, "_buffer", b""))  # bytes read past ReadyForQuery (normally none)
        if leftover and not s.closed:
            self._call(s.upstream_data, leftover)
        self.pump()

    async def _lookup_relations(self, action: LookupRelations) -> None:
        s = self.session
        assert s is not None
        try:
            rows = await self.gw.catalog_conn(s.target).run(
                cat.relations_query(set(action.oids), set(action.names)))
            rels = cat.parse_relations(rows)
        except Exception as e:  # noqa: BLE001 - cannot mask: refuse
            self._call(s.relay.lookup_failed, str(e))
        else:
            self._call(s.relay.relations_found, rels, action.names)
        self.up_pauses.discard("catalog")
        self.pump()

    async def _await_approval(self, approval_id: str) -> None:
        """Poll the approval store until the approval is decided or `approvals.timeout_seconds`
        pass (then it expires); a session that ends meanwhile expires it."""
        from addons.approvals import POLL_SECONDS, notify_webhook

        s = self.session
        assert s is not None
        store = self.gw.runtime.approvals
        cfg = self.gw.runtime.config.approvals
        state = "pending"
        try:
            if cfg.webhook_url:
                notify_webhook(cfg.webhook_url, store.get(approval_id))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + cfg.timeout_seconds
            while state == "pending" and loop.time() < deadline and self._holding(approval_id):
                await asyncio.sleep(POLL_SECONDS)
                state = store.state_of(approval_id)
            if state == "pending":
                state = store.expire(approval_id)
        except Exception:  # noqa: BLE001 - an unreadable approval is a refused statement
            log.exception("approval %s could not be followed", approval_id)
            state = "expired"
        if not self._holding(approval_id):  # the session ended or the client cancelled
            return
        self._call(s.relay.approval_done, approval_id, state)
        self.client_pauses.discard("approval")
        self.pump()

    def _holding(self, approval_id: str) -> bool:
        s = self.session
        held = s.relay.held if s is not None and not s.closed and s.relay is not None else None
        return held is not None and held[0] == approval_id

    async def _lookup_function(self, action: LookupFunction) -> None:
        s = self.session
        assert s is not None
        try:
            rows = await self.gw.catalog_conn(s.target).run(cat.function_query(action.oid))
            name = cat.parse_function(rows)
        except Exception as e:  # noqa: BLE001 - unresolved: the gate denies it
            log.warning("function lookup failed: %s", e)
            name = None
        self._call(s.relay.function_found, name)
        self.client_pauses.discard("function")
        self.pump()


class _Upstream(asyncio.Protocol):
    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        assert conn.session is not None
        conn._call(conn.session.upstream_data, data)
        conn.pump()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        conn = self.conn
        if conn.session is not None and not conn.session.closed:
            conn._call(conn.session.upstream_closed)
            conn.pump()
        conn.close_all()

    def pause_writing(self) -> None:
        self.conn.client_pauses.add("upstream-flow")

    def resume_writing(self) -> None:
        self.conn.client_pauses.discard("upstream-flow")


def _warm_up() -> None:
    """Import what the first masked result needs now, not while a client waits."""
    try:
        import sqlglot  # noqa: F401
        import sqlglot.optimizer.qualify  # noqa: F401
    except ImportError:
        pass


class Listener:
    """The listening socket and the gateway behind it (uvloop's Server takes no attributes)."""

    def __init__(self, server: asyncio.Server, gateway: Gateway) -> None:
        self.server = server
        self.portcullis_gateway = gateway

    @property
    def sockets(self) -> Any:
        return self.server.sockets

    def close(self) -> None:
        self.server.close()

    async def wait_closed(self) -> None:
        await self.server.wait_closed()


async def serve(runtime: Any, host: str | None = None, port: int | None = None) -> Listener:
    """Start the Postgres listener (`runtime.config.listen_postgres` unless host/port given)."""
    gw = Gateway(runtime)
    try:
        gw.tls = runtime.server_tls_context()
    except Exception as e:  # noqa: BLE001 - no TLS is only acceptable with postgres_tls prefer
        if getattr(runtime.config, "postgres_tls", "prefer") == "require":
            raise
        log.warning("postgres listener without TLS: %s", e)
    if host is None or port is None:
        host, port = runtime.config.listen_postgres
    _warm_up()
    server = await asyncio.get_running_loop().create_server(lambda: Connection(gw), host, port)
    return Listener(server, gw)
