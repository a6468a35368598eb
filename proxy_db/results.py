"""Result masking for the Postgres gateway: which column of a result gets which mask. Pure.

For each result (a RowDescription), the masks in force are the statement's own (masks whose
`when` matched one of its operations) plus, for every table the columns come from, the masks
that would apply to `SELECT` on that table; so rows reached through FETCH, cursors, views or
functions returning a table's rows are masked like a plain SELECT of them.

A column is covered by a `columns:` mask when one of its names matches a glob: `table.column`
and `schema.table.column` of the column itself (from the RowDescription's table OID and
attribute number, so aliases do not matter), plus, for expressions (table OID 0) and view
columns, the source columns that sqlglot lineage finds (`lower(ssn)`, `ssn || ''`,
`substr(card, 1, 6)`). When lineage cannot tell, the column is masked (fail closed). Detectors
scan every other text value. A binary-format value in a masked column becomes NULL; a
binary-format value of another type becomes NULL when a detector hits its text form.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import pgparse

from addons import masking
from addons import sql as sqlmod
from addons.model import Operation
from addons.policy import glob_match, matching_masks
from addons.sql_lineage import output_column_sources
from proxy_db.backend import DataRow, FieldDescription, RowDescription
from proxy_db.catalog import CatalogCache, Relation
from proxy_db.messages import CopyData, ProtocolError

PASS = object()  # sentinel: rows go through untouched
_VIEW_KINDS = ("v", "m")
# Types whose binary form is their UTF-8 text (so a detector can rewrite them in place).
_TEXT_BINARY = frozenset((25, 1043, 1042, 19, 114, 18))
_INT_BINARY = {21: ">h", 23: ">i", 20: ">q"}
_LINEAGE_DEPTH = 4


def with_formats(rd: RowDescription, formats: tuple[int, ...]) -> RowDescription:
    """A statement's RowDescription with the result formats a Bind asked for."""
    if not formats:
        return rd
    fields = []
    for i, f in enumerate(rd.fields):
        fmt = formats[0] if len(formats) == 1 else (formats[i] if i < len(formats) else 0)
        fields.append(FieldDescription(f.name, f.table_oid, f.attnum, f.type_oid, f.type_size,
                                       f.type_mod, fmt))
    return RowDescription(tuple(fields))


# ---------------------------------------------------------------------------------------------
# Which masks, which names


def _table_masks(policy: Any, identity: Any, target: str, rel: Relation) -> list[Any]:
    op = Operation(protocol="postgres", target=target, summary=f"select {rel.qualified}",
                   sql={"kind": "select", "table": rel.qualified,
                        "columns": sorted({f"{rel.name}.{c}" for c in rel.columns.values()}
                                          | set(rel.columns.values())),
                        "functions": [], "unbounded": False})
    return matching_masks(policy, identity, op)


def _masks_for(rd: RowDescription, ex: Any, catalog: CatalogCache, identity: Any,
               target: str) -> dict[str, Any]:
    masks = {m.id: m for m in ex.verdict.masks}
    for oid in {f.table_oid for f in rd.fields if f.table_oid}:
        rel = catalog.relations.get(oid)
        if rel is not None:
            for m in _table_masks(ex.policy, identity, target, rel):
                masks.setdefault(m.id, m)
    return masks


def _needs_lineage(rd: RowDescription, catalog: CatalogCache) -> bool:
    for f in rd.fields:
        if not f.table_oid:
            return True
        rel = catalog.relations.get(f.table_oid)
        if rel is not None and rel.kind in _VIEW_KINDS:
            return True
    return False


def _statement_sql(ex: Any) -> str | None:
    """The text of the statement that produced the current result (one of a Query's)."""
    if ex.statement is not None or ex.index == 0 and ex.verdict.statements <= 1:
        return ex.sql or None
    try:
        tree = pgparse.parse(ex.sql)
    except Exception:  # noqa: BLE001 - no lineage: mask conservatively
        return None
    if ex.index >= len(tree):
        return None
    raw = ex.sql.encode()
    item = tree[ex.index]
    start, length = item.get("stmt_location", 0), item.get("stmt_len", 0)
    return raw[start:start + length if length else len(raw)].decode("utf-8", "replace")


