"""ApprovalStore engine: plain data, injected clock."""

from __future__ import annotations

from pathlib import Path

import pytest

from addons.approvals import ApprovalConflict, ApprovalStore
from addons.model import Decision, Identity, Operation

AGENT = Identity("agent-1", "iss")
ALICE = Identity("alice", "iss", ("approvers",))
OP = Operation("http", "t", "DELETE /x", http={"method": "DELETE", "path": "/x"},
               fingerprint="http DELETE /x")
DECISION = Decision("review", "r", "needs a human", ("r",))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_decide_rules_and_grants(tmp_path: Path) -> None:
    clock = Clock()
    store = ApprovalStore(tmp_path / "a.json", clock=clock)
    a = store.create(AGENT, OP, OP.to_json(), DECISION)
    assert store.state_of(a.id) == "pending" and [x.id for x in store.list("pending")] == [a.id]
    with pytest.raises(ApprovalConflict, match="own request"):
        store.decide(a.id, AGENT, True)
    with pytest.raises(ApprovalConflict, match="grant_minutes"):
        store.decide(a.id, ALICE, True, grant_minutes=0)
    store.decide(a.id, ALICE, True, "ok", grant_minutes=30)
    with pytest.raises(ApprovalConflict, match="already approved"):
        store.decide(a.id, ALICE, False)
    assert store.granted(AGENT, OP.fingerprint)
    assert not store.granted(Identity("agent-2", "iss"), OP.fingerprint)
    assert not store.granted(AGENT, "http DELETE /y")
    assert not store.granted(AGENT, "")  # no fingerprint, no grant
    clock.now += 30 * 60 + 1
    assert not store.granted(AGENT, OP.fingerprint)


def test_expire_and_reload(tmp_path: Path) -> None:
    store = ApprovalStore(tmp_path / "a.json")
    a = store.create(AGENT, OP, OP.to_json(), DECISION)
    b = store.create(AGENT, OP, OP.to_json(), DECISION)
    assert store.expire(a.id) == "expired"
    store.decide(b.id, ALICE, False, "no")
    assert store.expire(b.id) == "denied"  # a decision before the timeout stands
    c = store.create(AGENT, OP, OP.to_json(), DECISION)
    again = ApprovalStore(tmp_path / "a.json")
    assert again.get(b.id).state == "denied" and again.get(b.id).decided_by == "alice"
    assert again.get(c.id).state == "expired"  # nobody waits for it after a restart
    assert (tmp_path / "a.json").stat().st_mode & 0o077 == 0
