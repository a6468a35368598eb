"""Codecs: every message round-trips, malformed bodies raise ProtocolError, framing limits hold;
Hypothesis feeds arbitrary bytes to every decoder, the framers and whole sessions."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy_db import backend as be
from proxy_db import messages as fe
from proxy_db.framing import Limits, MessageFramer, StartupFramer
from proxy_db.messages import ProtocolError
from proxy_db.session import Session
from tests.proxy_db.transcript import decode_all, make_env, ready_session, startup

FRONTEND_SAMPLES = [
    fe.PasswordMessage(b"secret\0"), fe.Query("SELECT 'é' -- ünï\n"),
    fe.Parse("s1", "SELECT $1::int", (23,)), fe.Parse("", "SELECT 1"),
    fe.Bind("p", "s1", (0, 1), (b"1", None, b""), (1,)), fe.Bind("", ""),
    fe.Describe(b"S", "s1"), fe.Describe(b"P", ""), fe.Execute("p", 10),
    fe.Close(b"S", "s1"), fe.Sync(), fe.Flush(), fe.Terminate(),
    fe.FunctionCall(1234, (0,), (b"x", None), 1), fe.CopyData(b"1\t2\n"), fe.CopyDone(),
    fe.CopyFail("client gave up"),
]
BACKEND_SAMPLES = [
    be.AuthenticationOk(), be.AuthenticationCleartextPassword(),
    be.AuthenticationMD5Password(b"salt"), be.AuthenticationSASL(("SCRAM-SHA-256",)),
    be.AuthenticationSASLContinue(b"r=abc"), be.AuthenticationSASLFinal(b"v=xyz"),
    be.ParameterStatus("TimeZone", "UTC"), be.BackendKeyData(1, -2),
    be.ReadyForQuery(b"T"), be.NegotiateProtocolVersion(0, ("_pq_.x",)),
    be.RowDescription((be.FieldDescription("a", 16384, 2, 25, -1, -1, 0),
                       be.FieldDescription("b", 0, 0, 23, 4, -1, 1))),
    be.DataRow((b"x", None, b"")), be.CommandComplete("INSERT 0 3"),
    be.ErrorResponse.make("ERROR", "42501", "nope", D="detail"),
    be.NoticeResponse.make("NOTICE", "00000", "hi"), be.EmptyQueryResponse(),
    be.ParseComplete(), be.BindComplete(), be.CloseComplete(), be.NoData(),
    be.PortalSuspended(), be.ParameterDescription((23, 25)), be.CopyInResponse(0, (0, 0)),
    be.CopyOutResponse(1, (1,)), be.CopyBothResponse(0, ()),
    be.NotificationResponse(7, "chan", "payload"), be.FunctionCallResponse(b"42"),
    be.FunctionCallResponse(None),
]


@pytest.mark.parametrize("msg", FRONTEND_SAMPLES, ids=lambda m: type(m).__name__)
def test_frontend_round_trip(msg: fe.Message) -> None:
    raw = msg.encode()
    framer = MessageFramer(1 << 20)
    ((t, frame),) = framer.feed(raw)
    assert frame == raw
    assert fe.FRONTEND[t].decode(raw[5:]) == msg


@pytest.mark.parametrize("msg", BACKEND_SAMPLES, ids=lambda m: type(m).__name__)
def test_backend_round_trip(msg: fe.Message) -> None:
    raw = msg.encode()
    assert be.decode_backend(raw[:1], raw[5:]) == msg


@given(st.binary(max_size=200))
def test_bind_peek_agrees_with_decode(body: bytes) -> None:
    try:
        full = fe.Bind.decode(body)
    except ProtocolError:
        with pytest.raises(ProtocolError):
            fe.Bind.peek(body)
        return
    assert fe.Bind.peek(body) == (full.portal, full.statement, full.result_formats)


_names = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                 max_size=8)


@given(_names, _names, st.lists(st.sampled_from([0, 1]), max_size=3),
       st.lists(st.one_of(st.none(), st.binary(max_size=20)), max_size=4),
       st.lists(st.sampled_from([0, 1]), max_size=3), st.integers(0, 40))
def test_bind_peek_on_valid_binds(portal: str, stmt: str, pf: list[int], params: list[bytes | None],
                                  rf: list[int], cut: int) -> None:
    body = fe.Bind(portal, stmt, tuple(pf), tuple(params), tuple(rf)).body()
    assert fe.Bind.peek(body) == (portal, stmt, tuple(rf))
    if cut and cut < len(body):  # truncated: both refuse
        with pytest.raises(ProtocolError):
            fe.Bind.peek(body[:-cut])


def test_startup_packets_round_trip() -> None:
    for msg in (fe.SSLRequest(), fe.GSSENCRequest(), fe.CancelRequest(5, -6),
                fe.StartupMessage(fe.PROTOCOL_3_0, (("user", "u"), ("database", "d")))):
        f = StartupFramer()
        f.feed(msg.encode())
        assert f.next() == msg


@pytest.mark.parametrize("type_, body", [
    (b"Q", b"SELECT 1"),  # unterminated
    (b"Q", b"SELECT 1\0extra"),  # trailing bytes
    (b"Q", b"\xff\xfe\0"),  # not UTF-8
    (b"P", b"s\0SELECT 1\0\xff\xff"),  # negative count
    (b"B", b"p\0s\0\x00\x01\x00\x07\x00\x00\x00\x00"),  # format code 7
    (b"B", b"p\0s\0\x00\x00\x00\x01\xff\xff\xff\xfe\x00\x00"),  # length -2
    (b"D", b"X\0"),  # describe kind
    (b"E", b"p\0\x00\x00"),  # short max_rows
    (b"S", b"x"),  # Sync with a body
])
def test_malformed_frontend_bodies_raise_protocol_error(type_: bytes, body: bytes) -> None:
    with pytest.raises(ProtocolError):
        fe.FRONTEND[type_].decode(body)


def test_frame_length_limits() -> None:
    framer = MessageFramer(100)
    with pytest.raises(ProtocolError):
        framer.feed(b"Q" + (105).to_bytes(4, "big"))  # over the limit: refused at the header
    with pytest.raises(ProtocolError):
        MessageFramer(100).feed(b"Q\x00\x00\x00\x03")  # length below 4
    f = StartupFramer()
    f.feed((10_001).to_bytes(4, "big") + b"\x00\x03\x00\x00")
    with pytest.raises(ProtocolError):
        f.next()


def test_large_message_in_many_chunks_is_framed_once() -> None:
    payload = b"x" * 1_000_000
    raw = fe.CopyData(payload).encode()
    framer = MessageFramer(2_000_000)
    got = []
    for i in range(0, len(raw), 4096):
        got += framer.feed(raw[i:i + 4096])
    assert got == [(b"d", raw)] and framer.pending == 0


def test_allowed_types_are_enforced() -> None:
    with pytest.raises(ProtocolError):
        MessageFramer(100, frozenset((b"p",))).feed(fe.Query("x").encode())


# ---------------------------------------------------------------------------------------------
# Hypothesis: arbitrary bytes never crash a decoder, a framer or a session


@given(st.sampled_from(sorted(fe.FRONTEND)), st.binary(max_size=300))
def test_frontend_decoders_only_raise_protocol_error(type_: bytes, body: bytes) -> None:
    try:
        fe.FRONTEND[type_].decode(body)
    except ProtocolError:
        pass


@given(st.sampled_from(sorted(be.BACKEND)), st.binary(max_size=300))
def test_backend_decoders_only_raise_protocol_error(type_: bytes, body: bytes) -> None:
    try:
        be.decode_backend(type_, body)
    except ProtocolError:
        pass


@given(st.lists(st.binary(max_size=64), max_size=8))
def test_framers_only_raise_protocol_error(chunks: list[bytes]) -> None:
    f = MessageFramer(Limits().frontend)
    sf = StartupFramer()
    try:
        for c in chunks:
            f.feed(c)
    except ProtocolError:
        pass
    try:
        for c in chunks:
            sf.feed(c)
            while sf.next() is not None:
                pass
    except ProtocolError:
        pass


_TMP = Path(tempfile.mkdtemp(prefix="portcullis-hyp-"))


def _check_session_output(s, c: bytes) -> None:
    if not c:
        return
    msgs = decode_all(c) if c not in (b"S", b"N") else [c]
    fatals = [m for m in msgs if isinstance(m, be.ErrorResponse) and m.fatal]
    if fatals:
        assert s.closed, "a FATAL error must end the session"


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(st.binary(max_size=80), min_size=1, max_size=6))
def test_startup_phase_survives_arbitrary_bytes(chunks: list[bytes]) -> None:
    env = make_env(_TMP)
    s = Session(env)
    out = b""
    for c in chunks:
        s.client_data(c)  # never raises
        out += s.take()[0]
    if out.startswith((b"S", b"N")):
        out = out[1:]
    _check_session_output(s, out)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(st.binary(max_size=80), min_size=1, max_size=6),
       st.sampled_from([b"Q", b"P", b"B", b"E", b"D", b"F", b"X", b"d", b"S", b"H", b"C"]))
def test_ready_phase_survives_arbitrary_client_bytes(chunks: list[bytes], first: bytes) -> None:
    s, _ = ready_session(_TMP)
    for i, c in enumerate(chunks):
        s.client_data((first + c) if i == 0 else c)
        c_out, _, _ = s.take()
        _check_session_output(s, c_out)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(st.binary(max_size=80), min_size=1, max_size=6))
def test_ready_phase_survives_arbitrary_upstream_bytes(chunks: list[bytes]) -> None:
    s, _ = ready_session(_TMP)
    s.client_data(fe.Query("SELECT 1").encode())
    s.take()
    for c in chunks:
        s.upstream_data(c)
        c_out, _, _ = s.take()
        _check_session_output(s, c_out)


def test_startup_of_a_fuzzed_session_reaches_auth() -> None:
    """Sanity check that the fuzz harness drives a real session."""
    s = Session(make_env(_TMP))
    s.client_data(startup())
    assert decode_all(s.take()[0]) == [be.AuthenticationCleartextPassword()]
