"""`SegmentWriter.messages` (every cache, shape and single detector pass) records exactly what
cleaning each rendered message on its own records: `reference()` of each of `render(seg)`;
on generated sessions (hypothesis) and on hand-picked corner cases."""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from addons.masking import scrub
from proxy_db import backend as be
from proxy_db import recording
from proxy_db.recording import Segment, as_answer, render
from proxy_db.recording_writer import SegmentWriter

SECRETS = ["s3cr3t-pw", "abc"]  # "abc": too short to be replaced
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.c2lnbmF0dXJlLXh5eg"
PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----"
VALUES = ["ada@example.com", "4111 1111 1111 1111", "4111111111111111", "+1 415 555 2671",
          "DE89 3704 0044 0532 0130 00", "123-45-6789", "10.0.0.1", "2001:db8::1", JWT,
          "AKIAIOSFODNN7EXAMPLE", PEM, "-----BEGIN RSA PRIVATE KEY-----", "s3cr3t-pw",
          "pw=s3cr3t-pw!", "x\ny", "tab\there", "a\x1eb", "é☃", "v" * 300, "", "  padded  ",
          "-4711", "0", "12345678901234", "2024-01-01 12:00:00", "abalance", "SELECT 1"]
NAMES = ["id", "abalance", "email", "a\nb", "-----BEGIN RSA PRIVATE KEY-----", "s3cr3t-pw", "",
         "x" * 70, "ünï", "ada@example.com"]
TAGS = ["SELECT 1", "SELECT 2", "INSERT 0 1", "UPDATE 1", "BEGIN", "COMMIT", "SELECT 12345",
        "ada@example.com 1", "COPY 3"]
STATEMENTS = ["SELECT abalance FROM pgbench_accounts WHERE aid = $1", "SELECT 1", "BEGIN",
              "UPDATE t SET x = $1", "SELECT * FROM \"ada@example.com\"", "s3cr3t-pw", PEM, ""]

texts = st.sampled_from(VALUES) | st.text(max_size=12).filter(lambda s: "\0" not in s)
cells = (texts.map(str.encode) | st.none() | st.binary(max_size=6)
         | st.integers(-99999, 99999).map(lambda n: str(n).encode()))


def frame(t: bytes, body: bytes) -> bytes:
    return t + struct.pack("!I", len(body) + 4) + body


@st.composite
def columns(draw: Any) -> list[tuple[str, int]]:
    return draw(st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from([0, 0, 0, 1])),
                         min_size=0, max_size=3))


def row(draw: Any, width: int) -> bytes:
    if draw(st.integers(0, 30)) == 0:
        return frame(b"D", b"\x00\x05\x00")  # unreadable
    n = width if draw(st.integers(0, 8)) else draw(st.integers(0, 3))
    return be.DataRow(tuple(draw(cells) for _ in range(n))).encode()


@st.composite
def other_message(draw: Any) -> bytes:
    kind = draw(st.integers(0, 12))
    if kind == 0:
        extra = {"D": draw(texts)} if draw(st.booleans()) else {}
        cls = be.ErrorResponse if draw(st.booleans()) else be.NoticeResponse
        return cls.make("ERROR", "42501", draw(texts), **extra).encode()
    if kind == 1:
        return be.ParameterStatus(draw(st.sampled_from(NAMES)).replace("\n", ""),
                                  draw(texts)).encode()
    if kind == 2:
        return be.EmptyQueryResponse().encode()
    if kind == 3:  # COPY OUT: response, data lines, done
        fmt = draw(st.integers(0, 1))
        lines = [frame(b"d", draw(cells) or b"") for _ in range(draw(st.integers(0, 3)))]
        return (be.CopyOutResponse(fmt, (fmt,)).encode() + b"".join(lines)
                + frame(b"c", b""))
    if kind == 4:
        return be.CopyInResponse(0, (0,)).encode()
    if kind == 5:
        return be.NotificationResponse(7, draw(st.sampled_from(NAMES)).replace("\n", ""),
                                       draw(texts)).encode()
    if kind == 6:
        return be.FunctionCallResponse(draw(cells)).encode()
    if kind == 7:
        return frame(b"?", b"xyz")  # unknown
    if kind == 8:
        return frame(b"C", b"bad\xff\x00")
    return draw(st.sampled_from([be.ParseComplete().encode(), be.BindComplete().encode(),
                                 be.ReadyForQuery(b"I").encode(), frame(b"n", b""),
                                 frame(b"s", b""), frame(b"t", b"\x00\x01\x00\x00\x00\x17")]))