def whole_row_reference(sql: str) -> bool:
    """Does `sql` use a whole row as a value (`row_to_json(c)`, `to_jsonb(c.*)`, `(c).ssn`,
    `ROW(c.*)`)? Column lineage cannot see through those, so the caller masks conservatively.
    Unparseable text counts as yes."""
    try:
        tree = pgparse.parse(sql)
    except Exception:  # noqa: BLE001
        return True
    names: set[str] = set()
    refs: list[tuple[list[Any], bool]] = []

    def walk(node: Any, top_target: bool) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item, False)
            return
        if not isinstance(node, dict):
            return
        for key, val in node.items():
            if key == "RangeVar":
                names.add(val.get("relname", ""))
                names.add((val.get("alias") or {}).get("aliasname", ""))
            elif key in ("RangeSubselect", "RangeFunction", "CommonTableExpr"):
                names.add((val.get("alias") or {}).get("aliasname", "") if isinstance(
                    val.get("alias"), dict) else "")
                names.add(val.get("ctename", ""))
            if key == "ColumnRef":
                refs.append((val.get("fields") or [], top_target))
            elif key == "ResTarget":
                walk(val.get("val"), True)
                continue
            walk(val, False)

    walk(tree, False)
    names.discard("")
    for fields, top in refs:
        if any("A_Star" in f for f in fields) and not top:
            return True  # c.* inside an expression: a whole row
        if len(fields) == 1 and "String" in fields[0] and fields[0]["String"].get("sval") in names:
            return True  # a bare relation name or alias used as a value
    return False


def _sources(sql: str | None, schema: dict, views: dict) -> list[set[str]] | None:
    if not sql or whole_row_reference(sql):
        return None
    return output_column_sources(sql, schema, views)


def _tables_of(sql: str) -> set[str]:
    try:
        cls = sqlmod.classify_cached(sql)
    except sqlmod.SqlError:
        return set()
    return {op.table for op in cls.operations if op.table}


def _lineage_names(rd: RowDescription, ex: Any, catalog: CatalogCache) -> set[str]:
    """Relation names lineage needs (the statement's tables and what its views read)."""
    names: set[str] = set()
    sql = _statement_sql(ex)
    if sql:
        names |= _tables_of(sql)
    frontier = [catalog.relations[f.table_oid] for f in rd.fields
                if f.table_oid in catalog.relations]
    for _ in range(_LINEAGE_DEPTH):
        frontier += [r for n in names if (r := catalog.by_name(n)) is not None]
        nxt = []
        for rel in frontier:
            if rel.kind in _VIEW_KINDS and rel.viewdef:
                for t in _tables_of(rel.viewdef):
                    if t not in names:
                        names.add(t)
                        r = catalog.by_name(t)
                        if r is not None:
                            nxt.append(r)
        if not nxt:
            break
        frontier = nxt
    return names


def lookups_needed(rd: RowDescription, ex: Any, catalog: CatalogCache
                   ) -> tuple[set[int], set[str]] | None:
    """OIDs and names the catalog must resolve before a plan can be built (None: none)."""
    missing = catalog.missing({f.table_oid for f in rd.fields})
    if missing:
        return missing, set()
    if not any(m.columns for m in ex.verdict.masks) and not _any_column_masks(ex.policy):
        return None
    if not _needs_lineage(rd, catalog):
        return None
    names = {n for n in _lineage_names(rd, ex, catalog) if n not in catalog.names}
    return (set(), names) if names else None


def _any_column_masks(policy: Any) -> bool:
    return any(m.columns for m in getattr(policy, "masks", ()))


def _schema(catalog: CatalogCache, names: set[str]) -> tuple[dict, dict]:
    schema: dict[str, dict[str, str]] = {}
    views: dict[str, str] = {}
    for n in names:
        rel = catalog.by_name(n)
        if rel is None:
            continue
        schema[rel.name] = {c: "text" for c in rel.columns.values()}
        if rel.kind in _VIEW_KINDS and rel.viewdef:
            views[rel.name] = rel.viewdef.strip().rstrip(";")
    return schema, views


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True, slots=True)
class ColumnRule:
    index: int
    name: str  # for the audit record: table.column (never a value)
    mask: Any  # MaskRule of a matching `columns:` mask, or None
    det_masks: tuple[Any, ...]  # masks with detectors (each detector uses its mask's strategy)
    binary: bool
    type_oid: int


class RowPlan:
    """Rewrites DataRows. Built once per result shape; `apply` is called per row."""

    __slots__ = ("rules", "width", "key")

    def __init__(self, rules: list[ColumnRule], width: int, key: bytes) -> None:
        self.rules = rules
        self.width = width
        self.key = key

    def apply(self, raw: bytes, ex: Any) -> bytes:
        row = DataRow.decode(raw[5:])
        if len(row.values) != self.width:
            raise ProtocolError("DataRow width differs from its RowDescription")
        values = list(row.values)
        changed = False
        for rule in self.rules:
            value = values[rule.index]
            if value is None:
                continue
            new, rules = _mask_value(rule, value, self.key)
            if rules:
                values[rule.index] = new
                changed = True
                ex.masked += 1
                ex.masked_cols.add(rule.name)
                ex.masked_rules.update(rules)
        return DataRow(tuple(values)).encode() if changed else raw


class CopyMasker:
    """Detector masks on COPY TO text/CSV lines. Replacements (`[MASKED:email]`, `****1234`,
    `hash:...`) contain no tab, comma, quote, backslash or newline, so lines stay well-formed."""

    __slots__ = ("masks", "key")

    def __init__(self, masks: list[Any], key: bytes) -> None:
        self.masks = masks
        self.key = key

    def apply_copy(self, raw: bytes, ex: Any) -> bytes:
        res = masking.mask_text(raw[5:].decode("utf-8", "replace"), self.masks, self.key)
        if not res.count:
            return raw
        ex.masked += res.count
        ex.masked_rules.update(res.rules)
        return CopyData(str(res.value).encode()).encode()


