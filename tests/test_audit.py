"""Audit engine (`addons.audit`): the record schema, the hash chain, tamper detection naming the
first bad line, the refuse-on-failure contract, and the `audit verify` command's exit codes."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from addons import audit as audit_mod
from addons import auditcli
from addons.audit import GENESIS, AuditLog, canonical, record_hash, verify_file
from addons.model import AuditUnavailable, Decision, Identity

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
ALICE = Identity(sub="alice", iss="https://login.example/", groups=("agents",), exp=T0 + 60)
ALLOW = Decision(effect="allow", rule="read", reason="reads are fine", rules=("read",))


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        self.t += 0.25
        return self.t


def op(summary: str = "GET api:443/v1/users") -> dict[str, Any]:
    return {"protocol": "http", "summary": summary,
            "http": {"method": "GET", "path": "/v1/users"}}


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def write_sample(path: Path, decisions: int = 4) -> list[dict[str, Any]]:
    log = AuditLog(path, clock=Clock())
    for i in range(decisions):
        rid = log.decision(protocol="http", target="api", client="127.0.0.1:5000",
                           identity=ALICE, operation=op(f"GET api:443/v1/users/{i}"),
                           decision=ALLOW)
        log.outcome(rid, {"status": 200}, {"count": 1, "rules": ["mask-email"]}, 12.34567)
    log.close()
    return lines(path)


# --- records ----------------------------------------------------------------------------------


def test_decision_record_schema(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl", clock=Clock())
    rid = log.decision(protocol="http", target="api", client="127.0.0.1:5000", identity=ALICE,
                       operation=op(), decision=ALLOW, record_id="req-1")
    assert rid == "req-1"
    [rec] = lines(tmp_path / "a.jsonl")
    assert rec == {
        "id": "req-1", "type": "decision", "time": "2023-11-14T22:13:20.250Z",
        "protocol": "http", "target": "api", "client": "127.0.0.1:5000",
        "identity": {"sub": "alice", "iss": "https://login.example/", "groups": ["agents"]},
        "operation": op(), "decision": "allow", "rules": ["read"], "reason": "reads are fine",
        "approval": None, "prev_hash": GENESIS, "hash": rec["hash"],
    }
    assert rec["hash"] == hashlib.sha256(
        canonical({k: v for k, v in rec.items() if k != "hash"})).hexdigest()


def test_refusal_before_policy_overrides_effect(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl", clock=Clock())
    log.decision(protocol="http", target=None, client=None, identity=None, operation=op(),
                 decision=None, effect="deny", rules=["unauthenticated"], reason="token expired")
    [rec] = lines(tmp_path / "a.jsonl")
    assert (rec["decision"], rec["rules"], rec["reason"], rec["identity"]) == (
        "deny", ["unauthenticated"], "token expired", None)


def test_outcome_record_refers_to_decision(tmp_path: Path) -> None:
    recs = write_sample(tmp_path / "a.jsonl", decisions=1)
    decision, outcome = recs
    assert outcome["type"] == "outcome" and outcome["decision_id"] == decision["id"]
    assert outcome["outcome"] == {"status": 200}
    assert outcome["masked"] == {"count": 1, "rules": ["mask-email"]}
    assert outcome["duration_ms"] == 12.346
    assert outcome["prev_hash"] == decision["hash"]
    assert outcome["time"] > decision["time"]


def test_outcome_defaults(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl", clock=Clock())
    log.outcome("x", {"error": "connection refused"}, None, None)
    [rec] = lines(tmp_path / "a.jsonl")
    assert rec["masked"] == {"count": 0, "rules": []} and rec["duration_ms"] is None


def test_each_line_is_on_disk_when_write_returns(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    log = AuditLog(path, clock=Clock())
    for i in range(3):
        log.decision(protocol="http", target="api", client=None, identity=ALICE,
                     operation=op(), decision=ALLOW)
        # read through a separate file object: no buffering inside the process
        assert len(path.read_text().splitlines()) == i + 1


def test_fsync_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    monkeypatch.setattr(audit_mod.os, "fsync", lambda fd: synced.append(fd))
    AuditLog(tmp_path / "a.jsonl", clock=Clock()).decision(
        protocol="http", target="api", client=None, identity=None, operation=op(),
        decision=ALLOW)
    assert synced == []
    AuditLog(tmp_path / "b.jsonl", clock=Clock(), fsync=True).decision(
        protocol="http", target="api", client=None, identity=None, operation=op(),
        decision=ALLOW)
    assert len(synced) == 1


def test_file_is_private(tmp_path: Path) -> None:
    AuditLog(tmp_path / "sub" / "a.jsonl").close()
    assert (tmp_path / "sub" / "a.jsonl").stat().st_mode & 0o077 == 0


# --- the chain --------------------------------------------------------------------------------


def test_chain_links_every_line(tmp_path: Path) -> None:
    recs = write_sample(tmp_path / "a.jsonl")
    prev = GENESIS
    for rec in recs:
        assert rec["prev_hash"] == prev and rec["hash"] == record_hash(rec)
        prev = rec["hash"]
    assert verify_file(tmp_path / "a.jsonl").ok


def test_reopen_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    first = write_sample(path, decisions=2)
    second = write_sample(path, decisions=2)[len(first):]
    assert second[0]["prev_hash"] == first[-1]["hash"]
    result = verify_file(path)
    assert result.ok and result.records == 8


def test_concurrent_writers_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    log = AuditLog(path)

    def work() -> None:
        for _ in range(50):
            rid = log.decision(protocol="http", target="api", client=None, identity=ALICE,
                               operation=op(), decision=ALLOW)
            log.outcome(rid, {"status": 200}, None, 1.0)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result = verify_file(path)
    assert result.ok and result.records == 600


# --- tampering: verify names the first bad line -------------------------------------------


def _write(path: Path, recs: list[Any]) -> None:
    path.write_text("".join((r if isinstance(r, str) else canonical(r).decode()) + "\n"
                            for r in recs))


def test_verify_good(tmp_path: Path) -> None:
    write_sample(tmp_path / "a.jsonl")
    result = verify_file(tmp_path / "a.jsonl")
    assert (result.ok, result.records, result.bad_line) == (True, 8, None)


def test_verify_edited_line(tmp_path: Path) -> None:
    recs = write_sample(tmp_path / "a.jsonl")
    recs[2]["decision"] = "deny"
    _write(tmp_path / "a.jsonl", recs)
    result = verify_file(tmp_path / "a.jsonl")
    assert (result.ok, result.bad_line, result.records) == (False, 3, 2)
    assert "edited" in result.message


def test_verify_edited_line_with_recomputed_hash(tmp_path: Path) -> None:
    recs = write_sample(tmp_path / "a.jsonl")
    recs[2]["identity"]["sub"] = "mallory"
    recs[2]["hash"] = record_hash(recs[2])
    _write(tmp_path / "a.jsonl", recs)
    result = verify_file(tmp_path / "a.jsonl")
    assert (result.ok, result.bad_line) == (False, 4)  # the next line no longer links


def test_verify_deleted_line(tmp_path: Path) -> None:
    recs = write_sample(tmp_path / "a.jsonl")
    del recs[4]
    _write(tmp_path / "a.jsonl", recs)
    result = verify_file(tmp_path / "a.jsonl")
    assert (result.ok, result.bad_line) == (False, 5)
    assert "deleted" in result.message


def test_verify_deleted_first_line(tmp_path: Path) -> None:
    recs = write_sample(tmp_path / "a.jsonl")
    _write(tmp_path / "a.jsonl", recs[1:])
    assert verify_file(tmp_path / "a.jsonl").bad_line == 1


def test_verify_reordered_lines(tmp_path: Path) -> None:
    recs = write_sample(tmp_path / "a.jsonl")
    recs[3], recs[4] = recs[4], recs[3]
    _write(tmp_path / "a.jsonl", recs)
    result = verify_file(tmp_path / "a.jsonl")
    assert (result.ok, result.bad_line) == (False, 4)
    assert "reordered" in result.message


def test_verify_inserted_line(tmp_path: Path) -> None:
    recs = write_sample(tmp_path / "a.jsonl")
    forged = dict(recs[2], id="forged")
    _write(tmp_path / "a.jsonl", recs[:3] + [forged] + recs[3:])
    assert verify_file(tmp_path / "a.jsonl").bad_line == 4


def test_verify_outcome_without_decision(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl", clock=Clock())
    log.outcome("no-such-decision", {"status": 200}, None, 1.0)
    result = verify_file(tmp_path / "a.jsonl")
    assert (result.ok, result.bad_line) == (False, 1)


@pytest.mark.parametrize("junk, why", [("", "empty line"), ("{not json", "not valid JSON"),
                                       ('{"id": "x"}', "missing hash fields")])
def test_verify_junk_line(tmp_path: Path, junk: str, why: str) -> None:
    recs = write_sample(tmp_path / "a.jsonl", decisions=1)
    _write(tmp_path / "a.jsonl", [recs[0], junk, recs[1]])
    result = verify_file(tmp_path / "a.jsonl")
    assert (result.ok, result.bad_line, result.message) == (False, 2, why)


def test_verify_missing_file(tmp_path: Path) -> None:
    result = verify_file(tmp_path / "absent.jsonl")
    assert not result.ok and "cannot read" in result.message


def test_reopen_after_broken_tail_is_still_detected(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    write_sample(path, decisions=1)
    with path.open("a") as fh:
        fh.write("{garbage\n")
    log = AuditLog(path, clock=Clock())  # the gateway restarts on a damaged log
    log.decision(protocol="http", target="api", client=None, identity=None, operation=op(),
                 decision=ALLOW)
    log.close()
    result = verify_file(path)
    assert (result.ok, result.bad_line) == (False, 3)


# --- failure means refusal ------------------------------------------------------------------


def test_write_failure_raises_audit_unavailable(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl", clock=Clock())
    log.decision(protocol="http", target="api", client=None, identity=None, operation=op(),
                 decision=ALLOW)
    before = log.prev_hash
    log.close()
    with pytest.raises(AuditUnavailable) as exc:
        log.decision(protocol="http", target="api", client=None, identity=None,
                     operation=op(), decision=ALLOW)
    assert exc.value.status == 503 and exc.value.error == "audit_unavailable"
    assert log.prev_hash == before


def test_full_disk_raises_audit_unavailable() -> None:
    if not Path("/dev/full").exists():
        pytest.fail("/dev/full is needed to simulate a full disk")
    log = AuditLog("/dev/full", clock=Clock())
    with pytest.raises(AuditUnavailable) as exc:
        log.decision(protocol="http", target="api", client=None, identity=None,
                     operation=op(), decision=ALLOW)
    assert "OSError" in exc.value.reason
    assert log.prev_hash == GENESIS
    log.close()


def test_unserialisable_record_raises_audit_unavailable(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl", clock=Clock())
    with pytest.raises(AuditUnavailable):
        log.decision(protocol="http", target="api", client=None, identity=None,
                     operation={"summary": object()}, decision=ALLOW)
    assert (tmp_path / "a.jsonl").read_text() == ""


# --- the `audit verify` command -------------------------------------------------------------


def test_cli_verify_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "a.jsonl"
    recs = write_sample(path)
    assert auditcli.verify(path) == 0
    assert "OK (8 records" in capsys.readouterr().out
    recs[5]["outcome"] = {"status": 500}
    _write(path, recs)
    assert auditcli.verify(path) == 1
    out = capsys.readouterr().out
    assert "BROKEN at line 6" in out and "5 records verified" in out


# --- deferred outcome lines, canonical spellings, ids, time --------------------------------


def test_deferred_outcome_is_chained_now_and_written_with_the_next_decision(
        tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, clock=Clock())
    d1 = log.decision(protocol="postgres", target="db", client="c", identity=ALICE,
                      operation=op(), decision=ALLOW)
    log.outcome(d1, {"status": "ok", "rows": 1}, None, 0.5, defer=True)
    assert log.pending == 1
    assert len(lines(path)) == 1, "a deferred outcome is not on disk yet"
    log.decision(protocol="postgres", target="db", client="c", identity=ALICE,
                 operation=op(), decision=ALLOW)
    recs = lines(path)
    assert [r["type"] for r in recs] == ["decision", "outcome", "decision"]
    assert log.pending == 0
    assert recs[1]["decision_id"] == d1
    assert verify_file(path).ok


def test_flush_writes_deferred_lines_and_close_does_too(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, clock=Clock())
    d1 = log.decision(protocol="postgres", target="db", client="c", identity=ALICE,
                      operation=op(), decision=ALLOW)
    log.outcome(d1, {"status": "ok"}, None, 0.1, defer=True)
    log.flush()
    assert [r["type"] for r in lines(path)] == ["decision", "outcome"]
    log.outcome(d1, {"status": "ok"}, None, 0.1, defer=True)
    log.close()
    assert len(lines(path)) == 3 and verify_file(path).ok


def test_failed_flush_keeps_lines_pending_so_the_chain_never_skips(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, clock=Clock())
    d1 = log.decision(protocol="postgres", target="db", client="c", identity=ALICE,
                      operation=op(), decision=ALLOW)
    log.outcome(d1, {"status": "ok"}, None, 0.1, defer=True)
    real = log._fh

    class Broken:
        def write(self, data: bytes) -> int:
            raise OSError(28, "No space left on device")

    log._fh = Broken()
    with pytest.raises(AuditUnavailable):
        log.flush()
    with pytest.raises(AuditUnavailable):
        log.decision(protocol="postgres", target="db", client="c", identity=ALICE,
                     operation=op(), decision=ALLOW)
    assert log.pending == 1
    log._fh = real
    log.decision(protocol="postgres", target="db", client="c", identity=ALICE,
                 operation=op(), decision=ALLOW)
    assert [r["type"] for r in lines(path)] == ["decision", "outcome", "decision"]
    assert verify_file(path).ok


def test_canonical_form_matches_the_standard_library_and_verify_accepts_both(
        tmp_path: Path) -> None:
    rec = {"b": [1, {"z": None, "a": True}], "a": "é\u2028\x00\"\\", "n": 2**63 - 1,
           "f": 0.001, "big": 2**70}
    assert canonical(rec) == json.dumps(rec, sort_keys=True, separators=(",", ":"),
                                        ensure_ascii=False).encode()
    # A line hashed over the standard library's spelling of a small float (1e-05) verifies.
    body = {"id": "x", "type": "decision", "duration_ms": 0.00001, "prev_hash": GENESIS}
    std = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    body["hash"] = hashlib.sha256(std.encode()).hexdigest()
    path = tmp_path / "old.jsonl"
    path.write_text(json.dumps(body) + "\n")
    assert verify_file(path).ok
    body["duration_ms"] = 0.00002  # edited: neither spelling matches
    path.write_text(json.dumps(body) + "\n")
    assert not verify_file(path).ok


def test_ids_are_unique_and_times_match_isoformat() -> None:
    from datetime import UTC, datetime

    ids = {audit_mod.new_id() for _ in range(10_000)}
    assert len(ids) == 10_000 and all(len(i) == 20 for i in ids)
    for ts in (0.0, 1_700_000_000.0005, 1_700_000_000.999, 1_700_000_001.0, 2e9 + 0.123456):
        want = datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
        assert audit_mod._iso(ts) == want.replace("+00:00", "Z")


def test_verify_rejects_a_record_without_an_id(tmp_path: Path) -> None:
    """Even with a valid chain: an id-less decision would let an outcome without a
    decision_id pass as referring to a known decision."""
    path = tmp_path / "audit.jsonl"
    prev = GENESIS
    out = []
    for body in ({"type": "decision", "decision": "allow"},
                 {"type": "outcome", "outcome": {"status": 200}}):
        rec = {**body, "prev_hash": prev}
        rec["hash"] = record_hash(rec)
        prev = rec["hash"]
        out.append(json.dumps(rec))
    path.write_text("\n".join(out) + "\n")
    res = verify_file(path)
    assert not res.ok and res.bad_line == 1 and "without an id" in res.message


def test_detector_hits_in_a_refusal_reason_are_redacted(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, clock=Clock())
    log.decision(protocol="kubernetes", target="k8s", client="c", identity=ALICE,
                 operation=op(), decision=None, effect="deny", rules=["bad_request"],
                 reason="unparseable fieldSelector 'metadata.name=ada@example.com'")
    rec = lines(path)[-1]
    assert rec["reason"] == "unparseable fieldSelector 'metadata.name=[MASKED:email]'"
    assert "ada@example.com" not in path.read_text()
