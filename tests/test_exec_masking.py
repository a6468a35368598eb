"""Exec/attach output masking engine (`addons.exec_masking.mask_frame`) and the operation
record written to the audit log and the approvals store (`addons.audit.operation_record`)."""

from __future__ import annotations

import base64

import pytest

from addons.audit import operation_record
from addons.exec_masking import ExecOutputUnmaskable, mask_frame
from addons.masking import compile_mask
from addons.model import Operation
from addons.policy import MaskRule

CARD = "4111111111111111"
M = compile_mask(MaskRule(id="m", when={}, unless=None, json_paths=(), columns=(),
                          detectors=("credit_card", "email"), strategy="redact", file="t.yaml",
                          line=1))


@pytest.mark.parametrize("proto", ["v5.channel.k8s.io", "v4.channel.k8s.io"])
def test_stdout_and_stderr_are_masked_in_binary_frames(proto: str) -> None:
    for channel in (1, 2):
        frame = bytes([channel]) + f"card {CARD}\n".encode()
        out, result = mask_frame(frame, proto, [M], b"k")
        assert out == bytes([channel]) + b"card [MASKED:credit_card]\n"
        assert result is not None and result.count == 1 and result.rules == ("m",)


def test_base64_frames_are_decoded_masked_and_encoded_again() -> None:
    frame = b"1" + base64.b64encode(f"mail ada@example.com {CARD}".encode())
    out, result = mask_frame(frame, "v4.base64.channel.k8s.io", [M], b"k")
    assert out[:1] == b"1"
    assert base64.b64decode(out[1:]) == b"mail [MASKED:email] [MASKED:credit_card]"
    assert result is not None and result.count == 2


def test_other_channels_and_clean_output_pass_unchanged() -> None:
    for frame in (bytes([0]) + CARD.encode(), bytes([3]) + b'{"status":"Success"}',
                  bytes([1]) + b"app.log\n", bytes([1])):
        out, _ = mask_frame(frame, "v5.channel.k8s.io", [M], b"k")
        assert out == frame


def test_binary_output_or_a_bad_frame_cannot_be_masked() -> None:
    with pytest.raises(ExecOutputUnmaskable):
        mask_frame(bytes([1]) + b"\xff\xfe\x00tar", "v5.channel.k8s.io", [M], b"k")
    with pytest.raises(ExecOutputUnmaskable):
        mask_frame(b"", "v5.channel.k8s.io", [M], b"k")
    with pytest.raises(ExecOutputUnmaskable):
        mask_frame(b"1@@@", "v4.base64.channel.k8s.io", [M], b"k")


def test_operation_record_redacts_command_path_and_summary_without_touching_the_op() -> None:
    k8s = {"verb": "exec", "resource": "pods", "namespace": "a", "name": "web",
           "command": f"echo {CARD}"}
    http = {"method": "GET", "path": "/v1/users/ada@example.com"}
    op = Operation(protocol="kubernetes", target="k8s", summary=f"exec pods/web -- echo {CARD}",
                   http=http, kubernetes=k8s)
    rec = operation_record(op)
    assert rec["kubernetes"]["command"] == "echo [MASKED:credit_card]"
    assert rec["http"]["path"] == "/v1/users/[MASKED:email]"
    assert CARD not in rec["summary"]
    assert op.kubernetes["command"] == f"echo {CARD}"  # the policy still sees the real argv
    assert op.http["path"] == "/v1/users/ada@example.com"
