"""The gateway in-process against a real PostgreSQL, driven by psql, psycopg and asyncpg:
allowed and denied statements, every bypass case of bypass.sql on both protocols, TLS,
authentication failures, expiry, cancel, fast-path calls, and robustness to garbage bytes."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.fixtures.pg_cluster import PgCluster
from tests.proxy_db.harness import InProcessGateway, pg_target

pytestmark = pytest.mark.postgres

POLICY = """
rules:
  - id: read
    effect: allow
    reason: agents may read
    when: {sql: {statements: [select, show, set, transaction, explain, prepare, execute,
                              deallocate, copy_to]}}
  - id: write-notes
    effect: allow
    reason: agents may keep notes and fix customers
    when: {sql: {statements: [insert, update, delete, copy_from],
                 tables: [public.audit_trail, public.customers]}}
  - id: no-ddl
    effect: deny
    reason: no schema changes by agents
    when: {sql: {statements: [drop, truncate, create, alter, do, copy_program, grant, revoke,
                              role, other]}}
  - id: no-unbounded
    effect: deny
    reason: UPDATE and DELETE need a WHERE clause
    when: {sql: {statements: [update, delete], unbounded: true}}
  - id: no-server-files
    effect: deny
    reason: server-side file and large-object functions are off limits
    when: {sql: {functions: ["pg_read_*", "lo_*", "pg_ls_dir"]}}
