"""Transcripts of the startup, TLS and authentication phases (sans-IO, bytes in/out)."""

from __future__ import annotations

import json
from pathlib import Path

from addons.model import AuthError
from proxy_db import backend as be
from proxy_db import messages as fe
from proxy_db.session import (
    CloseSession,
    ConnectUpstream,
    ForwardCancel,
    Session,
    StartTLS,
    State,
    VerifyToken,
)
from tests.proxy_db.transcript import (
    IDENTITY,
    UPSTREAM_PARAMS,
    decode_all,
    make_env,
    password,
    ready_session,
    startup,
)


def fatal_of(data: bytes) -> be.ErrorResponse:
    msgs = decode_all(data)
    err = msgs[-1]
    assert isinstance(err, be.ErrorResponse) and err.fatal, msgs
    return err


def test_ssl_request_upgrades_then_startup_asks_for_cleartext_password(tmp_path: Path) -> None:
    s = Session(make_env(tmp_path, tls_available=True))
    s.client_data(fe.SSLRequest().encode())
    c, u, a = s.take()
    assert c == b"S" and u == b"" and a == [StartTLS()]
    assert s.state is State.TLS
    s.tls_established()
    assert s.state is State.STARTUP and s.encrypted
    s.client_data(fe.SSLRequest().encode())  # a second request inside TLS: no
    assert s.take()[0] == b"N"
    s.client_data(startup())
    c, _, _ = s.take()
    assert decode_all(c) == [be.AuthenticationCleartextPassword()]
    assert s.state is State.AUTH


def test_ssl_request_without_tls_gets_n_and_plaintext_works(tmp_path: Path) -> None:
    s = Session(make_env(tmp_path, tls_available=False))
    s.client_data(fe.SSLRequest().encode() + startup())
    c, _, a = s.take()
    assert c[:1] == b"N" and a == []
    assert decode_all(c[1:]) == [be.AuthenticationCleartextPassword()]


def test_gssenc_request_gets_n(tmp_path: Path) -> None:
    s = Session(make_env(tmp_path, tls_available=True))
    s.client_data(fe.GSSENCRequest().encode())
    assert s.take()[0] == b"N"
    s.client_data(fe.SSLRequest().encode())
    assert s.take()[0] == b"S"


def test_bytes_after_ssl_request_are_refused(tmp_path: Path) -> None:
    """CVE-2021-23214 shape: plaintext injected after SSLRequest must not be processed."""
    s = Session(make_env(tmp_path, tls_available=True))
    s.client_data(fe.SSLRequest().encode() + startup())
    c, _, a = s.take()
    err = fatal_of(c)
    assert err.sqlstate == "08P01"
    assert s.closed and not any(isinstance(x, StartTLS) for x in a)


def test_cancel_request_is_forwarded_and_closes(tmp_path: Path) -> None:
    s = Session(make_env(tmp_path))
    s.client_data(fe.CancelRequest(1234, 5678).encode())
    c, u, a = s.take()
    assert c == b"" and u == b""
    assert a[0] == ForwardCancel(1234, 5678) and isinstance(a[1], CloseSession)
    assert s.closed


def test_require_tls_refuses_plaintext_startup(tmp_path: Path) -> None:
    s = Session(make_env(tmp_path, tls_available=True, require_tls=True))
    s.client_data(startup())
    err = fatal_of(s.take()[0])
    assert err.sqlstate == "28000" and "requires TLS" in (err.get("M") or "")
    assert s.closed


def test_require_tls_accepts_after_tls(tmp_path: Path) -> None:
    s = Session(make_env(tmp_path, tls_available=True, require_tls=True))
    s.client_data(fe.SSLRequest().encode())
    s.take()
    s.tls_established()
    s.client_data(startup())
    assert decode_all(s.take()[0]) == [be.AuthenticationCleartextPassword()]


def test_startup_options_and_replication_are_refused(tmp_path: Path) -> None:
    for params, word in (({"options": "-c role=postgres"}, "options"),
                         ({"replication": "database"}, "replication")):
        s = Session(make_env(tmp_path))
        s.client_data(startup(**params))
        err = fatal_of(s.take()[0])
        assert err.sqlstate == "0A000" and word in (err.get("M") or "")
        assert s.closed


def test_non_utf8_client_encoding_is_refused_but_asyncpg_spelling_is_fine(tmp_path: Path
                                                                         ) -> None:
    s = Session(make_env(tmp_path))
    s.client_data(startup(client_encoding="SJIS"))
    assert fatal_of(s.take()[0]).sqlstate == "22023"
    s = Session(make_env(tmp_path))
    s.client_data(startup(client_encoding="'utf-8'"))
    assert decode_all(s.take()[0]) == [be.AuthenticationCleartextPassword()]


