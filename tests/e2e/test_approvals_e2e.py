"""Approvals end to end (SPEC §6): a review decision holds the request until a reviewer
approves it (it then proceeds), denies it or lets it time out (403); a requester cannot approve
its own request; a grant lets the same identity repeat the same operation without review."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import pytest

from tests.conftest import UPSTREAM_TOKEN, free_port, http_target
from tests.fixtures.gateway import ROOT

POLICY = """
rules:
  - id: read
    effect: allow
    when: {http: {methods: [GET]}}
  - id: delete-needs-review
    effect: review
    reason: deleting a user needs a human
    when: {http: {methods: [DELETE], paths: ["/v1/users/*"]}}
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, oidc: Any, echo_upstream: Any,
        test_ca: Any) -> Any:
    from tests.fixtures.gateway import Gateway

    admin = f"127.0.0.1:{free_port()}"
    cfg = {"identity": {"issuers": [oidc.config()]}, "listen": {"admin": admin},
           "approvals": {"timeout_seconds": 4, "approver_groups": ["approvers"]},
           "targets": [http_target("echo", echo_upstream, test_ca)]}
    gw = Gateway(tmp_path_factory.mktemp("approvals"), cfg, env={"UPSTREAM_TOKEN": UPSTREAM_TOKEN},
                 policies={"p.yaml": POLICY})
    gw.start()
    yield gw, f"http://{admin}"
    gw.stop()


def agent_call(gw: Any, token: str, url: str, out: dict[str, Any]) -> threading.Thread:
    def run() -> None:
        ctx = ssl.create_default_context(cafile=str(gw.ca))
        with httpx.Client(proxy=gw.proxy_with_token(token), verify=ctx, timeout=30) as c:
            r = c.delete(url)
            out["status"], out["body"] = r.status_code, r.json()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def pending(admin: str, token: str, deadline: float = 10) -> list[dict[str, Any]]:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        r = httpx.get(f"{admin}/v1/approvals?state=pending",
                      headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert r.status_code == 200, r.text
        if r.json()["approvals"]:
            return r.json()["approvals"]
        time.sleep(0.1)
    return []


def cli(gw: Any, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "addons.cli", "approvals", *args, "--config",
                           str(gw.config_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=30, env={**os.environ, "PORTCULLIS_TOKEN": token})


def test_approved_request_proceeds(env: Any, oidc: Any, echo_upstream: Any) -> None:
    gw, admin = env
    agent = oidc.token(sub="agent-a", groups=["agents"])
    reviewer = oidc.token(sub="alice", groups=["approvers"])
    url = f"https://localhost:{echo_upstream.port}/v1/users/41"
    out: dict[str, Any] = {}
    t = agent_call(gw, agent, url, out)
    items = pending(admin, reviewer)
    assert len(items) == 1 and items[0]["identity"]["sub"] == "agent-a"
    assert items[0]["rules"] == ["delete-needs-review"] and items[0]["target"] == "echo"
    assert not any(r["path"] == "/v1/users/41" for r in echo_upstream.requests)  # held
    # an agent that is not a reviewer cannot decide anything
    r = httpx.post(f"{admin}/v1/approvals/{items[0]['id']}/approve",
                   headers={"Authorization": f"Bearer {agent}"}, timeout=10)
    assert r.status_code == 403
    listed = cli(gw, reviewer, "list")
    assert listed.returncode == 0 and items[0]["id"] in listed.stdout
    res = cli(gw, reviewer, "approve", items[0]["id"], "--reason", "ticket 42")
    assert res.returncode == 0, res.stderr
    t.join(20)
    assert out["status"] == 200
    assert any(r["path"] == "/v1/users/41" for r in echo_upstream.requests)
    recs = [json.loads(x) for x in gw.audit_text().splitlines()]
    rec = [x for x in recs if x.get("operation", {}).get("summary") == "DELETE /v1/users/41"][-1]
    assert rec["decision"] == "review"
    assert rec["approval"] == {"id": items[0]["id"], "state": "approved"}


def test_denied_and_timed_out(env: Any, oidc: Any, echo_upstream: Any) -> None:
    gw, admin = env
    agent = oidc.token(sub="agent-b", groups=["agents"])
    reviewer = oidc.token(sub="alice", groups=["approvers"])
    url = f"https://localhost:{echo_upstream.port}/v1/users/42"
    out: dict[str, Any] = {}
    t = agent_call(gw, agent, url, out)
    items = pending(admin, reviewer)
    r = httpx.post(f"{admin}/v1/approvals/{items[0]['id']}/deny", json={"reason": "no way"},
                   headers={"Authorization": f"Bearer {reviewer}"}, timeout=10)
    assert r.status_code == 200 and r.json()["state"] == "denied"
    t.join(20)
    assert out["status"] == 403
    assert out["body"]["error"] == "approval_denied"
    assert out["body"]["approval_id"] == items[0]["id"]
    # nobody decides: the approval expires
    out2: dict[str, Any] = {}
    t = agent_call(gw, agent, url, out2)
    t.join(20)
    assert out2["status"] == 403 and out2["body"]["error"] == "approval_timeout"
    assert not any(r["path"] == "/v1/users/42" for r in echo_upstream.requests)


def test_requester_cannot_approve_own_request_and_grants(env: Any, oidc: Any,
                                                         echo_upstream: Any) -> None:
    gw, admin = env
    # a reviewer who is also the requester
    both = oidc.token(sub="bob", groups=["agents", "approvers"])
    reviewer = oidc.token(sub="alice", groups=["approvers"])
    url = f"https://localhost:{echo_upstream.port}/v1/users/43"
    out: dict[str, Any] = {}
    t = agent_call(gw, both, url, out)
    items = pending(admin, reviewer)
    r = httpx.post(f"{admin}/v1/approvals/{items[0]['id']}/approve",
                   headers={"Authorization": f"Bearer {both}"}, timeout=10)
    assert r.status_code == 409 and "own request" in r.json()["reason"]
    res = cli(gw, reviewer, "approve", items[0]["id"], "--grant", "30m")
    assert res.returncode == 0, res.stderr
    t.join(20)
    assert out["status"] == 200
    # the same operation again: no review needed within the grant
    out2: dict[str, Any] = {}
    agent_call(gw, both, url, out2).join(10)
    assert out2["status"] == 200
    # another operation still needs review
    out3: dict[str, Any] = {}
    t = agent_call(gw, both, f"https://localhost:{echo_upstream.port}/v1/users/44", out3)
    assert pending(admin, reviewer)
    t.join(20)
    assert out3["body"]["error"] == "approval_timeout"
