"""Approvals (SPEC §6): a `review` decision holds the request until a human decides.

Engine: `ApprovalStore` is plain data behind a lock (no mitmproxy, no asyncio): `create()` a
pending approval, `decide()` it as an approver (never the requester), `state_of()` to poll, and
`granted()` to let the same identity repeat the same operation (same fingerprint) for
`grant_minutes` without review. The store is persisted to `state_dir/approvals.json` so pending
approvals survive a listing from another process's point of view and restarts keep history.

Adapters (HTTP in `ApprovalsAddon`, Postgres in proxy_db) hold the request by polling the
store with their own event loop; a timeout expires the approval and refuses the request.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from addons.model import Decision, Identity, Operation, PortcullisError

log = logging.getLogger("portcullis.approvals")
POLL_SECONDS = 0.1


class ApprovalError(PortcullisError):
    status = 403
    sqlstate = "42501"
    error = "approval_denied"


class ApprovalTimeout(PortcullisError):
    status = 403
    sqlstate = "42501"
    error = "approval_timeout"


class ApprovalConflict(ValueError):
    """Deciding an approval that is not pending, unknown, or one's own."""


@dataclass
class Approval:
    id: str
    state: str  # pending | approved | denied | expired
    created: float
    identity: dict[str, Any]
    target: str
    operation: dict[str, Any]
    rules: list[str]
    fingerprint: str
    reason: str | None = None  # the rule's reason, shown to approvers
    decided_by: str | None = None
    decision_reason: str | None = None
    grant_minutes: int | None = None
    decided: float | None = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("fingerprint")
        return out


@dataclass
class ApprovalStore:
    path: Path | None = None
    clock: Callable[[], float] = time.time
    approvals: dict[str, Approval] = field(default_factory=dict)
    grants: dict[tuple[str, str, str], float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if self.path is not None and self.path.exists():
            try:
                doc = json.loads(self.path.read_text())
                for raw in doc.get("approvals", []):
                    a = Approval(**raw)
                    if a.state == "pending":  # nobody is waiting for it any more
                        a.state = "expired"
                    self.approvals[a.id] = a
                for g in doc.get("grants", []):
                    self.grants[(g["sub"], g["iss"], g["fingerprint"])] = g["until"]
            except (OSError, ValueError, TypeError, KeyError) as e:
                log.error("approvals store %s unreadable, starting empty: %s", self.path, e)

    def _save(self) -> None:
        if self.path is None:
            return
        doc = {"approvals": [asdict(a) for a in self.approvals.values()],
               "grants": [{"sub": k[0], "iss": k[1], "fingerprint": k[2], "until": v}
                          for k, v in self.grants.items() if v > self.clock()]}
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh)
        tmp.replace(self.path)

    def granted(self, identity: Identity, fingerprint: str) -> bool:
        if not fingerprint:
            return False  # an operation without a fingerprint can never reuse a grant
        until = self.grants.get((identity.sub, identity.iss, fingerprint))
        return until is not None and until > self.clock()

    def create(self, identity: Identity, op: Operation, operation_record: dict[str, Any],
               decision: Decision) -> Approval:
        a = Approval(id=uuid.uuid4().hex[:12], state="pending", created=self.clock(),
                     identity=identity.to_json(), target=op.target,
                     operation=operation_record, rules=list(decision.rules),
                     fingerprint=op.fingerprint, reason=decision.reason)
        with self.lock:
            self.approvals[a.id] = a
            self._save()
        return a

    def list(self, state: str | None = None) -> list[Approval]:
        with self.lock:
            return [a for a in self.approvals.values() if state is None or a.state == state]

    def state_of(self, approval_id: str) -> str:
        with self.lock:
            return self.approvals[approval_id].state

    def get(self, approval_id: str) -> Approval:
        with self.lock:
            return self.approvals[approval_id]

    def decide(self, approval_id: str, approver: Identity, approve: bool,
               reason: str | None = None, grant_minutes: int | None = None) -> Approval:
        with self.lock:
            a = self.approvals.get(approval_id)
            if a is None:
                raise ApprovalConflict("no such approval")
            if a.state != "pending":
                raise ApprovalConflict(f"approval is already {a.state}")
            if a.identity.get("sub") == approver.sub and a.identity.get("iss") == approver.iss:
                raise ApprovalConflict("a requester cannot decide its own request")
            if grant_minutes is not None and (not isinstance(grant_minutes, int)
                                              or isinstance(grant_minutes, bool)
                                              or not 0 < grant_minutes <= 24 * 60):
                raise ApprovalConflict("grant_minutes must be an integer from 1 to 1440")
            a.state = "approved" if approve else "denied"
            a.decided_by = approver.sub
            a.decision_reason = reason
            a.decided = self.clock()
            if approve and grant_minutes:
                a.grant_minutes = grant_minutes
                key = (a.identity["sub"], a.identity["iss"], a.fingerprint)
                self.grants[key] = self.clock() + grant_minutes * 60
            self._save()
            return a

    def expire(self, approval_id: str) -> str:
        """Time out a pending approval; returns the final state (it may have been decided)."""
        with self.lock:
            a = self.approvals[approval_id]
            if a.state == "pending":
                a.state = "expired"
                a.decided = self.clock()
                self._save()
            return a.state


