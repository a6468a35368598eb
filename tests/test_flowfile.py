"""`addons.flowfile`: tnetstrings byte-identical to mitmproxy's encoder, and TCP flow records
byte-identical to what mitmproxy's FlowWriter writes (read back with FlowReader)."""

from __future__ import annotations

import enum
import io
import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import connection, tcp
from mitmproxy.io import FlowReader, FlowWriter, tnetstring

from addons import flowfile

scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
           | st.binary(max_size=40) | st.text(max_size=40))
values = st.recursive(
    scalars,
    lambda inner: (st.lists(inner, max_size=5) | st.lists(inner, max_size=5).map(tuple)
                   | st.dictionaries(st.text(max_size=10), inner, max_size=5)),
    max_leaves=30)


@settings(max_examples=400, deadline=None)
@given(values)
def test_dumps_is_byte_identical_to_mitmproxy(value: Any) -> None:
    assert flowfile.dumps(value) == tnetstring.dumps(value)


class Level(enum.IntEnum):
    HIGH = 3


class Name(str):
    pass


def test_dumps_of_special_values_and_subclasses() -> None:
    for value in (0, -1, 10**30, 1.0, -0.0, math.inf, 1e-300, 0.1 + 0.2, "", b"", "é☃",
                  Level.HIGH, True, False, None, Name("x"), [(), {}], {"a": {"b": [1, (2,)]}},
                  {1: "int key", "k": None}):
        assert flowfile.dumps(value) == tnetstring.dumps(value), value
    for bad in (object(), {1, 2}):
        try:
            flowfile.dumps(bad)
        except ValueError:
            pass
        else:
            raise AssertionError(f"{bad!r} was encoded")


stamps = (st.floats(min_value=1.0, max_value=2.0**33, exclude_max=True)
          | st.floats(min_value=1.7e9, max_value=2.2e9) | st.floats() | st.integers(0, 2**40))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=60) | st.binary(min_size=3990,
                                                                               max_size=4100),
                          stamps), max_size=8))
def test_dumps_messages_matches_the_generic_encoding(msgs: list[tuple[bool, bytes, Any]]) -> None:
    expected = tnetstring.dumps([(fc, c, flowfile.rounded(ts)) for fc, c, ts in msgs])
    assert flowfile.dumps_messages(msgs) == expected


@settings(max_examples=2000, deadline=None)
@given(stamps)
def test_timestamps_are_recorded_to_the_microsecond_as_repr_writes_them(ts: Any) -> None:
    text = flowfile.stamp(ts)
    got = flowfile.rounded(ts)
    assert text == repr(got).encode()  # what mitmproxy writes for the recorded float
    if 1.0 <= ts < 2.0**33:
        # to the microsecond (give or take the rounding of ts * 1e6 and of the result)
        assert abs(got - ts) <= 0.5e-6 + math.ulp(ts * 1e6) / 1e6 + math.ulp(ts)
    elif isinstance(ts, float) and not math.isnan(ts):
        assert got == ts  # out of range: unrounded
    else:
        assert math.isnan(got) or got == ts


def test_stamp_examples() -> None:
    assert flowfile.stamp(1.0) == b"1.0" and flowfile.stamp(1000.5) == b"1000.5"
    assert flowfile.stamp(1764130000.1234567) == b"1764130000.123457"
    assert flowfile.stamp(1764130000.0000002) == b"1764130000.0"
    assert flowfile.stamp(1764130000.12) == b"1764130000.12"
    assert flowfile.stamp(0.5) == b"0.5" and flowfile.stamp(1e300) == b"1e+300"
    assert flowfile.stamp(float("inf")) == b"inf"


def mitmproxy_flow(client: tuple[str, int], server: tuple[str, int], sockname: tuple[str, int],
                   start: float, end: float, msgs: list[tuple[bool, bytes, float]],
                   meta: dict[str, Any], comment: str) -> tcp.TCPFlow:
    """The flow as `Recorder.record_tcp` used to build it with mitmproxy's classes (with the
    timestamps as recorded: to the microsecond)."""
    start, end = flowfile.rounded(start), flowfile.rounded(end)
    msgs = [(fc, content, flowfile.rounded(ts)) for fc, content, ts in msgs]
    c = connection.Client(peername=client, sockname=sockname, timestamp_start=start)
    c.timestamp_end = end
    s = connection.Server(address=server)
    s.timestamp_start = s.timestamp_tcp_setup = start
    s.timestamp_end = end
    flow = tcp.TCPFlow(c, s)
    flow.timestamp_created = start
    flow.messages = [tcp.TCPMessage(fc, content, ts) for fc, content, ts in msgs]
    flow.metadata = dict(meta)
    flow.comment = comment
    return flow


def test_tcp_flow_record_is_what_flowwriter_writes_and_reads_back() -> None:
    msgs = [(True, b"SELECT name FROM customers WHERE id = $1", 1764130000.1234567),
            (False, "name\n----\n[MASKED:email]\nSELECT 1 é".encode(), 1764130000.5),
            (False, b"", 1764130001.0), (True, b"x" * 5000, 1764130002.25)]
    meta = {"portcullis": {"protocol": "postgres", "target": "orders-db", "segment": 2,
                           "final": True, "close_reason": ""}}
    args = (("127.0.0.1", 5555), ("db.internal", 5432), ("127.0.0.1", 6432), 1764129999.9999999,
            1764130003.0, msgs, meta, "postgres orders-db segment 2")
    expected = mitmproxy_flow(*args)
    ids = (expected.id, expected.client_conn.id, expected.server_conn.id)
    record = flowfile.tcp_flow(*args, ids=ids)
    out = io.BytesIO()
    FlowWriter(out).add(expected)
    assert record == out.getvalue()
    (got,) = list(FlowReader(io.BytesIO(record + b"")).stream())
    assert got.get_state() == expected.get_state()
    assert isinstance(got, tcp.TCPFlow) and got.messages[1].content == msgs[1][1]


def test_tcp_flow_records_get_fresh_ids_and_do_not_share_state() -> None:
    one = flowfile.tcp_flow(("127.0.0.1", 1), ("127.0.0.1", 2), ("", 0), 1.0, 2.0,
                            [(True, b"a", 1.5)], {"n": 1}, "one")
    two = flowfile.tcp_flow(("127.0.0.1", 3), ("127.0.0.1", 4), ("", 0), 3.0, 4.0, [],
                            {"n": 2}, "two")
    a, b = FlowReader(io.BytesIO(one + two)).stream()
    assert len({a.id, b.id, a.client_conn.id, b.client_conn.id, a.server_conn.id,
                b.server_conn.id}) == 6
    assert a.metadata == {"n": 1} and b.metadata == {"n": 2} and b.messages == []
    assert a.client_conn.peername == ("127.0.0.1", 1) and b.server_conn.address == ("127.0.0.1", 4)
    assert flowfile._template()["metadata"] == {} and flowfile._template()["messages"] == []


def test_new_ids_are_random_version_4_uuids() -> None:
    import uuid

    ids = [i for _ in range(50) for i in flowfile.new_ids()]
    assert len(set(ids)) == 150
    for text in ids:
        u = uuid.UUID(text)
        assert u.version == 4 and u.variant == uuid.RFC_4122 and str(u) == text