@st.composite
def template(draw: Any) -> tuple[bytes, int, bytes]:
    """The bytes around the rows of an answer, and how wide its rows are."""
    cols = draw(columns())
    before = b"".join(draw(st.lists(other_message(), max_size=2))) if draw(
        st.integers(0, 3)) == 0 else b""
    if draw(st.integers(0, 3)):  # a RowDescription (else: described by an earlier answer)
        before += be.RowDescription(tuple(be.FieldDescription(n, format=f)
                                          for n, f in cols)).encode()
    elif draw(st.booleans()):
        before = be.BindComplete().encode() + before
    after = be.CommandComplete(draw(st.sampled_from(TAGS))).encode()
    if draw(st.integers(0, 4)) == 0:
        after += b"".join(draw(st.lists(other_message(), max_size=2)))
    after += be.ReadyForQuery(b"I").encode()
    if draw(st.integers(0, 10)) == 0:
        after += b"Z\x00\x00"  # a partial message: never rendered
    return before, len(cols), after


@st.composite
def sessions(draw: Any) -> list[Segment]:
    """Segments of one session: statements and answers drawn from a few shapes, so answers
    repeat (whole, or around different rows) as they do in real sessions."""
    shapes = draw(st.lists(template(), min_size=1, max_size=4))
    entries: list[tuple[bool, Any, float]] = []
    ts = 1764130000.0
    for _ in range(draw(st.integers(1, 30))):
        ts += draw(st.floats(0.000001, 2.0))
        if draw(st.integers(0, 3)):
            text = draw(st.sampled_from(STATEMENTS))
            op = {"sql": {"normalized": text}, "summary": text}
            effect = draw(st.sampled_from(["allow", "allow", "deny"]))
            entries.append((True, (op, effect, ("rule-1",)), ts))
        kind = draw(st.integers(0, 10))
        if kind == 10:
            data = b""  # nothing sent (nothing shown)
        elif kind == 0:
            data = b"".join(draw(st.lists(other_message(), min_size=1, max_size=3)))
        elif kind == 1:
            data = be.CommandComplete(draw(st.sampled_from(TAGS))).encode()
        else:
            before, width, after = draw(st.sampled_from(shapes))
            n = draw(st.sampled_from([1, 1, 1, 0, 2, 3]))
            data = before + b"".join(row(draw, width) for _ in range(n)) + after
        ts += draw(st.floats(0.000001, 0.01))
        cut = sorted(draw(st.lists(st.integers(0, len(data)), max_size=2)))
        chunks = [data[a:b] for a, b in zip([0, *cut], [*cut, len(data)], strict=True)]
        chunks = [c for c in chunks if c] or [data]
        item: Any = chunks
        if draw(st.integers(0, 12)) == 0:  # reduced while it streamed (a big answer)
            item = as_answer(list(chunks))
            item.reduce()
        entries.append((False, item, ts))
    size = draw(st.integers(1, 12))
    return [Segment("orders-db", "bench", "agent-7", ("127.0.0.1", 5555), ("127.0.0.1", 5432),
                    n + 1, 0.0, 1.0, False, None, entries[i:i + size])
            for n, i in enumerate(range(0, len(entries), size))]


def expected(writer: SegmentWriter, seg: Segment) -> list[tuple[bool, bytes, float]]:
    return [(fc, writer.reference(text), ts) for fc, text, ts in render(seg)]


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(sessions(), min_size=1, max_size=3))
def test_messages_are_each_rendered_message_cleaned_on_its_own(runs: list[list[Segment]]) -> None:
    writer = SegmentWriter(None, SECRETS)  # one writer for all the sessions: caches carry over
    try:
        for segments in runs:
            for seg in segments:
                assert writer.messages(seg) == expected(writer, seg)
    finally:
        writer.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sessions())
def test_a_secret_spanning_lines_cleans_message_by_message(segments: list[Segment]) -> None:
    writer = SegmentWriter(None, ["SELECT 1\nabalance", "s3cr3t-pw"])
    try:
        for seg in segments:
            assert writer.messages(seg) == expected(writer, seg)
    finally:
        writer.close()


def one_row(value: bytes | None, tag: str = "SELECT 1", name: str = "abalance",
            fmt: int = 0) -> bytes:
    return (be.RowDescription((be.FieldDescription(name, format=fmt),)).encode()
            + be.DataRow((value,)).encode() + be.CommandComplete(tag).encode()
            + be.ReadyForQuery(b"I").encode())


def segment(answers: list[bytes], number: int = 1) -> Segment:
    op = {"sql": {"normalized": "SELECT abalance FROM t WHERE aid = $1"}}
    entries: list[tuple[bool, Any, float]] = []
    for i, data in enumerate(answers):
        entries.append((True, (op, "allow", ("read",)), 1764130000.0 + i))
        entries.append((False, [data], 1764130000.5 + i))
    return Segment("orders-db", "bench", "agent-7", ("127.0.0.1", 5555), ("127.0.0.1", 5432),
                   number, 0.0, 1.0, False, None, entries)


