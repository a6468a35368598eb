"""mitmproxy flow-file records for the Postgres recordings, without mitmproxy's generic path.

A flow file is a sequence of tnetstrings, one per flow, each the flow's `get_state()`. Writing a
Postgres segment the generic way (a `tcp.TCPMessage` per message, `get_state()`, then
`mitmproxy.io.tnetstring.dumps`, which recurses in pure Python through every value) cost
several microseconds per message. Here:
- `dumps` is a tnetstring encoder whose output is byte-identical to mitmproxy's `dumps` (same
  tags, dictionaries in reverse item order as mitmproxy writes them; checked by
  tests/test_flowfile.py against mitmproxy's own encoder);
- `tcp_flow` encodes a TCP flow: its envelope is the `get_state()` of a flow built once with
  mitmproxy's own classes (so the installed mitmproxy's format version and fields are used),
  encoded once with holes for the values that change from flow to flow (ids, addresses,
  timestamps, metadata, comment, messages); the messages, `(from_client, content,
  timestamp)` tuples, are encoded by a loop specialised for them;
- timestamps are recorded to the microsecond (`stamp`: a cheaper conversion than `repr`).
The records are read by `mitmproxy.io.FlowReader` (mitmproxy 11 and 12; tests/test_flowfile.py
compares them byte for byte with what `FlowWriter` writes for the same flow, timestamps
rounded).
"""

from __future__ import annotations

import os
from typing import Any

_TRUE = b"4:true!"
_FALSE = b"5:false!"


def dumps(value: Any) -> bytes:
    """`mitmproxy.io.tnetstring.dumps(value)`, byte for byte."""
    t = type(value)
    if t is str:
        data = value.encode()
        return b"%d:%s;" % (len(data), data)
    if t is bytes:
        return b"%d:%s," % (len(value), value)
    if t is dict:
        body = b"".join([dumps(k) + dumps(v) for k, v in reversed(value.items())])
        return b"%d:%s}" % (len(body), body)
    if t is list or t is tuple:
        body = b"".join([dumps(v) for v in value])
        return b"%d:%s]" % (len(body), body)
    if t is float:
        data = repr(value).encode()
        return b"%d:%s^" % (len(data), data)
    if t is int:
        data = b"%d" % value
        return b"%d:%s#" % (len(data), data)
    if value is None:
        return b"0:~"
    if value is True:
        return _TRUE
    if value is False:
        return _FALSE
    return _other(value)


def _other(value: Any) -> bytes:
    """Numbers and subclasses, in the order and with the conversions mitmproxy uses."""
    if isinstance(value, int):
        data = str(value).encode()
        return b"%d:%s#" % (len(data), data)
    if isinstance(value, float):
        data = repr(value).encode()
        return b"%d:%s^" % (len(data), data)
    if isinstance(value, bytes):
        return b"%d:%s," % (len(value), bytes(value))
    if isinstance(value, str):
        data = value.encode("utf8")
        return b"%d:%s;" % (len(data), data)
    if isinstance(value, (list, tuple)):
        body = b"".join([dumps(v) for v in value])
        return b"%d:%s]" % (len(body), body)
    if isinstance(value, dict):
        body = b"".join([dumps(k) + dumps(v) for k, v in reversed(value.items())])
        return b"%d:%s}" % (len(body), body)
    raise ValueError(f"unserializable object: {value} ({type(value)})")


# "N:" for the lengths of most message parts (one lookup instead of a conversion)
_LEN = [b"%d:" % n for n in range(4096)]


def stamp(ts: float) -> bytes:
    """A recorded timestamp: `ts` rounded to the microsecond, written as `repr()` writes that
    float (no trailing zeros but one), so reading it back gives that float and re-encoding it
    gives the same bytes. A float-to-text conversion with `repr` costs about twice this one:
    two per statement recorded, the largest single cost of writing. Why the text is `repr`'s:
    below 2**33 s (year 2242) two floats are less than 1 µs apart, so the decimal with the
    fewest digits that reads back as the rounded value is the microsecond decimal itself.
    Timestamps out of that range are written with `repr`, unrounded (as floats)."""
    if 1.0 <= ts < 8589934592.0:
        text = b"%d.%06d" % divmod(int(ts * 1e6 + 0.5), 1000000)
        if text[-1] == 48:  # "0"
            text = text.rstrip(b"0")
            if text[-1] == 46:  # "."
                text += b"0"
        return text
    return b"%r" % float(ts)


def rounded(ts: float) -> float:
    """The timestamp as recorded (see `stamp`)."""
    return float(stamp(ts))


def dumps_messages(messages: list[tuple[bool, bytes, float]]) -> bytes:
    """`dumps()` of the list of TCP message states `(from_client, content, rounded(ts))`."""
    parts: list[bytes] = []
    extend = parts.extend
    lengths = _LEN
    for from_client, content, ts in messages:
        size = len(content)
        if (size > 4000 or not 1.0 <= ts < 8589934592.0 or type(content) is not bytes
                or type(from_client) is not bool):  # the general way (rare)
            parts.append(dumps((from_client, content, rounded(ts))))
            continue
        text = b"%d.%06d" % divmod(int(ts * 1e6 + 0.5), 1000000)  # `stamp`, inline
        if text[-1] == 48:  # "0"
            text = text.rstrip(b"0")
            if text[-1] == 46:  # "."
                text += b"0"
        # "N:" + bool + "N:" + content + "," + "N:" + timestamp + "^" + "]"
        prefix, tsize = lengths[size], lengths[len(text)]
        size += len(prefix) + len(tsize) + len(text)
        if from_client:
            extend((lengths[size + 9], _TRUE, prefix, content, b",", tsize, text, b"^]"))
        else:
            extend((lengths[size + 10], _FALSE, prefix, content, b",", tsize, text, b"^]"))
    body = b"".join(parts)
    return b"%d:%s]" % (len(body), body)


