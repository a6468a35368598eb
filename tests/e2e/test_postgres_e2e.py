"""The real gateway process (`python -m addons.cli run`) with a Postgres listener, in front of a
throwaway PostgreSQL, driven by psql, psycopg and asyncpg. Checks decisions, masking, TLS with
the gateway's CA, the audit chain, and that no token, upstream password or masked value reaches
the gateway's output or audit log."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.fixtures import pg_cluster
from tests.fixtures.gateway import ROOT, free_port
from tests.fixtures.pg_cluster import PASSWORDS, PgCluster

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

POLICY = """
rules:
  - id: agents-read
    effect: allow
    reason: agents may read the orders database
    when: {groups: [agents], targets: [orders-db], sql: {statements: [select, show, transaction]}}
  - id: agents-no-ddl
    effect: deny
    reason: agents never change the schema
    when: {targets: [orders-db], sql: {statements: [drop, truncate, alter, create]}}
masks:
  - id: customer-pii
    when: {targets: [orders-db]}
    columns: ["customers.ssn", "customers.card"]
    detectors: [email]
    strategy: redact
tests:
  - name: agents may select
    identity: {sub: agent-1, groups: [agents]}
    request: {target: orders-db, sql: "SELECT * FROM orders"}
    expect: allow
  - name: drop is denied
    identity: {sub: agent-1, groups: [agents]}
    request: {target: orders-db, sql: "DROP TABLE orders"}
    expect: deny