def test_repeated_and_varying_one_row_answers_across_segments() -> None:
    writer = SegmentWriter(None, SECRETS)
    values = [b"-4711", b"-4711", b"12", b"a much wider value than the name", b"-4711",
              b"ada@example.com", b"s3cr3t-pw", b"4111 1111 1111 1111", b"-4711", None, b"",
              "é☃".encode(), b"x\ny", b"\xff", b"v" * 300]
    try:
        for n in range(4):  # the caches of one segment serve the next
            seg = segment([one_row(v) for v in values], n + 1)
            got = writer.messages(seg)
            assert got == expected(writer, seg)
        texts = [m.decode() for fc, m, _ in got if not fc]
        assert texts[0] == "abalance\n--------\n-4711\nSELECT 1"
        assert texts[3].splitlines()[1] == "-" * len("a much wider value than the name")
        assert texts[5] == "abalance\n---------------\n[MASKED:email]\nSELECT 1"
        assert "s3cr3t-pw" not in "".join(texts) and "[removed by portcullis]" in texts[6]
        assert "4111" not in texts[7] and texts[9].splitlines()[2] == "NULL"
    finally:
        writer.close()


def test_a_private_key_in_a_row_masks_the_rest_of_the_message() -> None:
    """Its body runs past the row's line: such a segment is cleaned message by message."""
    writer = SegmentWriter(None, SECRETS)
    rows = (be.RowDescription((be.FieldDescription("k"),)).encode()
            + be.DataRow((b"-----BEGIN RSA PRIVATE KEY----- MIIE",)).encode()
            + be.DataRow((b"more key material",)).encode()
            + be.CommandComplete("SELECT 2").encode())
    try:
        seg = segment([one_row(b"1"), rows])
        got = writer.messages(seg)
        assert got == expected(writer, seg)
        assert b"more key material" not in got[3][1] and b"[MASKED:private_key]" in got[3][1]
    finally:
        writer.close()


def test_a_long_answer_is_capped_before_it_is_cleaned() -> None:
    writer = SegmentWriter(None, SECRETS)
    rd = be.RowDescription((be.FieldDescription("v"),)).encode()
    rows = b"".join(be.DataRow((b"%d ada@example.com " % i + b"w" * 180,)).encode()
                    for i in range(90))
    big = rd + rows + be.CommandComplete("SELECT 90").encode()
    many = rd + rows * 5 + be.CommandComplete("SELECT 450").encode()  # rows capped at 100
    try:
        seg = segment([big, many, big])
        got = writer.messages(seg)
        assert got == expected(writer, seg)
        assert len(got[1][1]) > recording.MAX_TEXT // 4
        assert all(b"ada@example.com" not in m for _, m, _ in got)
    finally:
        writer.close()


def test_prepared_statements_keep_the_columns_described_before() -> None:
    writer = SegmentWriter(None, SECRETS)
    describe = (be.ParseComplete().encode() + be.ParameterDescription((23,)).encode()
                + be.RowDescription((be.FieldDescription("abalance"),)).encode()
                + be.ReadyForQuery(b"I").encode())
    execute = [be.BindComplete().encode() + be.DataRow((v,)).encode()
               + be.CommandComplete("SELECT 1").encode() + be.ReadyForQuery(b"I").encode()
               for v in (b"-4711", b"7", b"-4711", b"-4711", b"123456789012", b"7")]
    try:
        for n in range(3):
            seg = segment([describe, *execute], n + 1)
            got = writer.messages(seg)
            assert got == expected(writer, seg)
        assert got[5][1] == b"abalance\n--------\n7\nSELECT 1"
    finally:
        writer.close()


pieces = st.sampled_from(VALUES + ["4111 1111", "1111 1111", "+1 415", "555 2671", "DE89 3704",
                                   "0044 0532 0130 00", "ada@", "@example.com", "eyJhbGciOiJI",
                                   "10.0.", "0.1", "2001:", ":db8::1", "123-45", "-6789", " | ",
                                   "-", "(", ")", ".", ":", "+", "AKIA", "IOSFODNN7EXAMPLE"])
lines = st.lists(pieces, max_size=4).map("".join).filter(lambda t: "-----BEGIN" not in t)


@settings(max_examples=1500, deadline=None)
@given(st.lists(lines, min_size=2, max_size=5))
def test_no_detector_hit_spans_a_newline(parts: list[str]) -> None:
    """What the writer's single pass relies on: a text scrubbed whole is its lines scrubbed one
    by one (a private key's body is the one exception: `-----BEGIN` is handled apart)."""
    assert scrub("\n".join(parts)) == "\n".join(map(scrub, parts))