def build_plan(rd: RowDescription, ex: Any, catalog: CatalogCache, identity: Any, target: str,
               key: bytes) -> Any:
    masks = _masks_for(rd, ex, catalog, identity, target)
    if not masks:
        return PASS
    col_masks = [m for m in masks.values() if m.columns]
    det_masks = tuple(m for m in masks.values() if m.detectors)
    stmt_sources: list[set[str]] | None | bool = False  # False: not computed yet
    view_sources: dict[int, list[set[str]] | None] = {}
    lineage_names = _lineage_names(rd, ex, catalog) if col_masks else set()
    schema, views = _schema(catalog, lineage_names) if col_masks else ({}, {})
    rules = []
    for i, f in enumerate(rd.fields):
        names: list[str] = []
        known = True
        label = f.name
        rel = catalog.relations.get(f.table_oid) if f.table_oid else None
        if f.table_oid:
            col = rel.column(f.attnum) if rel is not None else None
            if rel is None or col is None:
                known = False
            else:
                label = f"{rel.name}.{col}"
                names += [label, f"{rel.qualified}.{col}"]
                if rel.kind in _VIEW_KINDS and col_masks:
                    if rel.oid not in view_sources:
                        view_sources[rel.oid] = _sources(
                            (rel.viewdef or "").strip().rstrip(";"), schema, views)
                    src = view_sources[rel.oid]
                    if src is None or f.attnum - 1 >= len(src):
                        known = False
                    else:
                        names += sorted(src[f.attnum - 1])
        elif col_masks:
            if stmt_sources is False:
                stmt_sources = _sources(_statement_sql(ex), schema, views)
            if not isinstance(stmt_sources, list) or i >= len(stmt_sources):
                known = False
            else:
                names += sorted(stmt_sources[i])
        mask = None
        if col_masks:
            if not known:
                mask = col_masks[0]  # cannot tell where the value comes from: mask it
            else:
                mask = next((m for m in col_masks
                             if any(glob_match(m.columns, n) for n in names)), None)
        if mask is None and not det_masks:
            continue
        rules.append(ColumnRule(i, label, mask, det_masks, f.format == 1, f.type_oid))
    if not rules:
        return PASS
    return RowPlan(rules, len(rd.fields), key)


# ---------------------------------------------------------------------------------------------
# Values


def _mask_value(rule: ColumnRule, value: bytes, key: bytes) -> tuple[bytes | None, tuple[str, ...]]:
    """(new value, ids of the masks that changed it); () when untouched."""
    if rule.mask is not None:
        if rule.binary:
            return None, (rule.mask.id,)
        masked = masking.apply_strategy(value.decode("utf-8", "replace"), rule.mask, key)
        return (None if masked is None else masked.encode()), (rule.mask.id,)
    if rule.binary:
        text = _binary_text(value, rule.type_oid)
        if text is None:
            return value, ()
        res = masking.mask_text(text, rule.det_masks, key)
        if not res.count:
            return value, ()
        if rule.type_oid in _TEXT_BINARY:  # binary form of text types is their UTF-8
            return str(res.value).encode(), res.rules
        return None, res.rules
    res = masking.mask_text(value.decode("utf-8", "replace"), rule.det_masks, key)
    if not res.count:
        return value, ()
    return str(res.value).encode(), res.rules


def _binary_text(value: bytes, type_oid: int) -> str | None:
    fmt = _INT_BINARY.get(type_oid)
    if fmt is not None and len(value) == struct.calcsize(fmt):
        return str(struct.unpack(fmt, value)[0])
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return None


def scrub_error_fields(fields: tuple[tuple[str, str], ...], detectors: tuple[str, ...],
                       hide_values: bool) -> tuple[tuple[str, str], ...]:
    """Upstream error/notice text: detectors on every text field; when column masks are in
    force, DETAIL (which echoes rows and keys) is replaced and a quoted value at the end of the
    message (`invalid input syntax for type integer: "..."`) is hidden."""
    out = []
    for code, value in fields:
        if code in ("M", "D", "H", "W", "q", "s", "t", "c", "d", "n", "p", "P"):
            if hide_values and code == "D":
                value = "(detail hidden by portcullis: it may contain masked values)"
            elif hide_values and code == "M":
                value = _hide_quoted_value(value)
            value = redact(value, detectors)
        out.append((code, value))
    return tuple(out)


def redact(text: str, detectors: tuple[str, ...]) -> str:
    return masking.redact_detected(text, detectors) if detectors and text else text


def _hide_quoted_value(message: str) -> str:
    colon = message.rfind(': "')
    if colon >= 0 and message.endswith('"'):
        return message[:colon] + ': "***"'
    return message
