"""Masking of Kubernetes exec/attach output (stdout and stderr of the WebSocket channels).

Engine: `mask_frame()` is a pure function over one WebSocket message: it splits the channel
frame (`kubernetes.decode_channel_frame`), runs the detectors of the masks that apply with
their strategies (`masking.mask_text`) over stdout/stderr, and re-encodes the frame in the same
sub-protocol. Other channels (stdin, error, resize, close) pass unchanged.

Adapter: `ExecOutputMasking.websocket_message` applies it to every server-to-client message of
an exec/attach call whose operation a mask with `detectors:` matches (`when:` as for any
mask; json_paths and columns do not apply to a terminal). It fails closed: output that cannot
be masked (not UTF-8 text, a malformed frame, an error in the engine) is dropped and the
session is ended, never passed on.

Limits: detection is per message. A value split across two WebSocket messages is not
recognised (kubectl and the API server send a command's short output in one message; long
output is chunked at arbitrary byte boundaries).
"""

from __future__ import annotations

import logging
from typing import Any

from addons import masking
from addons.kubernetes import decode_channel_frame, encode_channel_frame

log = logging.getLogger("portcullis.masking")
OUTPUT_CHANNELS = (1, 2)  # stdout, stderr
_PLAN = "portcullis.exec_masks"


class ExecOutputUnmaskable(ValueError):
    """The message cannot be masked (binary output or a malformed frame)."""


def mask_frame(content: bytes, protocol: str, masks: list[Any], key: bytes
               ) -> tuple[bytes, masking.MaskResult | None]:
    """(new content, result) for one server-to-client exec/attach message; result is None
    when the channel is not an output channel. Raises ExecOutputUnmaskable."""
    try:
        channel, payload = decode_channel_frame(content, protocol)
    except ValueError as e:
        raise ExecOutputUnmaskable(f"malformed channel frame: {e}") from e
    if channel not in OUTPUT_CHANNELS or not payload:
        return content, None
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ExecOutputUnmaskable("binary output cannot be masked") from e
    result = masking.mask_text(text, masks, key)
    if not result.count:
        return content, result
    return encode_channel_frame(channel, result.value.encode("utf-8"), protocol), result


class ExecOutputMasking:
    """mitmproxy addon (after `masking_http.Masking`, before audit and recorder)."""

    def __init__(self, runtime: Any = None, *, key: bytes | None = None) -> None:
        self.key = key if key is not None else getattr(runtime, "mask_key", b"") or b""

    def _masks(self, flow: Any) -> list[Any]:
        plan = flow.metadata.get(_PLAN)
        if plan is None:
            plan = flow.metadata[_PLAN] = self._plan(flow)
        return plan

    @staticmethod
    def _plan(flow: Any) -> list[Any]:
        from addons import flows
        from addons.policy import matching_masks

        target = flow.metadata.get(flows.TARGET)
        policy = flow.metadata.get(flows.POLICY)
        if target is None or target.protocol != "kubernetes" or policy is None:
            return []
        ops = [op for op in flow.metadata.get(flows.OPERATIONS) or []
               if (op.kubernetes or {}).get("subresource") in ("exec", "attach")]
        rules: dict[str, Any] = {}
        for op in ops:
            for m in matching_masks(policy, flow.metadata.get(flows.IDENTITY), op):
                if m.detectors:
                    rules.setdefault(m.id, m)
        return [policy.compiled_masks.get(i) or masking.compile_mask(m)
                for i, m in rules.items()]

    def websocket_message(self, flow: Any) -> None:
        from addons import flows

        msg = flow.websocket.messages[-1] if flow.websocket else None
        if msg is None or msg.from_client:
            return
        try:
            masks = self._masks(flow)
            if not masks:
                return
            proto = flow.response.headers.get("Sec-WebSocket-Protocol", "")
            content, result = mask_frame(msg.content, proto, masks, self.key)
        except Exception as e:  # noqa: BLE001 - fail closed: never pass unmasked output
            reason = str(e) if isinstance(e, ExecOutputUnmaskable) else type(e).__name__
            log.error("exec output of %s withheld and the session ended: %s",
                      flows.request_id(flow), reason)
            msg.drop()
            flow.kill()
            return
        if result is None or not result.count:
            return
        msg.content = content
        seen = flow.metadata.get(flows.MASKED) or {"count": 0, "rules": [], "paths": []}
        rules = list(dict.fromkeys([*seen["rules"], *result.rules]))
        flow.metadata[flows.MASKED] = {"count": seen["count"] + result.count, "rules": rules,
                                       "paths": ["exec output"]}
