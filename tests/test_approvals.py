"""ApprovalStore engine: plain data, injected clock."""

from __future__ import annotations

from pathlib import Path

import pytest

from addons.approvals import ApprovalConflict, ApprovalStore
from addons.model import Decision, Identity, Operation, OperationDecision

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


def test_token_expiring_during_the_hold_is_refused(tmp_path: Path) -> None:
    import asyncio
    import json
    import time as _time

    from mitmproxy.test import tflow

    from addons import flows
    from addons.approvals import ApprovalsAddon
    from addons.model import ApprovalRequired

    store = ApprovalStore(tmp_path / "a.json")
    addon = ApprovalsAddon(store, timeout=5, webhook_url=None)
    f = tflow.tflow()
    short = Identity("agent-1", "iss", (), exp=_time.time() + 0.3)
    f.metadata[flows.IDENTITY] = short
    f.metadata[flows.OPERATIONS] = [OP]
    f.metadata[flows.DECISION] = Decision("review", "r", "needs a human", ("r",),
                                          (OperationDecision(OP, "review", ()),))
    flows.refuse(f, ApprovalRequired("needs a human"))

    async def approve_later() -> None:
        while not store.list("pending"):
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # the token expires meanwhile
        store.decide(store.list("pending")[0].id, ALICE, True)

    async def main() -> None:
        await asyncio.gather(addon.request(f), approve_later())

    asyncio.run(main())
    assert f.response is not None and f.response.status_code == 401
    assert json.loads(f.response.content)["error"] == "unauthenticated"
