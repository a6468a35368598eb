"""Output-column lineage for result masking, with sqlglot (dialect "postgres").

`output_column_sources(sql)` says, for each column a SELECT (or a RETURNING list) yields, which
`table.column`s its value is computed from, so a mask on `users.ssn` also covers `lower(ssn)`,
`ssn || ''`, `substr(card, 1, 6)`, aliases, derived tables, CTEs, UNION branches and views.
Pure engine: no I/O. PostgreSQL's own grammar (pgparse) cross-checks the number of output
columns, and anything uncertain yields None so the gateway masks conservatively.
"""

from __future__ import annotations

from typing import Any, cast

import sqlglot
from sqlglot import exp
from sqlglot.optimizer.normalize_identifiers import normalize_identifiers
from sqlglot.optimizer.qualify import qualify
from sqlglot.optimizer.scope import build_scope

from addons.sql import _parse

_VIEW_DEPTH = 8


def output_column_sources(sql: str, schema: dict[str, dict[str, str]] | None = None,
                          views: dict[str, str] | None = None) -> list[set[str]] | None:
    """For each output column of a SELECT (or the RETURNING list of INSERT/UPDATE/DELETE),
    the set of `table.column` its value is computed from (`lower(ssn)`, `ssn || ''`,
    `substr(card, 1, 6)`, aliases, joins, subqueries, CTEs, UNION branches).

    `schema` maps bare table names to {column: type}; it is needed to expand `*`. `views` maps
    bare view names to their defining SELECT, so lineage sees through them. Columns that
    cannot be pinned to one table without a schema count for every table that may hold them.
    Returns None when the lineage cannot be determined: the caller then masks conservatively.
    """
    try:
        tree = _parse(sql)
        expected = _pg_output_count(tree)
        if expected is None:
            return None
        parsed = [e for e in sqlglot.parse(sql, dialect="postgres") if e is not None]
        if len(parsed) != 1:
            return None
        expr = parsed[0]
        seen = {i.name for i in normalize_identifiers(expr.copy(), dialect="postgres")
                .find_all(exp.Identifier)}
        if not _pg_names(tree) <= seen:
            return None  # sqlglot lexed the text differently from PostgreSQL
        if views:
            expr = _expand_views(expr, {k.lower(): v for k, v in views.items()})
        if isinstance(expr, (exp.Insert, exp.Update, exp.Delete)):
            result = _returning_sources(expr, schema)
        elif isinstance(expr, exp.Query):
            result = _query_sources(expr, schema)
        else:
            return None
        if result is None or (expected >= 0 and len(result) != expected):
            return None  # sqlglot and PostgreSQL disagree on the shape: do not trust either
        return result
    except Exception:  # lineage is best effort; None means "mask conservatively"
        return None


def _pg_names(node: Any) -> set[str]:
    """Every column and relation name in a libpg_query tree."""
    names: set[str] = set()
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            if "relname" in item:
                names.add(item["relname"])
            ref = item.get("ColumnRef")
            if ref is not None:
                names.update(f["String"]["sval"] for f in ref.get("fields", []) if "String" in f)
            stack.extend(v for v in item.values() if isinstance(v, (dict, list)))
    return names


def _pg_output_count(tree: list[dict[str, Any]]) -> int | None:
    """How many columns PostgreSQL's grammar says the statement returns (-1: has a `*`)."""
    if len(tree) != 1:
        return None
    ((name, body),) = tree[0]["stmt"].items()
    if name == "SelectStmt":
        while body.get("op", "SETOP_NONE") != "SETOP_NONE":
            body = body["larg"]["SelectStmt"] if "SelectStmt" in body["larg"] else body["larg"]
        targets = body.get("targetList")
        if targets is None and body.get("valuesLists"):
            targets = body["valuesLists"][0].get("List", {}).get("items", [])
    elif name in ("InsertStmt", "UpdateStmt", "DeleteStmt"):
        targets = body.get("returningList")
    else:
        return None
    if not targets:
        return None
    for t in targets:
        val = t.get("ResTarget", {}).get("val", {})
        if any("A_Star" in f for f in val.get("ColumnRef", {}).get("fields", [])):
            return -1
    return len(targets)


