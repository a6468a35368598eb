"""Masking of HTTP and Kubernetes responses: whole bodies and streams, and the mitmproxy addon.

Pure part (no mitmproxy, no asyncio; built on the engine in `addons.masking`):
- `mask_body(body, content_type, masks, key, k8s=..., assume_secret=...)`: a whole decoded body
  by its content type (JSON and `+json`, NDJSON, event streams, text), or MaskingError;
- `LineMasker`: a byte stream masked line by line as it arrives (Kubernetes watch events,
  followed logs, NDJSON, event streams).
Adapter: `Masking` (the only part that knows flows): plans which masks apply to a flow, decodes
and re-encodes Content-Encoding, streams or buffers, and refuses with 502 whatever cannot be
masked.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from addons import detectors as det
from addons.masking import (
    CompiledMask,
    MaskingError,
    MaskResult,
    _compiled,
    _plan,
    compile_mask,
    mask_json_text,
    mask_text,
    redact_token,
    summarize,
)

# ---------------------------------------------------------------------------------------------
# Streams


MAX_LINE = 1 << 20  # a streamed line (watch event, log line) longer than this is refused


class LineMasker:
    """Masks a byte stream line by line as it arrives: `feed(chunk)` returns the masked
    complete lines, `close()` the masked rest. Pure and synchronous (the adapter calls it from
    mitmproxy's stream callback). JSON lines (watch events) get json_paths, Secret masking and
    detectors; text lines (followed logs) get detectors, and the lines of a PEM private key
    that spans lines stay masked until its END line. Raises MaskingError on a line that is
    too long or, when json_paths apply, not JSON."""

    def __init__(self, masks: Iterable[Any], key: bytes, *, json_lines: bool, k8s: bool = False,
                 assume_secret: bool = False, max_line: int = MAX_LINE) -> None:
        self.masks = tuple(_compiled(m) for m in masks)
        self.plan = _plan(self.masks)
        self.key = key
        self.json_lines = json_lines
        self.k8s = k8s
        self.assume_secret = assume_secret
        self.max_line = max_line
        self.results: list[MaskResult] = []
        self._buf = bytearray()
        self._in_pem = False

    def feed(self, chunk: bytes) -> bytes:
        self._buf += chunk
        cut = self._buf.rfind(b"\n") + 1
        if cut == 0:
            if len(self._buf) > self.max_line:
                raise MaskingError(f"a streamed line is longer than {self.max_line} bytes")
            return b""
        lines = bytes(self._buf[:cut])
        del self._buf[:cut]
        return b"".join(self._line(line) for line in lines.splitlines(keepends=True))

    def close(self) -> bytes:
        rest = bytes(self._buf)
        self._buf.clear()
        return self._line(rest) if rest else b""

    def summary(self) -> dict[str, Any]:
        return summarize(self.results)

    def _note(self, result: MaskResult) -> None:
        if result.count and len(self.results) < 10_000:
            self.results.append(result)

    def _line(self, raw: bytes) -> bytes:
        if len(raw) > self.max_line:
            raise MaskingError(f"a streamed line is longer than {self.max_line} bytes")
        body = raw.rstrip(b"\r\n")
        end = raw[len(body):]
        text = body.decode("utf-8", "surrogateescape")
        if self.json_lines and text.strip():
            result = mask_json_text(text, self.masks, self.key, k8s=self.k8s,
                                    assume_secret=self.assume_secret)
        else:
            result = self._text_line(text)
        self._note(result)
        if not result.count:
            return raw
        return result.value.encode("utf-8", "surrogateescape") + end

    def _text_line(self, text: str) -> MaskResult:
        if "private_key" in self.plan.detectors:
            if self._in_pem:
                close = det.PEM_END.search(text)
                if close is None:
                    return MaskResult(redact_token("private_key"), ("text",),
                                      (self.plan.by_detector["private_key"].id,), 1)
                self._in_pem = False
                rest = mask_text(text[close.end():], self.masks, self.key)
                return MaskResult(redact_token("private_key") + rest.value, ("text",),
                                  (self.plan.by_detector["private_key"].id, *rest.rules),
                                  1 + rest.count)
            begins = list(det.PEM_BEGIN.finditer(text))
            if begins and det.PEM_END.search(text, begins[-1].end()) is None:
                self._in_pem = True  # this line's hit runs to its end; later lines follow
        return mask_text(text, self.masks, self.key)


# ---------------------------------------------------------------------------------------------
# mitmproxy adapter (the only part of this file that knows flows)

MAX_BODY = 16 << 20  # cap without a config (the gateway passes limits.max_body_bytes)
_PLAN = "portcullis.masking_plan"
_JSON_TYPES = {"application/json", "text/json", "application/x-json"}
_NDJSON_TYPES = {"application/x-ndjson", "application/ndjson", "application/jsonl",
                 "application/x-jsonlines", "application/jsonlines", "application/json-seq"}
_TEXT_TYPES = {"application/xml", "application/javascript", "application/x-www-form-urlencoded",
               "application/yaml", "application/x-yaml", "application/graphql", "application/csv"}


def body_kind(content_type: str) -> str:
    """json | ndjson | events | text | binary, from a Content-Type header value."""
    mime = content_type.split(";", 1)[0].strip().lower()
    if mime in _JSON_TYPES or mime.endswith("+json"):
        return "json"
    if mime in _NDJSON_TYPES:
        return "ndjson"
    if mime == "text/event-stream":
        return "events"
    if not mime or mime.startswith("text/") or mime in _TEXT_TYPES or mime.endswith("+xml"):
        return "text"
    return "binary"


def _charset(content_type: str) -> str:
    for part in content_type.split(";")[1:]:
        name, _, value = part.strip().partition("=")
        if name.lower() == "charset" and value:
            try:
                return codecs.lookup(value.strip('"')).name
            except LookupError:
                return "utf-8"
    return "utf-8"


def mask_body(body: bytes, content_type: str, masks: Sequence[Any], key: bytes, *,
              k8s: bool = False, assume_secret: bool = False) -> tuple[bytes, MaskResult]:
    """A whole (decoded) response body. Pure; raises MaskingError when it cannot be masked."""
    kind = body_kind(content_type)
    plan = _plan(masks)
    charset = _charset(content_type)
    if kind == "binary":
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            if plan.paths or plan.detectors or (k8s and b"Secret" in body):
                raise MaskingError("a binary response cannot be masked") from None
            return body, MaskResult(body)
        kind, charset = "text", "utf-8"
    text = body.decode(charset, "surrogateescape")
    if kind == "json" or (kind == "text" and plan.paths):
        result = mask_json_text(text, masks, key, k8s=k8s, assume_secret=assume_secret)
    elif kind in ("ndjson", "events"):
        lm = LineMasker(masks, key, json_lines=kind == "ndjson", k8s=k8s,
                        assume_secret=assume_secret, max_line=MAX_BODY)
        if kind == "events" and plan.paths:
            raise MaskingError("json_paths cannot be applied to an event stream")
        out = lm.feed(body) + lm.close()
        summary = lm.summary()
        return out, MaskResult(out, tuple(summary["paths"]), tuple(summary["rules"]),
                               summary["count"])
    else:
        result = mask_text(text, masks, key)
    if not result.count:
        return body, result
    return result.value.encode(charset, "surrogateescape"), result


class _Decoder:
    """Streaming Content-Encoding decoder (gzip, deflate, br, zstd)."""

    def __init__(self, encoding: str) -> None:
        import zlib

        self.name = encoding
        if encoding in ("gzip", "x-gzip"):
            self.obj: Any = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self.obj = zlib.decompressobj()
        elif encoding == "br":
            import brotli

            self.obj = brotli.Decompressor()
        elif encoding == "zstd":
            import zstandard

            self.obj = zstandard.ZstdDecompressor().decompressobj()
        else:
            raise MaskingError(f"unknown Content-Encoding {encoding!r}: cannot mask the stream")

    def __call__(self, data: bytes) -> bytes:
        if self.name == "br":
            return bytes(self.obj.process(data))
        return bytes(self.obj.decompress(data))


class _StreamMasker:
    """mitmproxy `response.stream` callable: decode, mask line by line, pass on."""

    def __init__(self, masker: LineMasker, decoder: _Decoder | None, request_id: str) -> None:
        self.masker = masker
        self.decoder = decoder
        self.request_id = request_id
        self.failed = False

    def __call__(self, data: bytes) -> list[bytes]:
        # Never return b"": on a chunked HTTP/1 response an empty chunk ends the body.
        if self.failed:
            return []
        try:
            if data:
                out = self.masker.feed(self.decoder(data) if self.decoder else data)
            else:
                out = self.masker.close()
        except Exception as e:  # noqa: BLE001 - stop the stream rather than pass it unmasked
            self.failed = True
            from addons import flows

            flows.log.error("masking stopped the stream of request %s: %s", self.request_id,
                            type(e).__name__)
            return []
        return [out] if out else []


class _Emit:
    """`response.stream` callable of a refusal decided at the headers: the upstream body is
    dropped and the refusal body is sent once."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.sent = False

    def __call__(self, data: bytes) -> list[bytes]:
        if self.sent:
            return []
        self.sent = True
        return [self.body]


@dataclass
class _FlowPlan:
    masks: list[CompiledMask]
    k8s: bool
    assume_secret: bool
    stream: bool
    refused: MaskingError | None = None
    streamer: _StreamMasker | None = None


class Masking:
    """mitmproxy addon: masks responses before the agent (and the audit/recorder) sees them.

    Sits after credentials and before audit in the addon chain (`addons/__init__.py`), so the
    audit outcome carries `portcullis.masked` and recordings hold masked responses. Masks are
    the policy's (every mask whose `when` matches one of the request's operations) plus, for
    Kubernetes targets, the built-in Secret mask. Watch, `log?follow=true`, NDJSON and
    event-stream responses are masked line by line as they stream; every other body is masked
    whole (after Content-Encoding decoding; re-encoded with the same encoding). Whatever cannot
    be masked is refused with 502, never passed on: a body over `max_body` (gateway.yaml
    `limits.max_body_bytes`), an unknown encoding, a binary body, or a json_path on a body that
    is not JSON."""

    def __init__(self, runtime: Any = None, *, key: bytes | None = None,
                 max_body: int | None = None) -> None:
        self.key = key if key is not None else getattr(runtime, "mask_key", b"") or b""
        configured = getattr(getattr(runtime, "config", None), "max_body_bytes", None)
        # `limits.max_body_bytes` of gateway.yaml (8 MiB by default), else MAX_BODY
        self.max_body = max_body or configured or MAX_BODY

    # -- planning --------------------------------------------------------------------------

    def _plan(self, flow: Any) -> _FlowPlan | None:
        from addons import flows
        from addons.policy import matching_masks

        if flow.metadata.get(flows.REFUSED) is not None:
            return None
        target = flow.metadata.get(flows.TARGET)
        if target is None:
            return None
        policy = flow.metadata.get(flows.POLICY)
        identity = flow.metadata.get(flows.IDENTITY)
        ops = flow.metadata.get(flows.OPERATIONS) or []
        rules: dict[str, Any] = {}
        if policy is not None:
            for op in ops:
                for m in matching_masks(policy, identity, op):
                    rules.setdefault(m.id, m)
        masks = [policy.compiled_masks.get(i) or compile_mask(m) for i, m in rules.items()]
        k8s = target.protocol == "kubernetes"
        if not masks and not k8s:
            return None
        k8s_ops = [op.kubernetes or {} for op in ops]
        assume_secret = any(k.get("resource") == "secrets" for k in k8s_ops)
        stream = any(k.get("verb") == "watch" for k in k8s_ops) or (
            k8s and any(k.get("subresource") == "log" for k in k8s_ops)
            and _query_flag(flow.request.query.get_all("follow")))
        return _FlowPlan(masks, k8s, assume_secret, stream)

    # -- hooks -----------------------------------------------------------------------------

    def request(self, flow: Any) -> None:
        from addons import flows

        with flows.guard(flow):
            if flow.response is not None:
                return
            target = flow.metadata.get(flows.TARGET)
            if target is None or target.protocol != "kubernetes":
                return
            # Protobuf cannot be masked: ask the API server for JSON (same objects).
            accept = flow.request.headers.get("accept", "")
            if "protobuf" in accept:
                kept = [a.strip() for a in accept.split(",") if "protobuf" not in a]
                if not any("json" in a for a in kept):
                    kept.insert(0, "application/json")
                flow.request.headers["accept"] = ", ".join(a for a in kept if a)

    def responseheaders(self, flow: Any) -> None:
        try:
            self._responseheaders(flow)
        except Exception as e:  # noqa: BLE001 - refuse rather than stream unmasked
            self._refuse_at_headers(flow, e if isinstance(e, MaskingError) else MaskingError(
                f"masking failed ({type(e).__name__}); response refused"))

    def _responseheaders(self, flow: Any) -> None:
        resp = flow.response
        if resp is None or resp.status_code == 101:
            return
        plan = self._plan(flow)
        if plan is None:
            return
        flow.metadata[_PLAN] = plan
        kind = body_kind(resp.headers.get("content-type", ""))
        if plan.stream or kind in ("ndjson", "events"):
            self._start_stream(flow, plan, kind)
            return
        length = resp.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            raise MaskingError(f"the response is larger than the masking limit "
                               f"({self.max_body} bytes)")

    def _start_stream(self, flow: Any, plan: _FlowPlan, kind: str) -> None:
        from addons import flows

        resp = flow.response
        json_lines = kind in ("json", "ndjson")
        if not json_lines and plan.masks and _plan(plan.masks).paths:
            raise MaskingError("json_paths cannot be applied to a text stream")
        encoding = resp.headers.get("content-encoding", "").strip().lower()
        decoder = _Decoder(encoding) if encoding not in ("", "identity") else None
        masker = LineMasker(plan.masks, self.key, json_lines=json_lines, k8s=plan.k8s,
                            assume_secret=plan.assume_secret)
        plan.streamer = _StreamMasker(masker, decoder, flows.request_id(flow))
        resp.headers.pop("content-encoding", None)
        resp.headers.pop("content-length", None)
        if flow.request.http_version.startswith("HTTP/1"):
            resp.headers["transfer-encoding"] = "chunked"
        resp.stream = plan.streamer

    def _refuse_at_headers(self, flow: Any, err: MaskingError) -> None:
        from addons import flows

        flows.log.error("masking refused the response to %s: %s", flows.request_id(flow),
                        err.reason)
        plan = flow.metadata.get(_PLAN) or _FlowPlan([], False, False, False)
        plan.refused = err
        flow.metadata[_PLAN] = plan
        flows.refuse(flow, err)
        # Headers go out now; the upstream body is dropped, the refusal body sent instead.
        flow.response.stream = _Emit(flow.response.raw_content or b"")

    def response(self, flow: Any) -> None:
        from addons import flows

        plan = flow.metadata.get(_PLAN)
        if plan is not None and plan.refused is not None:
            flows.refuse(flow, plan.refused)  # restore the body if the upstream's replaced it
            return
        with flows.guard(flow):
            if plan is None:
                if flow.response is None or flow.metadata.get(flows.REFUSED) is not None:
                    return
                plan = self._plan(flow)  # responseheaders is skipped for some responses
                if plan is None:
                    return
            if plan.streamer is not None:
                self._note(flow, plan.streamer.masker.summary())
                return
            self._mask_buffered(flow, plan)

    def _mask_buffered(self, flow: Any, plan: _FlowPlan) -> None:
        resp = flow.response
        if resp.status_code == 101 or flow.request.method == "HEAD":
            return
        if resp.raw_content is None:
            raise MaskingError("the response body was streamed and cannot be masked")
        if len(resp.raw_content) > self.max_body:
            raise MaskingError(f"the response is larger than the masking limit "
                               f"({self.max_body} bytes)")
        try:
            body = resp.get_content(strict=True) or b""
        except ValueError as e:
            raise MaskingError("the response has an unknown Content-Encoding: cannot mask "
                               "it") from e
        if not body:
            return
        if len(body) > self.max_body:
            raise MaskingError(f"the decoded response is larger than the masking limit "
                               f"({self.max_body} bytes)")
        new, result = mask_body(body, resp.headers.get("content-type", ""), plan.masks,
                                self.key, k8s=plan.k8s, assume_secret=plan.assume_secret)
        if result.count:
            resp.set_content(new)  # re-encoded with the same Content-Encoding, new length
        self._note(flow, result.summary())

    @staticmethod
    def _note(flow: Any, summary: dict[str, Any]) -> None:
        from addons import flows

        flow.metadata[flows.MASKED] = summary
        if summary["count"]:
            try:
                from addons.metrics import MASKED_VALUES

                target = flow.metadata.get(flows.TARGET)
                MASKED_VALUES.labels(target.protocol if target else "http").inc(summary["count"])
            except Exception:  # noqa: BLE001 - metrics never decide anything
                pass


def _query_flag(values: Sequence[str]) -> bool:
    """A Kubernetes boolean query parameter: present and not "0"/"false" means true."""
    return any(not (v == "0" or v.lower() == "false") for v in values)