def notify_webhook(url: str, approval: Approval) -> None:
    """POST the new pending approval (best effort, in a thread; never blocks a request)."""
    import urllib.request

    def post() -> None:
        try:
            body = json.dumps({"event": "approval.pending", "approval": approval.to_json()})
            req = urllib.request.Request(url, data=body.encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
            urllib.request.urlopen(req, timeout=5).close()  # noqa: S310 - configured URL
        except Exception as e:  # noqa: BLE001
            log.warning("approval webhook failed: %s", type(e).__name__)

    threading.Thread(target=post, daemon=True).start()


# ---------------------------------------------------------------------------------------------
# mitmproxy adapter


class ApprovalsAddon:
    """Holds `review` decisions until approved (then the request proceeds), denied or timed
    out (403). A grant lets the same identity repeat the same operation without review."""

    def __init__(self, store: ApprovalStore, timeout: float, webhook_url: str | None) -> None:
        self.store = store
        self.timeout = timeout
        self.webhook_url = webhook_url

    async def request(self, flow) -> None:  # noqa: ANN001
        import asyncio

        from addons import flows

        decision = flow.metadata.get(flows.DECISION)
        refused = flow.metadata.get(flows.REFUSED)
        if decision is None or decision.effect != "review" or refused is None:
            return
        if refused.error != "approval_required":
            return
        with flows.guard(flow):
            identity = flow.metadata[flows.IDENTITY]
            ops = flow.metadata[flows.OPERATIONS]
            review_ops = [d.operation for d in decision.operations if d.effect == "review"]
            if all(self.store.granted(identity, op.fingerprint) for op in review_ops):
                self._proceed(flow, None)
                return
            op = review_ops[0] if review_ops else ops[0]
            from addons.audit import operation_record

            approval = self.store.create(identity, op, operation_record(op), decision)
            flow.metadata[flows.APPROVAL] = approval.id
            if self.webhook_url:
                notify_webhook(self.webhook_url, approval)
            flows.log.info("request %s held for approval %s", flows.request_id(flow), approval.id)
            deadline = time.monotonic() + self.timeout
            state = "pending"
            while state == "pending" and time.monotonic() < deadline:
                await asyncio.sleep(POLL_SECONDS)
                state = self.store.state_of(approval.id)
            if state == "pending":
                state = self.store.expire(approval.id)
            if state == "approved":
                from addons.identity import still_valid
                from addons.model import AuthError

                if not still_valid(identity):
                    # Continuous verification: the hold may outlast the token.
                    raise AuthError("token expired while the request waited for approval",
                                    approval_id=approval.id)
                self._proceed(flow, approval.id)
                return
            a = self.store.get(approval.id)
            if state == "denied":
                raise ApprovalError(a.decision_reason or "the reviewer denied this request",
                                    approval_id=approval.id)
            raise ApprovalTimeout("no reviewer decided in time", approval_id=approval.id)

    def _proceed(self, flow, approval_id: str | None) -> None:  # noqa: ANN001
        from addons import flows

        flow.response = None
        flow.metadata.pop(flows.REFUSED, None)
        flow.metadata[flows.APPROVED] = approval_id or "grant"