def test_password_goes_to_verifier_and_rejection_is_fatal_28p01(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    s = Session(env, client="127.0.0.1:1")
    s.client_data(startup())
    s.take()
    s.client_data(password("not-a-jwt"))
    c, u, a = s.take()
    assert c == b"" and u == b"" and a == [VerifyToken("not-a-jwt")]
    s.token_rejected(AuthError("token expired"))
    err = fatal_of(s.take()[0])
    assert err.sqlstate == "28P01" and "token expired" in (err.get("M") or "")
    rec = json.loads(Path(env.audit.path).read_text().splitlines()[-1])
    assert rec["decision"] == "deny" and rec["rules"] == ["unauthenticated"]
    assert "not-a-jwt" not in Path(env.audit.path).read_text()


def test_unknown_database_is_fatal_3d000_after_authentication(tmp_path: Path) -> None:
    s = Session(make_env(tmp_path))
    s.client_data(startup(database="secrets"))
    s.take()
    s.client_data(password("tok"))
    s.take()
    s.token_verified(IDENTITY)
    err = fatal_of(s.take()[0])
    assert err.sqlstate == "3D000" and '"secrets"' in (err.get("M") or "")


def test_upstream_startup_is_built_by_the_gateway(tmp_path: Path) -> None:
    s = Session(make_env(tmp_path))
    s.client_data(startup(application_name="psql", search_path="evil", role="postgres"))
    s.take()
    s.client_data(password("tok"))
    s.take()
    s.token_verified(IDENTITY)
    _, _, a = s.take()
    assert isinstance(a[0], ConnectUpstream)
    params = dict(a[0].params)
    assert params == {"application_name": "psql", "client_encoding": "UTF8",
                      "standard_conforming_strings": "on"}


def test_connected_sends_ok_parameters_key_and_ready(tmp_path: Path) -> None:
    s, _ = ready_session(tmp_path)
    assert s.state is State.READY


def test_connected_hands_out_the_gateway_key(tmp_path: Path) -> None:
    s = Session(make_env(tmp_path))
    s.client_data(startup())
    s.take()
    s.client_data(password("tok"))
    s.take()
    s.token_verified(IDENTITY)
    s.take()
    s.upstream_connected(UPSTREAM_PARAMS, b"I", (777, 888))
    msgs = decode_all(s.take()[0])
    assert be.BackendKeyData(777, 888) in msgs
    assert msgs[-1] == be.ReadyForQuery(b"I")


def test_upstream_with_unsafe_settings_is_refused(tmp_path: Path) -> None:
    for params in ([("client_encoding", "LATIN1")], [("standard_conforming_strings", "off")]):
        s = Session(make_env(tmp_path))
        s.client_data(startup())
        s.take()
        s.client_data(password("tok"))
        s.take()
        s.token_verified(IDENTITY)
        s.take()
        s.upstream_connected(params, b"I", (1, 2))
        assert fatal_of(s.take()[0]).sqlstate == "08P01"
        assert s.closed


def test_upstream_failure_is_fatal_08006(tmp_path: Path) -> None:
    s = Session(make_env(tmp_path))
    s.client_data(startup())
    s.take()
    s.client_data(password("tok"))
    s.take()
    s.token_verified(IDENTITY)
    s.take()
    s.upstream_failed("connection refused")
    err = fatal_of(s.take()[0])
    assert err.sqlstate == "08006" and "connection refused" not in (err.get("M") or "")


def test_garbage_startup_is_a_protocol_error(tmp_path: Path) -> None:
    for junk in (b"\x00\x00\x00\x08\x00\x02\x00\x00",  # protocol 2.0
                 b"\x00\x00\x00\x04", b"\xff\xff\xff\xff",  # bad lengths
                 b"GET / HTTP/1.1\r\n\r\n"):
        s = Session(make_env(tmp_path))
        s.client_data(junk)
        err = fatal_of(s.take()[0])
        assert err.sqlstate == "08P01"
        assert s.closed


def test_oversized_startup_packet_is_refused_before_buffering(tmp_path: Path) -> None:
    s = Session(make_env(tmp_path))
    s.client_data((20000).to_bytes(4, "big") + b"\x00\x03\x00\x00")
    assert fatal_of(s.take()[0]).sqlstate == "08P01"


def test_only_a_password_message_is_accepted_during_auth(tmp_path: Path) -> None:
    s = Session(make_env(tmp_path))
    s.client_data(startup())
    s.take()
    s.client_data(fe.Query("select 1").encode())
    assert fatal_of(s.take()[0]).sqlstate == "08P01"


def test_client_bytes_before_ready_are_held_and_replayed(tmp_path: Path) -> None:
    s = Session(make_env(tmp_path))
    s.client_data(startup())
    s.take()
    s.client_data(password("tok"))
    s.take()
    s.client_data(fe.Query("select 1").encode())  # pipelined by an eager client
    s.token_verified(IDENTITY)
    s.take()
    s.upstream_connected(UPSTREAM_PARAMS, b"I", (1, 2))
    _, u, _ = s.take()
    assert u == fe.Query("select 1").encode()