def _expand_views(expr: Any, views: dict[str, str]) -> Any:
    for _ in range(_VIEW_DEPTH):
        found = [t for t in expr.find_all(exp.Table)
                 if isinstance(t.this, exp.Identifier) and t.name.lower() in views]
        if not found:
            return expr
        for table in found:
            body = sqlglot.parse_one(views[table.name.lower()], dialect="postgres")
            alias = exp.TableAlias(this=exp.to_identifier(table.alias_or_name))
            table.replace(exp.Subquery(this=body, alias=alias))
    raise ValueError("views nested too deeply")


def _qualify(expr: Any, schema: dict[str, dict[str, str]] | None, qualify_columns: bool) -> Any:
    # sqlglot types `schema` as dict[str, object]; ours is the narrower {table: {column: type}}.
    return qualify(expr.copy(), dialect="postgres", schema=cast("dict[str, object] | None", schema),
                   qualify_columns=qualify_columns, validate_qualify_columns=False,
                   quote_identifiers=False, identify=False)


def _query_sources(expr: Any, schema: dict[str, dict[str, str]] | None) -> list[set[str]] | None:
    try:
        qualified = _qualify(expr, schema, qualify_columns=True)
    except Exception:  # e.g. a column it cannot place without a schema: do the placing here
        qualified = _qualify(expr, schema, qualify_columns=False)
    root = build_scope(qualified)
    if root is None:
        return None
    ctes = {cte.alias_or_name for cte in qualified.find_all(exp.CTE)}
    resolver = _Lineage({id(s.expression): s for s in root.traverse()}, ctes)
    outputs = resolver.width(root)
    if outputs is None:
        return None
    out = []
    for i in range(outputs):
        sources = resolver.by_index(root, i)
        if sources is None:
            return None
        out.append(sources)
    return out


