"""Result masking through the gateway against a real PostgreSQL. One leak test per case: the
raw values must appear in none of client output, audit log and gateway logs, and the case
must really have been masked (not merely failed)."""

from __future__ import annotations

import asyncio
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
    when: {sql: {statements: [select, transaction, prepare, execute, deallocate, copy_to]}}
  - id: fix-customers
    effect: allow
    reason: agents may fix customer notes
    when: {sql: {statements: [update, insert], tables: [public.customers]}}
masks:
  - id: pii-columns
    when: {targets: [orders-db]}
    columns: ["customers.ssn", "*.card"]
    strategy: redact
  - id: contact-detectors
    when: {targets: [orders-db]}
    detectors: [email, phone]
    strategy: redact
"""

SSNS = ["123-45-6789", "987-65-4321", "111-22-3333"]
CARDS = ["4111111111111111", "5500005555555559", "340000000000009"]
EMAILS = ["ada@example.com", "alan@example.com", "grace@example.com"]
PHONE = "555-867-5309"
SECRETS = SSNS + CARDS + EMAILS + [PHONE, "123456789", "411111", "550000"]


@pytest.fixture(scope="module")
def gw(pg: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Any:
    g = InProcessGateway(tmp_path_factory.mktemp("gwmask"), [pg_target(pg)],
                         {"p.yaml": POLICY})
    g.start()
    yield g
    g.stop()


@pytest.fixture(scope="module")
def token(gw: InProcessGateway) -> str:
    return gw.token("agent-7", ["readers"])


def assert_no_leak(gw: InProcessGateway, client_output: str) -> None:
    for where, text in (("client output", client_output), ("audit log", gw.audit_text()),
                        ("gateway logs", gw.logs())):
        for secret in SECRETS:
            assert secret not in text, f"{secret!r} leaked into the {where}:\n{text[-2000:]}"


def last_outcome(gw: InProcessGateway) -> dict[str, Any]:
    import json

    for line in reversed(gw.audit_text().splitlines()):
        rec = json.loads(line)
        if rec["type"] == "outcome":
            return rec
    raise AssertionError("no outcome record")


PSQL_CASES = {
    "plain columns": "SELECT id, name, ssn, card FROM customers ORDER BY id",
    "aliases": 'SELECT c.ssn AS x, c.card AS "Totally Harmless" FROM customers c',
    "derived expressions": "SELECT lower(ssn), ssn || '', substr(card, 1, 6), "
                           "replace(ssn, '-', '') FROM customers",
    "t.star": "SELECT c.* FROM customers c",
    "star": "SELECT * FROM customers",
    "view": "SELECT * FROM customer_contacts",
    "subquery": "SELECT x FROM (SELECT ssn AS x FROM customers) s",
    "cte": "WITH t AS (SELECT card FROM customers) SELECT * FROM t",
    "union": "SELECT name FROM customers UNION ALL SELECT ssn FROM customers",
    "join": "SELECT o.id, c.card FROM orders o JOIN customers c ON c.id = o.customer_id",
    "returning": "UPDATE customers SET notes = notes WHERE id = 1 RETURNING ssn, card, email",
    "cursor": "BEGIN; DECLARE cur CURSOR FOR SELECT ssn, card FROM customers; "
              "FETCH ALL FROM cur; COMMIT",
    "sql prepare/execute": "PREPARE q AS SELECT ssn, card FROM customers; EXECUTE q; "
                           "DEALLOCATE q",
    "detectors in other columns": "SELECT name, email, notes FROM customers",
    "json of a row": "SELECT row_to_json(c) FROM customers c",
}


@pytest.mark.parametrize("name", sorted(PSQL_CASES))
def test_masking_case_psql(name: str, gw: InProcessGateway, token: str) -> None:
    r = gw.psql(token, PSQL_CASES[name])
    assert r.returncode == 0, r.stderr
    assert "[MASKED:" in r.stdout, r.stdout
    assert last_outcome(gw)["masked"]["count"] > 0
    assert_no_leak(gw, r.stdout + r.stderr)


def test_unmasked_columns_stay_readable(gw: InProcessGateway, token: str) -> None:
    r = gw.psql(token, "SELECT lower(name) AS n, c.id * 2 AS d, status FROM customers c "
                       "JOIN orders o ON o.customer_id = c.id ORDER BY c.id")
    assert r.returncode == 0, r.stderr
    assert "ada lovelace" in r.stdout and "paid" in r.stdout and "[MASKED" not in r.stdout
    r = gw.psql(token, "SELECT id, name FROM customer_contacts ORDER BY id")
    assert "Ada Lovelace" in r.stdout and "[MASKED" not in r.stdout


def test_binary_format_values_in_masked_columns_become_null(gw: InProcessGateway,
                                                            token: str) -> None:
    with psycopg.connect(gw.dsn(token)) as conn:
        cur = conn.cursor(binary=True)
        rows = cur.execute("SELECT name, ssn, card, email, notes FROM customers ORDER BY id"
                           ).fetchall()
    out = repr(rows)
    assert rows[0][0] == "Ada Lovelace"
    assert all(r[1] is None and r[2] is None for r in rows)  # masked columns: NULL
    assert rows[0][3] == "[MASKED:email]"  # text types are rewritten in place
    assert "[MASKED:phone]" in rows[1][4]
    assert_no_leak(gw, out)


def test_asyncpg_extended_binary_and_prepared(gw: InProcessGateway, token: str) -> None:
    async def run() -> str:
        conn = await asyncpg.connect(host="127.0.0.1", port=gw.port, user="agent",
                                     password=token, database="orders", ssl=False)
        try:
            a = await conn.fetch("SELECT ssn, card, email, lower(ssn) AS l FROM customers")
            stmt = await conn.prepare("SELECT c.* FROM customers c WHERE id = $1")
            b = await stmt.fetch(2)
            c = await conn.fetch("SELECT * FROM customer_contacts")
            return repr([dict(r) for r in a + b + c])
        finally:
            await conn.close()

    out = asyncio.run(asyncio.wait_for(run(), 30))
    assert "[MASKED:" in out or "None" in out
    assert_no_leak(gw, out)


def test_psycopg_server_side_cursor(gw: InProcessGateway, token: str) -> None:
    with psycopg.connect(gw.dsn(token)) as conn:
        with conn.cursor(name="srv") as cur:
            cur.execute("SELECT ssn, card, email FROM customers")
            rows = cur.fetchall()
    out = repr(rows)
    assert "[MASKED:" in out
    assert_no_leak(gw, out)


@pytest.mark.parametrize("sql", ["COPY customers TO STDOUT",
                                 "COPY (SELECT ssn FROM customers) TO STDOUT",
                                 "COPY customers (ssn) TO STDOUT WITH (FORMAT csv)"])
def test_copy_to_stdout_of_masked_columns_is_denied(sql: str, gw: InProcessGateway,
                                                    token: str) -> None:
    r = gw.psql(token, sql)
    assert r.returncode != 0 and "portcullis: denied" in r.stderr
    assert_no_leak(gw, r.stdout + r.stderr)


@pytest.mark.parametrize("sql", ["SELECT ssn::int FROM customers",
                                 "SELECT card::date FROM customers",
                                 "SELECT email::int FROM customers",
                                 "UPDATE customers SET id = 2 WHERE id = 1 RETURNING ssn"])
def test_upstream_errors_echoing_masked_values_are_scrubbed(sql: str, gw: InProcessGateway,
                                                             token: str) -> None:
    r = gw.psql(token, sql)
    assert r.returncode != 0 and "ERROR:" in r.stderr
    assert_no_leak(gw, r.stdout + r.stderr)


NARROW_POLICY = """
rules:
  - {id: read, effect: allow, reason: ok, when: {sql: {statements: [select, copy_to,
                                                                     listen_notify]}}}
