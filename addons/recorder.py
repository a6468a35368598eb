"""Recordings: sanitised mitmproxy flow files under `audit.recordings` (SPEC §7).

Each finished flow is copied, stripped of everything secret, and appended to
`recordings/portcullis-YYYYMMDD.mitm`, readable by stock `mitmweb --rfile`:
- the agent's token and the injected credential never appear: `Authorization`,
  `Proxy-Authorization`, `Cookie` and the target's credential header are replaced by a marker;
- request bodies and WebSocket messages are passed through `masking.scrub` (detector hits
  redacted); responses are recorded as the agent received them (already masked);
- the path and the query string are scrubbed too.
A recording failure is logged and counted, never fatal to the request (the audit line, written
before forwarding, is the record of the decision).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("portcullis.recorder")

SECRET_HEADERS = {"authorization", "proxy-authorization", "cookie", "set-cookie"}
MARKER = "[removed by portcullis]"


def sanitise_headers(headers: Any, extra: set[str]) -> None:
    for name in list(headers.keys()):
        low = name.lower()
        if low in SECRET_HEADERS or low in extra or low.startswith("impersonate-"):
            headers[name] = MARKER


def decode_kubernetes_message(content: bytes, protocol: str) -> bytes:
    """Exec/attach frames become `[stdout] text` so analysts read them in mitmweb."""
    from addons.kubernetes import CHANNEL_NAMES, decode_channel_frame

    try:
        channel, payload = decode_channel_frame(content, protocol)
    except ValueError:
        return content
    return f"[{CHANNEL_NAMES.get(channel, channel)}] ".encode() + payload


def scrub_bytes(data: bytes | None) -> bytes | None:
    from addons import masking

    if not data:
        return data
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return b"[binary body not recorded]"
    return masking.scrub(text).encode()


_SEP = "\n\x1e\n"  # joins messages for one detector pass; no detector match spans it


def scrub_all(contents: list[bytes]) -> list[bytes]:
    """`scrub_bytes` of each, in one detector pass over them all (a segment has hundreds of
    short messages). When a separator did not survive (a hit spanning two messages), each
    message is scrubbed on its own."""
    from addons import masking

    try:
        texts = [c.decode("utf-8") for c in contents]
    except UnicodeDecodeError:
        texts = []
    if texts and not any(_SEP in t for t in texts):
        out = masking.scrub(_SEP.join(texts)).split(_SEP)
        if len(out) == len(texts):
            return [t.encode() for t in out]
    return [scrub_bytes(c) or b"" for c in contents]


class Recorder:
    """Shared by the HTTP addon chain and the Postgres gateway (`Runtime.recorder`): one lock
    around the daily file, so flows written from the Postgres recorder thread never interleave
    with HTTP flows."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.lock = threading.Lock()
        self._files: dict[str, Any] = {}
        self.failures = 0  # flows that could not be recorded (logged each time)

    def _writer(self) -> Any:
        from mitmproxy import io

        name = time.strftime("portcullis-%Y%m%d.mitm", time.gmtime())
        w = self._files.get(name)
        if w is None:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            fh = (self.directory / name).open("ab")
            w = self._files[name] = (fh, io.FlowWriter(fh))
        return w

    def sanitised_copy(self, flow: Any) -> Any:
        from addons import flows, masking

        copy = flow.copy()
        target = flow.metadata.get(flows.TARGET)
        extra = set()
        if target is not None and target.credentials.header:
            extra.add(target.credentials.header.lower())
        copy.metadata = {}
        sanitise_headers(copy.request.headers, extra)
        copy.request.content = scrub_bytes(copy.request.raw_content and copy.request.content)
        path, sep, query = copy.request.path.partition("?")
        clean = masking.scrub(path) + (sep + masking.scrub(query) if sep else "")
        if clean != copy.request.path:
            copy.request.path = clean
        if copy.response is not None:
            sanitise_headers(copy.response.headers, set())
        ws = getattr(copy, "websocket", None)
        if ws is not None:
            proto = ""
            if flow.response is not None:
                proto = flow.response.headers.get("Sec-WebSocket-Protocol", "")
            kube = target is not None and target.protocol == "kubernetes"
            for m in ws.messages:
                content = m.content
                if kube:
                    content = decode_kubernetes_message(content, proto)
                m.content = scrub_bytes(content) or b""
        return copy

    def record(self, flow: Any) -> None:
        from addons import flows

        try:
            copy = self.sanitised_copy(flow)
            target = flow.metadata.get(flows.TARGET)
            secrets = [s.encode() for s in (target.credentials.secrets() if target else [])
                       if len(s) >= 4]
            if secrets:
                copy = _without_secrets(copy, secrets)
            with self.lock:
                fh, writer = self._writer()
                writer.add(copy)
                fh.flush()
        except Exception:  # noqa: BLE001 - never fatal; the audit line already exists
            self.failures += 1
            _count_failure()
            log.exception("could not record flow")

    def record_tcp(self, client: tuple[str, int], server: tuple[str, int],
                   messages: list[tuple[bool, bytes, float]], metadata: dict[str, Any], *,
                   sockname: tuple[str, int] = ("", 0), comment: str = "",
                   started: float | None = None, ended: float | None = None,
                   scrubbed: bool = False) -> bool:
        """Append one TCP flow (a Postgres session segment) to the daily file. Messages are
        `(from_client, content, timestamp)`, already rendered; their text passes through
        `masking.scrub` here unless the caller did exactly that already (`scrubbed=True`:
        `proxy_db.recording.SegmentWriter`, which scrubs what repeats once). Encoded by
        `addons.flowfile`: the record mitmproxy's FlowWriter would write for the same flow.
        Thread-safe; False (logged, counted) when it failed."""
        from addons import flowfile

        try:
            first = messages[0][2] if messages else time.time()
            start = min(first, started) if started is not None else first
            end = max(messages[-1][2] if messages else start, ended or start)
            if not scrubbed:
                contents = scrub_all([content for _, content, _ in messages])
                messages = [(fc, content, ts)
                            for (fc, _, ts), content in zip(messages, contents, strict=True)]
            record = flowfile.tcp_flow(client, server, sockname, start, end, messages, metadata,
                                       comment)
            with self.lock:
                fh, _ = self._writer()
                fh.write(record)
                fh.flush()
            return True
        except Exception:  # noqa: BLE001 - never fatal; the audit lines already exist
            self.failures += 1
            _count_failure()
            log.exception("could not record tcp flow")
            return False

    # mitmproxy hooks
    def response(self, flow: Any) -> None:
        if flow.response is not None and flow.response.status_code == 101:
            return  # a WebSocket: recorded with its messages at websocket_end
        self.record(flow)

    def error(self, flow: Any) -> None:
        self.record(flow)

    def websocket_end(self, flow: Any) -> None:
        self.record(flow)

    def done(self) -> None:
        with self.lock:
            for fh, _ in self._files.values():
                fh.close()
            self._files.clear()


def _count_failure() -> None:
    from addons.metrics import RECORDING_FAILURES

    RECORDING_FAILURES.inc()


def _without_secrets(flow: Any, secrets: list[bytes]) -> Any:
    """Belt and braces: no injected credential survives anywhere in the serialised flow."""
    from mitmproxy.io import tnetstring

    state = flow.get_state()
    raw = tnetstring.dumps(state)
    if not any(s in raw for s in secrets):
        return flow

    def clean(v: Any) -> Any:
        if isinstance(v, bytes):
            for s in secrets:
                v = v.replace(s, MARKER.encode())
            return v
        if isinstance(v, str):
            for s in secrets:
                v = v.replace(s.decode(), MARKER)
            return v
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(clean(x) for x in v)
        return v

    return type(flow).from_state(clean(state))
