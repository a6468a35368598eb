"""Row plans (which column gets which mask) and the catalog codec, without a database."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from addons.model import Identity
from addons.policy import load_policies
from proxy_db import backend as be
from proxy_db import results
from proxy_db.catalog import (
    CatalogCache,
    Relation,
    function_query,
    parse_function,
    parse_relations,
    relations_query,
)
from proxy_db.gate import Gate

POLICY = """
rules:
  - {id: r, effect: allow, reason: ok, when: {sql: {statements: [select]}}}
masks:
  - {id: pii, when: {}, columns: ["customers.ssn"], strategy: redact}
  - {id: mail, when: {}, detectors: [email]}
"""
ME = Identity(sub="a", iss="i")
CUSTOMERS = Relation(100, "public", "customers", "r", {1: "id", 2: "name", 3: "email", 4: "ssn"})
VIEW = Relation(200, "public", "contacts", "v", {1: "id", 2: "tax_id"},
                " SELECT customers.id, customers.ssn AS tax_id FROM customers;")


class Ex:
    """The parts of relay.Exec a plan reads."""

    def __init__(self, verdict: Any, sql: str) -> None:
        self.verdict = verdict
        self.policy = verdict.policy
        self.sql = sql
        self.statement = None
        self.index = 0
        self.masked = 0
        self.masked_cols: set[str] = set()
        self.masked_rules: set[str] = set()


def setup(tmp_path: Path, sql: str) -> tuple[Ex, CatalogCache]:
    (tmp_path / "p.yaml").write_text(POLICY)
    verdict = Gate("db").decide(load_policies(tmp_path), ME, sql)
    cat = CatalogCache()
    cat.add(CUSTOMERS)
    cat.add(VIEW)
    return Ex(verdict, sql), cat


def field(name: str, oid: int = 0, att: int = 0, fmt: int = 0, typ: int = 25) -> Any:
    return be.FieldDescription(name, oid, att, typ, -1, -1, fmt)


def plan_for(tmp_path: Path, sql: str, *fields: Any) -> tuple[Any, Ex]:
    ex, cat = setup(tmp_path, sql)
    rd = be.RowDescription(tuple(fields))
    assert results.lookups_needed(rd, ex, cat) is None
    return results.build_plan(rd, ex, cat, ME, "db", b"k"), ex


def row(plan: Any, ex: Ex, *values: bytes | None) -> tuple[bytes | None, ...]:
    return be.DataRow.decode(plan.apply(be.DataRow(values).encode(), ex)[5:]).values


def test_columns_are_matched_by_oid_not_by_alias(tmp_path: Path) -> None:
    plan, ex = plan_for(tmp_path, 'SELECT ssn AS "harmless", name FROM customers',
                        field("harmless", 100, 4), field("name", 100, 2))
    assert row(plan, ex, b"123-45-6789", b"Ada") == (b"[MASKED:pii]", b"Ada")
    assert ex.masked_cols == {"customers.ssn"} and ex.masked_rules == {"pii"}


def test_derived_expressions_follow_lineage(tmp_path: Path) -> None:
    plan, ex = plan_for(tmp_path, "SELECT lower(ssn), upper(name) FROM customers",
                        field("lower"), field("upper"))
    assert row(plan, ex, b"123-45-6789", b"ADA") == (b"[MASKED:pii]", b"ADA")


def test_view_columns_follow_the_view_definition(tmp_path: Path) -> None:
    plan, ex = plan_for(tmp_path, "SELECT * FROM contacts", field("id", 200, 1),
                        field("tax_id", 200, 2))
    assert row(plan, ex, b"1", b"123-45-6789") == (b"1", b"[MASKED:pii]")


def test_unknown_lineage_masks_conservatively(tmp_path: Path) -> None:
    plan, ex = plan_for(tmp_path, "SELECT row_to_json(c) FROM customers c", field("row_to_json"))
    assert row(plan, ex, b'{"ssn": "123-45-6789"}') == (b"[MASKED:pii]",)


def test_binary_values_in_masked_columns_become_null(tmp_path: Path) -> None:
    plan, ex = plan_for(tmp_path, "SELECT ssn, email FROM customers",
                        field("ssn", 100, 4, fmt=1), field("email", 100, 3, fmt=1))
    assert row(plan, ex, b"123-45-6789", b"ada@example.com") == (None, b"[MASKED:email]")


def test_detectors_scan_every_text_value(tmp_path: Path) -> None:
    plan, ex = plan_for(tmp_path, "SELECT 'x'", field("?column?"))
    assert row(plan, ex, b"mail ada@example.com now") == (b"mail [MASKED:email] now",)


def test_row_width_mismatch_is_a_protocol_error(tmp_path: Path) -> None:
    from proxy_db.messages import ProtocolError

    plan, ex = plan_for(tmp_path, "SELECT ssn FROM customers", field("ssn", 100, 4))
    with pytest.raises(ProtocolError):
        plan.apply(be.DataRow((b"a", b"b")).encode(), ex)


def test_missing_oids_and_lineage_names_are_requested(tmp_path: Path) -> None:
    ex, cat = setup(tmp_path, "SELECT lower(x.secret) FROM other x")
    rd = be.RowDescription((field("a", 999, 1),))
    assert results.lookups_needed(rd, ex, cat) == ({999}, set())
    rd = be.RowDescription((field("lower"),))
    assert results.lookups_needed(rd, ex, cat) == (set(), {"public.other"})


@pytest.mark.parametrize("sql, whole", [
    ("SELECT row_to_json(c) FROM customers c", True),
    ("SELECT to_jsonb(c.*) FROM customers c", True),
    ("SELECT (c).ssn FROM customers c", True),
    ("SELECT c FROM customers c", True),
    ("SELECT c.* FROM customers c", False),
    ("SELECT lower(ssn) FROM customers", False),
])
def test_whole_row_references(sql: str, whole: bool) -> None:
    assert results.whole_row_reference(sql) is whole


def test_with_formats_applies_bind_result_formats() -> None:
    rd = be.RowDescription((field("a"), field("b")))
    assert [f.format for f in results.with_formats(rd, (1,)).fields] == [1, 1]
    assert [f.format for f in results.with_formats(rd, (0, 1)).fields] == [0, 1]


def test_catalog_query_round_trip() -> None:
    q = relations_query({5, 3}, {'public."odd"name'})
    msgs = q.request()
    assert msgs.startswith(b"P") and msgs.endswith(b"S\x00\x00\x00\x04")
    assert q.params == ("{3,5}", '{"public.\\"odd\\"name"}')
    answer = (be.RowDescription((field("oid"),)).encode()
              + be.DataRow((b"100", b"public", b"customers", b"r", b"1", b"id", None)).encode()
              + be.DataRow((b"100", b"public", b"customers", b"r", b"2", b"ssn", None)).encode()
              + be.CommandComplete("SELECT 2").encode() + be.ReadyForQuery(b"I").encode())
    assert q.feed(answer[:7]) is False
    assert q.feed(answer[7:]) is True
    (rel,) = parse_relations(q.rows)
    assert rel == Relation(100, "public", "customers", "r", {1: "id", 2: "ssn"}, None)
    f = function_query(764)
    assert f.params == ("764",)
    assert parse_function([("pg_catalog", "lo_import")]) == "pg_catalog.lo_import"
    assert parse_function([]) is None


def test_catalog_cache_by_name_and_clear() -> None:
    cat = CatalogCache()
    cat.add(CUSTOMERS)
    assert cat.by_name("customers") is CUSTOMERS and cat.by_name("public.customers") is CUSTOMERS
    assert cat.missing({100, 101, 0}) == {101}
    gen = cat.generation
    cat.clear()
    assert cat.by_name("customers") is None and cat.generation == gen + 1