# The varying values of a recorded TCP flow's state, by path; everything else is the same in
# every flow and encoded once (`_Plan`).
_VARYING = ("id", "timestamp_created", "metadata", "comment", "messages",
            "client_conn.peername", "client_conn.sockname", "client_conn.id",
            "client_conn.timestamp_start", "client_conn.timestamp_end",
            "server_conn.address", "server_conn.id", "server_conn.timestamp_start",
            "server_conn.timestamp_tcp_setup", "server_conn.timestamp_end")


def _template() -> dict[str, Any]:
    """The state of an empty TCP flow built with mitmproxy's classes exactly as a recorded one
    would be (keyword arguments only: mitmproxy 11 and 12 accept them alike)."""
    from mitmproxy import connection, tcp

    client = connection.Client(peername=("", 0), sockname=("", 0), timestamp_start=0.0)
    client.timestamp_end = 0.0
    server = connection.Server(address=("", 0))
    server.timestamp_start = server.timestamp_tcp_setup = server.timestamp_end = 0.0
    flow = tcp.TCPFlow(client, server)
    flow.timestamp_created = 0.0
    flow.messages = []
    flow.metadata = {}
    flow.comment = ""
    state: dict[str, Any] = flow.get_state()
    for path in _VARYING:  # the fields filled in per flow are where they are expected
        node = state
        *parents, leaf = path.split(".")
        for key in parents:
            node = node[key]
        if leaf not in node:
            raise RuntimeError(f"unexpected TCP flow state from mitmproxy: no {path}")
    return state


class _Plan:
    """A dict's tnetstring with holes: the encoded constant items and, for each varying one, its
    encoded key and the path of its value (or the plan of a dict that contains holes)."""

    def __init__(self, state: dict[str, Any], prefix: str = "") -> None:
        self.parts: list[bytes | tuple[bytes, str | _Plan]] = []
        const = b""
        for key, value in reversed(state.items()):  # mitmproxy writes the last item first
            path = prefix + key
            if path in _VARYING:
                hole: str | _Plan = path
            elif any(v.startswith(path + ".") for v in _VARYING):
                hole = _Plan(value, path + ".")
            else:
                const += dumps(key) + dumps(value)
                continue
            if const:
                self.parts.append(const)
                const = b""
            self.parts.append((dumps(key), hole))
        if const:
            self.parts.append(const)

    def fill(self, values: dict[str, bytes]) -> bytes:
        """The encoding, with `values` = encoded value of each hole by path."""
        out: list[bytes] = []
        for part in self.parts:
            if isinstance(part, bytes):
                out.append(part)
            else:
                key, hole = part
                out.append(key)
                out.append(values[hole] if isinstance(hole, str) else hole.fill(values))
        body = b"".join(out)
        return b"%d:%s}" % (len(body), body)


_PLAN: _Plan | None = None


def _plan() -> _Plan:
    global _PLAN
    if _PLAN is None:
        _PLAN = _Plan(_template())
    return _PLAN


def new_ids() -> tuple[str, str, str]:
    """Three random (version 4) UUIDs as text, as mitmproxy gives flows and connections."""
    raw = bytearray(os.urandom(48))
    out = []
    for i in (0, 16, 32):
        raw[i + 6] = raw[i + 6] & 0x0F | 0x40
        raw[i + 8] = raw[i + 8] & 0x3F | 0x80
        h = raw[i:i + 16].hex()
        out.append(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
    return out[0], out[1], out[2]


def tcp_flow(client: tuple[str, int], server: tuple[str, int], sockname: tuple[str, int],
             start: float, end: float, messages: list[tuple[bool, bytes, float]],
             metadata: dict[str, Any], comment: str,
             ids: tuple[str, str, str] | None = None) -> bytes:
    """One flow-file record: what `FlowWriter.add` writes for the TCP flow with these values."""
    flow_id, client_id, server_id = ids or new_ids()
    start_b, end_b = stamp(start), stamp(end)
    start_b, end_b = b"%d:%s^" % (len(start_b), start_b), b"%d:%s^" % (len(end_b), end_b)
    return _plan().fill({
        "id": dumps(flow_id), "timestamp_created": start_b, "metadata": dumps(metadata),
        "comment": dumps(comment), "messages": dumps_messages(messages),
        "client_conn.peername": dumps((client[0], client[1])),
        "client_conn.sockname": dumps((sockname[0], sockname[1])),
        "client_conn.id": dumps(client_id), "client_conn.timestamp_start": start_b,
        "client_conn.timestamp_end": end_b,
        "server_conn.address": dumps((server[0], server[1])), "server_conn.id": dumps(server_id),
        "server_conn.timestamp_start": start_b, "server_conn.timestamp_tcp_setup": start_b,
        "server_conn.timestamp_end": end_b})
