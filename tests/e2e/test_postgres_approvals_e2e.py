"""Postgres `review` statements held for approval through the real gateway process (SPEC §5,
§6): psql and psycopg wait while a reviewer looks at the statement on the admin API; approved,
the statement runs on the real PostgreSQL; denied or timed out, the client gets ERROR 42501 and
the session stays usable."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.e2e.test_approvals_e2e import pending as pending_approvals
from tests.fixtures import pg_cluster
from tests.fixtures.gateway import ROOT, free_port
from tests.fixtures.pg_cluster import PASSWORDS, PgCluster

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

POLICY = """
rules:
  - id: agents-read
    effect: allow
    reason: agents may read
    when: {groups: [agents], targets: [orders-db], sql: {statements: [select]}}
  - id: deletes-need-review
    effect: review
    reason: deleting orders needs a human
    when: {groups: [agents], targets: [orders-db], sql: {statements: [delete]}}
"""


@pytest.fixture(scope="module")
def pg() -> Iterator[PgCluster]:
    if not pg_cluster.available():
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    cluster = PgCluster().start()
    cluster.create_database("orders")
    yield cluster
    cluster.stop()


@pytest.fixture
def gw(pg: PgCluster, gateway_factory: Any) -> Any:
    port, admin = free_port(), free_port()
    config = {
        "listen": {"postgres": f"127.0.0.1:{port}", "admin": f"127.0.0.1:{admin}"},
        "identity": {"dev_issuer": True},
        "approvals": {"timeout_seconds": 3, "approver_groups": ["approvers"]},
        "targets": [{"name": "orders-db", "protocol": "postgres", "database": "orders",
                     "upstream": {"host": "127.0.0.1", "port": pg.port, "dbname": "orders",
                                  "user": "gw_scram", "password_env": "ORDERS_DB_PASSWORD",
                                  "sslmode": "disable"}}],
    }
    g = gateway_factory(config, policies={"orders.yaml": POLICY},
                        env={"ORDERS_DB_PASSWORD": PASSWORDS["gw_scram"]})
    g.pg_port, g.admin = port, f"http://127.0.0.1:{admin}"
    return g


def token(gw: Any, sub: str, groups: str) -> str:
    res = subprocess.run([sys.executable, "-m", "addons.cli", "token", "--config",
                          str(gw.config_path), "--sub", sub, "--groups", groups],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().splitlines()[-1]


def psql_in_thread(gw: Any, tok: str, sql: str, out: dict[str, Any]) -> threading.Thread:
    def run() -> None:
        env = {**os.environ, "PGPASSWORD": tok, "PGSSLMODE": "disable",
               "PGCONNECT_TIMEOUT": "10"}
        res = subprocess.run(["psql", "-X", "-h", "127.0.0.1", "-p", str(gw.pg_port), "-U",
                              "agent", "-d", "orders", "-c", sql], env=env,
                             capture_output=True, text=True, timeout=60)
        out["rc"], out["stdout"], out["stderr"] = res.returncode, res.stdout, res.stderr

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def pending(gw: Any, reviewer: str) -> list[dict[str, Any]]:
    return pending_approvals(gw.admin, reviewer, deadline=15)


def decide(gw: Any, reviewer: str, approval_id: str, verb: str, **body: Any) -> None:
    r = httpx.post(f"{gw.admin}/v1/approvals/{approval_id}/{verb}", json=body,
                   headers={"Authorization": f"Bearer {reviewer}"}, timeout=10)
    assert r.status_code == 200, r.text


def test_psql_delete_waits_for_approval_then_runs(gw: Any, pg: PgCluster) -> None:
    agent = token(gw, "agent-1", "agents")
    reviewer = token(gw, "alice", "approvers")
    before = int(pg.psql("SELECT count(*) FROM orders WHERE id = 3", db="orders"))
    assert before == 1
    out: dict[str, Any] = {}
    t = psql_in_thread(gw, agent, "DELETE FROM orders WHERE id = 3", out)
    held = pending(gw, reviewer)
    assert len(held) == 1
    a = held[0]
    assert a["target"] == "orders-db" and a["rules"] == ["deletes-need-review"]
    assert a["operation"]["statement"] == "DELETE FROM orders WHERE id = 3"
    assert a["identity"]["sub"] == "agent-1"
    time.sleep(0.5)
    assert t.is_alive(), "psql must be waiting while the statement is held"
    assert int(pg.psql("SELECT count(*) FROM orders WHERE id = 3", db="orders")) == 1
    decide(gw, reviewer, a["id"], "approve", reason="ticket 42")
    t.join(30)
    assert out["rc"] == 0, out["stderr"]
    assert "DELETE 1" in out["stdout"]
    assert int(pg.psql("SELECT count(*) FROM orders WHERE id = 3", db="orders")) == 0
    audit = [line for line in gw.audit_path.read_text().splitlines() if a["id"] in line]
    assert audit and '"state":"approved"' in audit[-1]


def test_psycopg_denied_statement_gets_42501_and_session_stays_usable(
        gw: Any, pg: PgCluster) -> None:
    import psycopg

    agent = token(gw, "agent-1", "agents")
    reviewer = token(gw, "alice", "approvers")
    result: dict[str, Any] = {}

    def run() -> None:
        with psycopg.connect(host="127.0.0.1", port=gw.pg_port, dbname="orders", user="agent",
                             password=agent, sslmode="disable", connect_timeout=10,
                             autocommit=True) as conn:
            try:
                conn.execute("DELETE FROM orders WHERE id = %s", (1,))
            except psycopg.Error as e:
                result["sqlstate"], result["message"] = e.sqlstate, str(e)
            result["after"] = conn.execute("SELECT count(*) FROM orders WHERE id = 1"
                                           ).fetchone()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    held = pending(gw, reviewer)
    assert len(held) == 1
    # the requester cannot decide its own statement
    r = httpx.post(f"{gw.admin}/v1/approvals/{held[0]['id']}/approve", json={},
                   headers={"Authorization": f"Bearer {token(gw, 'agent-1', 'approvers')}"},
                   timeout=10)
    assert r.status_code == 409
    decide(gw, reviewer, held[0]["id"], "deny", reason="not today")
    t.join(30)
    assert result["sqlstate"] == "42501"
    assert "approval_denied" in result["message"] and "not today" in result["message"]
    assert result["after"] == (1,)
    assert int(pg.psql("SELECT count(*) FROM orders WHERE id = 1", db="orders")) == 1


def test_unanswered_statement_times_out(gw: Any) -> None:
    agent = token(gw, "agent-1", "agents")
    out: dict[str, Any] = {}
    started = time.monotonic()
    t = psql_in_thread(gw, agent, "DELETE FROM orders WHERE id = 2", out)
    t.join(40)
    assert not t.is_alive()
    assert time.monotonic() - started >= 2.5  # approvals.timeout_seconds: 3
    assert out["rc"] != 0 and "approval_timeout" in out["stderr"]


def test_cancelling_a_held_statement_ends_the_hold(gw: Any, pg: PgCluster) -> None:
    """psycopg's cancel (a CancelRequest on a new connection) while the statement is held:
    the statement fails with 57014, nothing ran, and the approval is no longer pending."""
    import psycopg

    agent = token(gw, "agent-1", "agents")
    reviewer = token(gw, "alice", "approvers")
    result: dict[str, Any] = {}
    conn = psycopg.connect(host="127.0.0.1", port=gw.pg_port, dbname="orders", user="agent",
                           password=agent, sslmode="disable", connect_timeout=10,
                           autocommit=True)

    def run() -> None:
        try:
            conn.execute("DELETE FROM orders WHERE id = %s", (2,))
        except psycopg.Error as e:
            result["sqlstate"] = e.sqlstate

    t = threading.Thread(target=run, daemon=True)
    t.start()
    held = pending(gw, reviewer)
    assert len(held) == 1
    conn.cancel()
    t.join(20)
    assert not t.is_alive() and result["sqlstate"] == "57014"
    assert conn.execute("SELECT count(*) FROM orders WHERE id = 2").fetchone() == (1,)
    conn.close()
    assert pending_approvals(gw.admin, reviewer, deadline=0.5) == []