class _Lineage:
    """Resolves output columns of sqlglot scopes to `table.column` sets (None = unknown)."""

    def __init__(self, scopes: dict[int, Any], ctes: set[str]) -> None:
        self.scopes = scopes
        self.ctes = ctes  # a CTE that sqlglot left as a table (DELETE ... RETURNING) is unknown
        self.visiting: set[tuple[int, Any]] = set()

    def width(self, scope: Any) -> int | None:
        e = scope.expression
        if isinstance(e, exp.SetOperation):
            return self.width(_branches(scope)[0])
        if not isinstance(e, exp.Select):
            return None
        if any(_is_star(s) for s in e.selects):
            return None  # `*` without a schema: the number of columns is unknown
        return len(e.selects)

    def by_index(self, scope: Any, index: int) -> set[str] | None:
        mark = (id(scope), index)
        if mark in self.visiting:  # recursive CTE: this branch adds nothing new
            return set()
        self.visiting.add(mark)
        try:
            e = scope.expression
            if isinstance(e, exp.SetOperation):
                out: set[str] = set()
                for branch in _branches(scope):
                    got = self.by_index(branch, index)
                    if got is None:
                        return None
                    out |= got
                return out
            if not isinstance(e, exp.Select) or any(_is_star(s) for s in e.selects):
                return None
            if index >= len(e.selects):
                return None
            return self.expression(e.selects[index], scope)
        finally:
            self.visiting.discard(mark)

    def by_name(self, scope: Any, name: str) -> set[str] | None:
        """Sources of the output column `name` of `scope`; empty set if it has none."""
        e = scope.expression
        if isinstance(e, exp.SetOperation):
            first = _branches(scope)[0]
            while isinstance(first.expression, exp.SetOperation):
                first = _branches(first)[0]
            if not isinstance(first.expression, exp.Select):
                return None
            names = [s.alias_or_name for s in first.expression.selects]
            if name in names:
                return self.by_index(scope, names.index(name))
            return None if any(_is_star(s) for s in first.expression.selects) else set()
        if not isinstance(e, exp.Select):
            return None
        for i, sel in enumerate(e.selects):
            if not _is_star(sel) and sel.alias_or_name == name:
                return self.by_index(scope, i)
        stars = [s for s in e.selects if _is_star(s)]
        if not stars:
            return set()
        out: set[str] = set()
        for star in stars:  # `name` may come through `*` / `t.*` from any source it covers
            qual = star.table if isinstance(star, exp.Column) else ""
            sources = [scope.sources.get(qual)] if qual else list(scope.sources.values())
            for src in sources:
                got = self.from_source(src, name)
                if got is None:
                    return None
                out |= got
        return out

    def from_source(self, src: Any, name: str) -> set[str] | None:
        if isinstance(src, exp.Table):
            if not isinstance(src.this, exp.Identifier):
                return None  # a table function: its columns come from its arguments
            if not src.db and src.name in self.ctes:
                return None
            return {f"{src.name}.{name}"}
        if src is not None and hasattr(src, "expression"):
            return self.by_name(src, name)
        return None

    def expression(self, node: Any, scope: Any) -> set[str] | None:
        out: set[str] = set()
        for col in node.find_all(exp.Column):
            if isinstance(col.this, exp.Star):
                return None
            got = self.column(col, self.owner(col, scope))
            if got is None:
                return None
            out |= got
        return out

    def owner(self, node: Any, default: Any) -> Any:
        parent = node.parent
        while parent is not None:
            scope = self.scopes.get(id(parent))
            if scope is not None:
                return scope
            parent = parent.parent
        return default

    def column(self, col: Any, scope: Any) -> set[str] | None:
        name, qual = col.name, col.table
        s = scope
        if qual:
            while s is not None:
                if qual in s.sources:
                    return self.from_source(s.sources[qual], name)
                s = s.parent
            return None
        out: set[str] = set()  # unplaced column: every source in reach may hold it
        while s is not None:
            for src in s.sources.values():
                got = self.from_source(src, name)
                if got is None:
                    return None
                out |= got
            s = s.parent
        return out or None


def _branches(scope: Any) -> list[Any]:
    """The two sides of a UNION/INTERSECT/EXCEPT scope (the attribute was renamed in sqlglot)."""
    return getattr(scope, "set_operation_scopes", None) or getattr(scope, "union_scopes", [])


def _is_star(node: Any) -> bool:
    return isinstance(node, exp.Star) or (isinstance(node, exp.Column)
                                          and isinstance(node.this, exp.Star))


def _returning_sources(expr: Any, schema: dict[str, dict[str, str]] | None
                       ) -> list[set[str]] | None:
    expr = normalize_identifiers(expr.copy(), dialect="postgres")
    returning = expr.args.get("returning")
    if returning is None:
        return None
    ctes = {cte.alias_or_name for cte in expr.find_all(exp.CTE)}
    tables: dict[str, str] = {}
    for table in expr.find_all(exp.Table):
        if table.find_ancestor(exp.Select, exp.CTE) is None:
            if not isinstance(table.this, exp.Identifier) or (not table.db
                                                              and table.name in ctes):
                return None
            tables[table.alias_or_name] = table.name
            tables.setdefault(table.name, table.name)
    target = expr.this.this if isinstance(expr.this, exp.Schema) else expr.this
    out: list[set[str]] = []
    for item in returning.expressions:
        if any(True for _ in item.find_all(exp.Select)):
            return None
        if _is_star(item):
            if len(set(tables.values())) != 1 or not schema or target.name not in schema:
                return None
            out.extend({f"{target.name}.{c}"} for c in schema[target.name])
            continue
        sources: set[str] = set()
        for col in item.find_all(exp.Column):
            if col.table:
                if col.table not in tables:
                    return None
                sources.add(f"{tables[col.table]}.{col.name}")
            else:
                sources |= {f"{t}.{col.name}" for t in set(tables.values())}
        out.append(sources)
    return out
