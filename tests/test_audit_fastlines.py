"""The assembled audit lines (`AuditLog.repeated_decision`, `AuditLog.outcome`, `LineTemplate`)
are byte for byte the canonical lines the generic path writes, so `audit verify` accepts them
and nothing about the schema changes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from addons import audit as audit_mod
from addons.audit import AuditLog, LineTemplate, canonical, verify_file
from addons.model import AuditUnavailable, Decision, Identity

T0 = 1_700_000_000.0
ALICE = Identity(sub="alice", iss="https://login.example/", groups=("agents", "ünï"), exp=T0)
ALLOW = Decision(effect="allow", rule="read", reason="reads are fine", rules=("read",))
OP = {"protocol": "postgres", "summary": "SELECT a FROM t WHERE id = $1",
      "sql": {"normalized": "SELECT a FROM t WHERE id = $1", "kinds": ["select"],
              "tables": ["public.t"], "statements": ["select"], "note": "é \u2028 \"q\" \\"}}

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=8), kids, max_size=4)),
    max_leaves=12)


def body_of(line: bytes) -> dict[str, Any]:
    rec = json.loads(line)
    rec.pop("hash")
    return rec


def assert_canonical(path: Path) -> None:
    for line in path.read_bytes().splitlines():
        rec = body_of(line)
        assert line.startswith(canonical(rec)[:-1] + b',"hash":"'), line
    assert verify_file(path).ok


def fixed_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = iter(range(1, 10_000))
    monkeypatch.setattr(audit_mod, "new_id", lambda: f"feedbeef{next(counter):012x}")


def test_repeated_decision_writes_what_decision_writes(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    lines = {}
    for name in ("generic", "repeated"):
        fixed_ids(monkeypatch)
        log = AuditLog(tmp_path / f"{name}.jsonl", clock=lambda: T0 + 0.5)
        for _ in range(3):
            kw = dict(protocol="postgres", target="db", client="127.0.0.1:5", identity=ALICE,
                      operation=OP, decision=ALLOW)
            if name == "generic":
                log.decision(**kw)  # type: ignore[arg-type]
            else:
                log.repeated_decision(**kw)  # type: ignore[arg-type]
        log.close()
        lines[name] = (tmp_path / f"{name}.jsonl").read_bytes()
    assert lines["generic"] == lines["repeated"]
    assert_canonical(tmp_path / "repeated.jsonl")


def test_a_changed_operation_gets_a_new_template(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl")
    log.repeated_decision(protocol="postgres", target="db", client="c", identity=ALICE,
                          operation=OP, decision=ALLOW)
    other = {**OP, "summary": "SELECT 2"}
    log.repeated_decision(protocol="postgres", target="db", client="c", identity=ALICE,
                          operation=other, decision=ALLOW)
    log.close()
    summaries = [json.loads(x)["operation"]["summary"]
                 for x in (tmp_path / "a.jsonl").read_bytes().splitlines()]
    assert summaries == ["SELECT a FROM t WHERE id = $1", "SELECT 2"]
    assert_canonical(tmp_path / "a.jsonl")


@settings(max_examples=150, deadline=None)
@given(outcome=st.dictionaries(st.text(max_size=8), json_values, max_size=5),
       masked=st.dictionaries(st.text(max_size=8), json_values, max_size=4),
       duration=st.one_of(st.none(), st.floats(0, 1e7, allow_nan=False)),
       decision_id=st.text(max_size=24))
def test_outcome_lines_are_canonical(tmp_path_factory: pytest.TempPathFactory,
                                     outcome: dict[str, Any], masked: dict[str, Any],
                                     duration: float | None, decision_id: str) -> None:
    path = tmp_path_factory.mktemp("o") / "a.jsonl"
    log = AuditLog(path)
    log.outcome(decision_id, outcome, masked, duration)
    log.outcome(decision_id, outcome, None, duration, defer=True)
    log.close()
    for line in path.read_bytes().splitlines():
        rec = body_of(line)
        assert line.startswith(canonical(rec)[:-1] + b',"hash":"'), line
        assert rec["decision_id"] == decision_id and rec["outcome"] == outcome


@settings(max_examples=150, deadline=None)
@given(record=st.dictionaries(st.sampled_from(
    ["approval", "client", "decision", "identity", "operation", "protocol", "reason", "rules",
     "target", "type", "zeta", "a"]), json_values, max_size=10))
def test_templates_agree_with_canonical_or_refuse(record: dict[str, Any]) -> None:
    tpl = LineTemplate.build(record)
    if tpl is None:
        return  # e.g. an integer only the standard library writes: the generic path is used
    c0, c1, c2, c3 = tpl.chunks
    probe = {**record, "id": "ab12", "prev_hash": "0" * 64, "time": "2026-01-01T00:00:00.000Z"}
    assert c0 + b"ab12" + c1 + b"0" * 64 + c2 + b"2026-01-01T00:00:00.000Z" + c3 == \
        canonical(probe)


def test_template_refuses_what_only_the_standard_library_writes() -> None:
    assert LineTemplate.build({"protocol": "postgres", "big": 2**70}) is None


def test_repeated_decision_on_a_closed_log_refuses(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl")
    log.close()
    with pytest.raises(AuditUnavailable):
        log.repeated_decision(protocol="postgres", target="db", client="c", identity=ALICE,
                              operation=OP, decision=ALLOW)
    with pytest.raises(AuditUnavailable):
        log.outcome("x", {"status": "ok"}, None, 1.0)
