"""AuditAddon on mitmproxy test flows: an answer whose outcome cannot be audited is withheld."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mitmproxy.test import tflow

from addons import flows
from addons.audit import AuditAddon, AuditLog
from addons.model import AuditUnavailable


class OutcomeFails(AuditLog):
    def outcome(self, *args: Any, **kw: Any) -> str:
        raise AuditUnavailable("disk full")


def test_unaudited_answer_is_withheld(tmp_path: Path) -> None:
    addon = AuditAddon(OutcomeFails(tmp_path / "a.jsonl"))
    f = tflow.tflow(resp=True)
    f.metadata[flows.AUDIT_ID] = "decision-1"
    addon.response(f)
    assert f.response is not None and f.response.status_code == 503
    assert json.loads(f.response.content)["error"] == "audit_unavailable"


def test_audited_answer_passes(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl")
    addon = AuditAddon(log)
    f = tflow.tflow(resp=True)
    f.metadata[flows.AUDIT_ID] = "decision-1"
    addon.response(f)
    assert f.response is not None and f.response.status_code == 200
    line = json.loads((tmp_path / "a.jsonl").read_text().splitlines()[-1])
    assert line["type"] == "outcome" and line["decision_id"] == "decision-1"