"""

CASE_RE = re.compile(r"^-- name: (?P<name>.+)$", re.M)


def load_cases() -> list[dict[str, str]]:
    text = (Path(__file__).parent / "bypass.sql").read_text()
    cases = []
    starts = [m.start() for m in CASE_RE.finditer(text)] + [len(text)]
    for a, b in zip(starts, starts[1:], strict=False):
        block = text[a:b]
        meta = dict(re.findall(r"^-- (name|expect|via): (.+)$", block, re.M))
        sql = "\n".join(line for line in block.splitlines()
                        if not re.match(r"^-- (name|expect|via): ", line)).strip()
        cases.append({"name": meta["name"], "expect": meta["expect"],
                      "via": meta.get("via", "both"), "sql": sql})
    return cases


CASES = load_cases()


@pytest.fixture(scope="module")
def gw(pg: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Any:
    g = InProcessGateway(tmp_path_factory.mktemp("gwpg"), [pg_target(pg)], {"p.yaml": POLICY})
    g.start()
    yield g
    g.stop()


@pytest.fixture(scope="module")
def token(gw: InProcessGateway) -> str:
    return gw.token("agent-7", ["readers"])


def orders_intact(pg: PgCluster) -> None:
    assert pg.psql("SELECT count(*) FROM orders", db="orders").strip() == "3"
    cols = pg.psql("SELECT count(*) FROM information_schema.columns WHERE table_name = "
                   "'customers'", db="orders").strip()
    assert cols == "7"


def test_bypass_fixture_has_both_kinds_of_cases() -> None:
    assert len(CASES) >= 30
    assert {c["expect"] for c in CASES} == {"allow", "deny"}


@pytest.mark.parametrize("case", [c for c in CASES if c["via"] in ("both", "simple")],
                         ids=lambda c: c["name"])
def test_bypass_simple_protocol_psql(case: dict[str, str], gw: InProcessGateway, token: str,
                                     pg: PgCluster) -> None:
    r = gw.psql(token, case["sql"], args=("-v", "ON_ERROR_STOP=1"))
    if case["expect"] == "deny":
        assert r.returncode != 0, r.stdout
        assert "portcullis: denied by rule" in r.stderr, r.stderr
    else:
        assert r.returncode == 0, r.stderr
    orders_intact(pg)


@pytest.mark.parametrize("case", [c for c in CASES if c["via"] in ("both", "extended")],
                         ids=lambda c: c["name"])
def test_bypass_extended_protocol_psycopg(case: dict[str, str], gw: InProcessGateway,
                                          token: str, pg: PgCluster) -> None:
    with psycopg.connect(gw.dsn(token), autocommit=True) as conn:
        if case["expect"] == "deny":
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                conn.execute(case["sql"].encode())
            assert "portcullis: denied by rule" in str(e.value)
        else:
            conn.execute(case["sql"].encode())
        # the session stays usable after a denial
        assert conn.execute("SELECT 41 + 1").fetchone() == (42,)
    orders_intact(pg)


def test_allowed_select_with_all_three_clients(gw: InProcessGateway, token: str) -> None:
    r = gw.psql(token, "SELECT status FROM orders ORDER BY id")
    assert r.returncode == 0 and "paid" in r.stdout and "open" in r.stdout
    with psycopg.connect(gw.dsn(token)) as conn:
        rows = conn.execute("SELECT id, amount FROM orders WHERE id = %s", (2,)).fetchall()
        assert rows == [(2, __import__("decimal").Decimal("99.99"))]

    async def run() -> Any:
        conn = await asyncpg.connect(host="127.0.0.1", port=gw.port, user="agent",
                                     password=token, database="orders", ssl=False)
        try:
            one = await conn.fetchval("SELECT status FROM orders WHERE id = $1", 3)
            stmt = await conn.prepare("SELECT count(*) FROM orders WHERE amount > $1")
            many = [await stmt.fetchval(x) for x in (1, 50, 100)]
            return one, many
        finally:
            await conn.close()

    assert asyncio.run(asyncio.wait_for(run(), 30)) == ("paid", [3, 1, 0])


@pytest.mark.parametrize("sql", ["DROP TABLE orders", "TRUNCATE orders", "DELETE FROM customers"])
def test_denied_statements_with_all_three_clients(sql: str, gw: InProcessGateway, token: str,
                                                  pg: PgCluster) -> None:
    r = gw.psql(token, sql)
    assert r.returncode != 0 and "ERROR:  portcullis: denied by rule" in r.stderr
    with psycopg.connect(gw.dsn(token)) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(sql)
        conn.rollback()
        assert conn.execute("SELECT 1").fetchone() == (1,)

    async def run() -> None:
        conn = await asyncpg.connect(host="127.0.0.1", port=gw.port, user="agent",
                                     password=token, database="orders", ssl=False)
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(sql)  # simple protocol
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.prepare(sql)  # Parse + Describe + Flush: must not hang
            assert await conn.fetchval("SELECT 7") == 7
        finally:
            await conn.close()

    asyncio.run(asyncio.wait_for(run(), 30))
    orders_intact(pg)


def test_denial_inside_transaction_aborts_it_like_postgres(gw: InProcessGateway,
                                                           token: str) -> None:
    with psycopg.connect(gw.dsn(token)) as conn:
        conn.execute("INSERT INTO audit_trail (note) VALUES ('txn-test')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DROP TABLE orders")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        conn.rollback()
        n = conn.execute("SELECT count(*) FROM audit_trail WHERE note = 'txn-test'").fetchone()
        assert n == (0,)


def test_psycopg_pipeline_with_a_denied_statement(gw: InProcessGateway, token: str) -> None:
    with psycopg.connect(gw.dsn(token), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            with conn.pipeline():
                c1 = conn.execute("SELECT 1")
                conn.execute("DROP TABLE orders")
                conn.execute("SELECT 3")
        assert c1.fetchone() == (1,)
        assert conn.execute("SELECT 4").fetchone() == (4,)


def test_tls_with_the_gateway_ca(gw: InProcessGateway, token: str) -> None:
    ca = gw.runtime.ca_cert_path
    r = gw.psql(token, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                sslmode="verify-full", extra_env={"PGSSLROOTCERT": str(ca)})
    assert r.returncode == 0, r.stderr
    with psycopg.connect(gw.dsn(token, sslmode="verify-full", sslrootcert=str(ca),
                               host="localhost")) as conn:
        assert conn.info.pgconn.ssl_in_use


def test_bad_token_unknown_db_and_expiry(gw: InProcessGateway, token: str) -> None:
    r = gw.psql("not-a-token", "SELECT 1")
    assert r.returncode != 0 and "FATAL:  portcullis: authentication failed" in r.stderr
    with pytest.raises(psycopg.OperationalError) as e:
        psycopg.connect(gw.dsn("not-a-token"))
    assert "28P01" in str(getattr(e.value, "sqlstate", "")) or "authentication failed" in str(
        e.value)
    r = gw.psql(token, "SELECT 1", db="nosuchdb")
    assert r.returncode != 0 and 'database "nosuchdb" does not exist' in r.stderr
    # exp 27 s ago: still inside the issuer's 30 s leeway at connect, past it 3 s later
    short = gw.token("agent-7", ["readers"], ttl=-27)
    with psycopg.connect(gw.dsn(short), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        time.sleep(3.5)
        with pytest.raises(psycopg.OperationalError) as e2:
            conn.execute("SELECT 1")
        assert "token expired" in str(e2.value)


def test_postgres_tls_require_refuses_plaintext(pg: PgCluster, gateway: Any) -> None:
    g = gateway([pg_target(pg)], {"p.yaml": POLICY}, postgres_tls="require")
    tok = g.token("agent-7")
    r = g.psql(tok, "SELECT 1", sslmode="disable")
    assert r.returncode != 0 and "requires TLS" in r.stderr
    r = g.psql(tok, "SELECT 1", sslmode="require")
    assert r.returncode == 0, r.stderr


def test_cancel_is_forwarded_to_the_right_backend(gw: InProcessGateway, token: str) -> None:
    """psql sends a CancelRequest on Ctrl-C (SIGINT); asyncpg sends one when a query times out.
    (Not psycopg here: its blocking cancel holds the GIL, which the in-process gateway needs.)"""
    env = {**os.environ, "PGPASSWORD": token, "PGSSLMODE": "disable"}
    start = time.monotonic()
    proc = subprocess.Popen(["psql", "-X", "-h", "127.0.0.1", "-p", str(gw.port), "-U", "agent",
                             "-d", "orders", "-c", "SELECT pg_sleep(30)"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert "canceling statement due to user request" in err, err
    assert time.monotonic() - start < 15

    async def run() -> None:
        conn = await asyncpg.connect(host="127.0.0.1", port=gw.port, user="agent",
                                     password=token, database="orders", ssl=False)
        try:
            t0 = time.monotonic()
            with pytest.raises(asyncio.TimeoutError):
                await conn.fetchval("SELECT pg_sleep(30)", timeout=1)
            assert time.monotonic() - t0 < 10
            assert await conn.fetchval("SELECT 5") == 5  # the backend was cancelled, not killed
        finally:
            await conn.close()

    asyncio.run(asyncio.wait_for(run(), 30))
    assert "cancel request with an unknown key" not in gw.logs()


def test_fast_path_large_object_calls_are_denied(gw: InProcessGateway, token: str,
                                                 tmp_path: Path) -> None:
    f = tmp_path / "blob.txt"
    f.write_text("hello")
    r = gw.psql(token, f"\\lo_import {f}")
    assert r.returncode != 0
    assert "portcullis: denied" in r.stderr
    audit = gw.audit_text()
    assert '"fastpath":true' in audit or '"kind":"call"' in audit


def test_startup_options_refused_through_real_clients(gw: InProcessGateway, token: str) -> None:
    r = gw.psql(token, "SELECT 1", extra_env={"PGOPTIONS": "-c role=postgres"})
    assert r.returncode != 0 and "startup options are not allowed" in r.stderr


def _raw_startup(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        s.settimeout(5)
        out = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except TimeoutError:
            pass
        return out


def test_garbage_gets_a_protocol_error_and_other_sessions_live_on(gw: InProcessGateway,
                                                                  token: str) -> None:
    with psycopg.connect(gw.dsn(token), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        for junk in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                     b"\x00\x00\x00\x08\x04\xd2\x16\x2f" + b"plaintext after SSLRequest",
                     struct.pack("!i", 9) + b"\x00\x03\x00\x00\xff",
                     bytes(range(256)) * 4):
            out = _raw_startup(gw.port, junk)
            assert b"08P01" in out, out
        assert conn.execute("SELECT 2").fetchone() == (2,)


def test_audit_has_one_decision_per_statement_and_verifies(gw: InProcessGateway,
                                                           token: str) -> None:
    from addons.audit import verify_file

    with psycopg.connect(gw.dsn(token), autocommit=True) as conn:
        conn.execute("SELECT 'audit-marker-1' AS m").fetchall()
    result = verify_file(gw.audit_path)
    assert result.ok, result.message
    text = gw.audit_text()
    assert "audit-marker-1" not in text  # literals are normalised away
    assert "select $1 as m" in text.lower()


def test_copy_from_stdin_allowed_by_rule(gw: InProcessGateway, token: str,
                                         pg: PgCluster) -> None:
    env = {**os.environ, "PGPASSWORD": token, "PGSSLMODE": "disable"}
    res = subprocess.run(["psql", "-X", "-h", "127.0.0.1", "-p", str(gw.port), "-U", "agent",
                          "-d", "orders", "-c", "\\copy audit_trail (note) from stdin"],
                         input="copied-1\ncopied-2\n", env=env, capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 0, res.stderr
    assert "COPY 2" in res.stdout
    n = pg.psql("SELECT count(*) FROM audit_trail WHERE note LIKE 'copied-%'", db="orders")
    assert n.strip() == "2"
    denied = subprocess.run(["psql", "-X", "-h", "127.0.0.1", "-p", str(gw.port), "-U", "agent",
                             "-d", "orders", "-c", "\\copy orders (status) from stdin"],
                            input="x\n", env=env, capture_output=True, text=True, timeout=30)
    assert denied.returncode != 0 and "portcullis: denied" in denied.stderr


def test_listen_is_a_policed_kind(gw: InProcessGateway, token: str) -> None:
    """listen_notify is not allowed by this policy: refused like any other kind."""
    r = gw.psql(token, "LISTEN chan")
    assert r.returncode != 0 and "default-deny" in r.stderr


def test_unfinished_login_times_out(pg: PgCluster, gateway: Any,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import proxy_db.server

    monkeypatch.setattr(proxy_db.server, "AUTH_TIMEOUT", 0.5)
    g = gateway([pg_target(pg)], {"p.yaml": POLICY})
    from proxy_db.messages import PROTOCOL_3_0, StartupMessage

    startup = StartupMessage(PROTOCOL_3_0, (("user", "agent"), ("database", "orders"))).encode()
    t0 = time.monotonic()
    out = _raw_startup(g.port, startup)  # asked for a password, never sends one
    assert b"authentication timed out" in out and time.monotonic() - t0 < 4.5