"""
SECRETS = ["123-45-6789", "987-65-4321", "4111111111111111", "ada@example.com"]


@pytest.fixture(scope="module")
def pg() -> Iterator[PgCluster]:
    if not pg_cluster.available():
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    cluster = PgCluster(ssl=True).start()
    cluster.create_database("orders")
    yield cluster
    cluster.stop()


@pytest.fixture
def gw(pg: PgCluster, gateway_factory: Any) -> Any:
    port = free_port()
    config = {
        "listen": {"postgres": f"127.0.0.1:{port}", "postgres_tls": "prefer"},
        "identity": {"dev_issuer": True},
        "targets": [{"name": "orders-db", "protocol": "postgres", "database": "orders",
                     "upstream": {"host": "127.0.0.1", "port": pg.port, "dbname": "orders",
                                  "user": "gw_tls", "password_env": "ORDERS_DB_PASSWORD",
                                  "sslmode": "require"}}],
    }
    g = gateway_factory(config, policies={"orders.yaml": POLICY},
                        env={"ORDERS_DB_PASSWORD": PASSWORDS["gw_tls"]})
    g.pg_port = port
    return g


def token(gw: Any, groups: str = "agents") -> str:
    res = subprocess.run([sys.executable, "-m", "addons.cli", "token", "--config",
                          str(gw.config_path), "--sub", "agent-1", "--groups", groups],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().splitlines()[-1]


def psql(gw: Any, tok: str, sql: str, sslmode: str = "require",
         **env: str) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, "PGPASSWORD": tok, "PGSSLMODE": sslmode, "PGCONNECT_TIMEOUT": "10",
         **env}
    return subprocess.run(["psql", "-X", "-h", "127.0.0.1", "-p", str(gw.pg_port), "-U",
                           "agent", "-d", "orders", "-c", sql], env=e, capture_output=True,
                          text=True, timeout=60)


def test_psql_allowed_masked_and_denied_through_the_real_gateway(gw: Any) -> None:
    tok = token(gw)
    ok = psql(gw, tok, "SELECT id, name, ssn, card, email FROM customers ORDER BY id",
              sslmode="verify-full", PGSSLROOTCERT=str(gw.ca))
    assert ok.returncode == 0, ok.stderr
    assert "Ada Lovelace" in ok.stdout and "[MASKED:customer-pii]" in ok.stdout
    assert "[MASKED:email]" in ok.stdout
    denied = psql(gw, tok, "DROP TABLE orders")
    assert denied.returncode != 0
    assert ("ERROR:  portcullis: denied by rule agents-no-ddl: agents never change the schema"
            in denied.stderr)
    nogroup = psql(gw, token(gw, groups="others"), "SELECT 1")
    assert nogroup.returncode != 0 and "default-deny" in nogroup.stderr
    badtok = psql(gw, "eyJhbGciOiJub25lIn0.e30.", "SELECT 1")
    assert badtok.returncode != 0 and "FATAL:  portcullis: authentication failed" in (
        badtok.stderr)

    # audit: one decision line per statement, chain verifies, outcome names masked columns
    recs = [json.loads(line) for line in gw.audit_text().splitlines()]
    pg_recs = [r for r in recs if r.get("protocol") == "postgres"]
    assert {r["decision"] for r in pg_recs} >= {"allow", "deny"}
    masked = [r for r in recs if r["type"] == "outcome" and r["masked"]["count"]]
    assert masked and "customers.ssn" in masked[-1]["masked"]["columns"]
    res = subprocess.run([sys.executable, "-m", "addons.cli", "audit", "verify", "--config",
                          str(gw.config_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr

    # one decision line per statement on stdout, and nothing secret anywhere
    assert "DENY" in gw.stdout and "ALLOW" in gw.stdout
    everything = ok.stdout + ok.stderr + gw.stdout + gw.audit_text()
    for secret in SECRETS + [PASSWORDS["gw_tls"], tok]:
        assert secret not in everything


def test_psycopg_and_asyncpg_through_the_real_gateway(gw: Any) -> None:
    import asyncpg
    import psycopg

    tok = token(gw)
    dsn = (f"host=127.0.0.1 port={gw.pg_port} user=agent dbname=orders password={tok} "
           f"sslmode=verify-full sslrootcert={gw.ca}")
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT name, ssn FROM customers WHERE id = %s", (2,)).fetchall()
        assert rows == [("Alan Turing", "[MASKED:customer-pii]")]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("TRUNCATE orders")

    async def run() -> list[Any]:
        import ssl

        ctx = ssl.create_default_context(cafile=str(gw.ca))
        conn = await asyncpg.connect(host="127.0.0.1", port=gw.pg_port, user="agent",
                                     password=tok, database="orders", ssl=ctx)
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.prepare("DROP TABLE customers")
            return [tuple(r) for r in await conn.fetch(
                "SELECT name, card FROM customers WHERE id = $1", 1)]
        finally:
            await conn.close()

    got = asyncio.run(asyncio.wait_for(run(), 30))
    assert got == [("Ada Lovelace", None)]  # asyncpg reads text in binary: masked -> NULL


def test_sigterm_loses_no_audit_line_and_no_decision_line(gw: Any) -> None:
    """Outcome lines of Postgres statements are written with the next decision or once per
    event-loop turn, and decision log lines are flushed every 0.1 s: a SIGTERM right after the
    last statement must still leave every line on disk and on stdout."""
    import psycopg

    tok = token(gw)
    n = 25
    with psycopg.connect(host="127.0.0.1", port=gw.pg_port, dbname="orders", user="agent",
                         password=tok, sslmode="require", connect_timeout=10,
                         autocommit=True) as conn:
        for i in range(n):
            assert conn.execute("SELECT %s::int", (i,)).fetchone() == (i,)
        gw.stop()  # SIGTERM while the session is still open
    assert gw.proc.returncode == 0, gw.stdout[-2000:]
    recs = [json.loads(x) for x in gw.audit_path.read_text().splitlines()]
    decisions = {r["id"] for r in recs if r.get("type") == "decision"
                 and r["decision"] == "allow"}
    outcomes = {r["decision_id"] for r in recs if r.get("type") == "outcome"}
    assert len(decisions) >= n and decisions <= outcomes
    res = subprocess.run([sys.executable, "-m", "addons.cli", "audit", "verify",
                          str(gw.audit_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr
    assert gw.stdout.count(" ALLOW SELECT") >= n
    # the session was still open: its recording was finished and written at shutdown
    from mitmproxy import io as mio

    texts = []
    for f in sorted((gw.state_dir / "recordings").glob("*.mitm")):
        with f.open("rb") as fh:
            for flow in mio.FlowReader(fh).stream():
                if flow.type == "tcp":
                    texts += [m.content.decode("utf-8", "replace") for m in flow.messages]
    assert sum("SELECT" in t for t in texts) >= n, texts[:5]