masks:
  - id: ssn-only
    when: {sql: {tables: [public.customers]}}
    columns: ["customers.ssn"]
  - id: contact-detectors
    when: {targets: [orders-db]}
    detectors: [email, phone]
"""


@pytest.fixture(scope="module")
def narrow(pg: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Any:
    pg.psql("CREATE TABLE IF NOT EXISTS contacts_log (who text, how text); "
            "TRUNCATE contacts_log; INSERT INTO contacts_log VALUES "
            "('Ada', 'mail ada@example.com'), ('Alan', 'call 555-867-5309'); "
            "GRANT SELECT ON contacts_log TO gw_scram", db="orders")
    g = InProcessGateway(tmp_path_factory.mktemp("gwnarrow"), [pg_target(pg)],
                         {"p.yaml": NARROW_POLICY})
    g.start()
    yield g
    g.stop()


def test_copy_to_stdout_without_column_masks_gets_detectors(narrow: InProcessGateway) -> None:
    tok = narrow.token("agent-7")
    r = narrow.psql(tok, "COPY contacts_log TO STDOUT")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["Ada\tmail [MASKED:email]", "Alan\tcall [MASKED:phone]"]
    r = narrow.psql(tok, "COPY contacts_log TO STDOUT WITH (FORMAT csv)")
    assert r.returncode == 0 and "[MASKED:email]" in r.stdout
    r = narrow.psql(tok, "COPY customers TO STDOUT")
    assert r.returncode != 0 and "ssn-only" in r.stderr
    r2 = narrow.psql(tok, "COPY contacts_log TO STDOUT WITH (FORMAT binary)")
    assert r2.returncode != 0
    assert_no_leak(narrow, r.stdout + r.stderr + r2.stdout + r2.stderr)


def test_errors_keep_their_detail_when_no_column_mask_applies(narrow: InProcessGateway) -> None:
    tok = narrow.token("agent-7")
    r = narrow.psql(tok, "SELECT 'abc'::int")
    assert 'invalid input syntax for type integer: "abc"' in r.stderr
    r = narrow.psql(tok, "SELECT ssn::int FROM customers")
    assert r.returncode != 0 and '"***"' in r.stderr
    assert_no_leak(narrow, r.stdout + r.stderr)


def test_notification_payloads_get_detectors(narrow: InProcessGateway, pg: PgCluster) -> None:
    tok = narrow.token("agent-7")
    got: list[str] = []

    async def run() -> None:
        conn = await asyncpg.connect(host="127.0.0.1", port=narrow.port, user="agent",
                                     password=tok, database="orders", ssl=False)
        try:
            await conn.add_listener("chan", lambda *args: got.append(args[3]))
            await asyncio.to_thread(pg.psql, "NOTIFY chan, 'write to ada@example.com'",
                                    "orders")
            for _ in range(50):
                if got:
                    break
                await asyncio.sleep(0.1)
        finally:
            await conn.close()

    asyncio.run(asyncio.wait_for(run(), 30))
    assert got == ["write to [MASKED:email]"]
    assert_no_leak(narrow, repr(got))
