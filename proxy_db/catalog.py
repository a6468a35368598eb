"""Catalog knowledge for result masking, sans-IO.

RowDescription names each result column by (table OID, attribute number). Masks name columns as
`table.column` globs, so the gateway resolves OIDs through the upstream's catalog and caches the
answer per upstream (`CatalogCache`). The queries run on a separate, gateway-owned connection to
the same upstream (see server.py) with the extended protocol and text parameters, so no name is
ever spliced into SQL text. `CatalogQuery` builds the request bytes and parses the answer.

Cache invalidation: table OIDs are stable while a table exists; a DDL statement through the
gateway clears the cache of its upstream (a dropped table's OID could be reused).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy_db.backend import (
    CommandComplete,
    DataRow,
    ErrorResponse,
    NoticeResponse,
    ReadyForQuery,
    RowDescription,
    decode_backend,
)
from proxy_db.framing import MessageFramer
from proxy_db.messages import Bind, Execute, Parse, ProtocolError, Sync

RELATIONS_SQL = """\
SELECT c.oid, n.nspname, c.relname, c.relkind, a.attnum, a.attname,
       CASE WHEN c.relkind IN ('v', 'm') THEN pg_catalog.pg_get_viewdef(c.oid) END
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_catalog.pg_attribute a
  ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE c.oid = ANY($1::pg_catalog.oid[])
   OR c.oid = ANY(ARRAY(SELECT pg_catalog.to_regclass(x)::pg_catalog.oid
                        FROM pg_catalog.unnest($2::pg_catalog.text[]) AS x))
ORDER BY c.oid, a.attnum"""

FUNCTION_SQL = """\
SELECT n.nspname, p.proname FROM pg_catalog.pg_proc p
JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace WHERE p.oid = $1::pg_catalog.oid"""

CATALOG_MESSAGE_LIMIT = 16 * 1024 * 1024


class CatalogError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Relation:
    oid: int
    schema: str
    name: str
    kind: str  # pg_class.relkind: r table, v view, m matview, p partitioned, f foreign
    columns: dict[int, str] = field(default_factory=dict)
    viewdef: str | None = None

    def column(self, attnum: int) -> str | None:
        return self.columns.get(attnum)

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


class CatalogCache:
    """Per-upstream cache: relation OID -> Relation, qualified name -> OID, function names."""

    def __init__(self) -> None:
        self.relations: dict[int, Relation] = {}
        self.names: dict[str, int] = {}
        self.functions: dict[int, str] = {}
        self.generation = 0

    def add(self, rel: Relation) -> None:
        self.relations[rel.oid] = rel
        self.names[rel.qualified] = rel.oid
        self.names.setdefault(rel.name, rel.oid)

    def by_name(self, name: str) -> Relation | None:
        oid = self.names.get(name)
        if oid is None and "." not in name:
            oid = self.names.get(f"public.{name}")
        return self.relations.get(oid) if oid is not None else None

    def missing(self, oids: set[int]) -> set[int]:
        return {o for o in oids if o and o not in self.relations}

    def clear(self) -> None:
        self.relations.clear()
        self.names.clear()
        self.functions.clear()
        self.generation += 1


def _array_literal(items: list[str]) -> str:
    """A text[] literal for a *parameter value* (never SQL text): quote every element."""
    quoted = ['"' + i.replace("\\", "\\\\").replace('"', '\\"') + '"' for i in items]
    return "{" + ",".join(quoted) + "}"


class CatalogQuery:
    """One parameterised query on the catalog connection (unnamed statement + Sync)."""

    def __init__(self, sql: str, params: tuple[str | None, ...]) -> None:
        self.sql = sql
        self.params = params
        self._framer = MessageFramer(CATALOG_MESSAGE_LIMIT)
        self.rows: list[tuple[str | None, ...]] = []
        self.error: str | None = None
        self.done = False

    def request(self) -> bytes:
        values = tuple(p.encode() if p is not None else None for p in self.params)
        return b"".join((Parse("", self.sql).encode(), Bind("", "", (), values, ()).encode(),
                         Execute("", 0).encode(), Sync().encode()))

    def feed(self, data: bytes) -> bool:
        try:
            frames = self._framer.feed(data)
            for type_, raw in frames:
                msg = decode_backend(type_, raw[5:])
                if isinstance(msg, DataRow):
                    self.rows.append(tuple(v.decode() if v is not None else None
                                           for v in msg.values))
                elif isinstance(msg, ErrorResponse) and not isinstance(msg, NoticeResponse):
                    self.error = f"{msg.sqlstate}: {msg.get('M')}"
                elif isinstance(msg, ReadyForQuery):
                    self.done = True
                elif isinstance(msg, (RowDescription, CommandComplete)):
                    pass
        except (ProtocolError, UnicodeDecodeError) as e:
            raise CatalogError(f"catalog connection: {e}") from e
        return self.done


def relations_query(oids: set[int], names: set[str]) -> CatalogQuery:
    oid_lit = "{" + ",".join(str(o) for o in sorted(oids)) + "}"
    return CatalogQuery(RELATIONS_SQL, (oid_lit, _array_literal(sorted(names))))


def parse_relations(rows: list[tuple[str | None, ...]]) -> list[Relation]:
    by_oid: dict[int, dict] = {}
    for oid, schema, name, kind, attnum, attname, viewdef in rows:
        if oid is None or schema is None or name is None:
            continue
        entry = by_oid.setdefault(int(oid), {"schema": schema, "name": name, "kind": kind or "r",
                                             "columns": {}, "viewdef": viewdef})
        if attnum is not None and attname is not None:
            entry["columns"][int(attnum)] = attname
    return [Relation(oid, e["schema"], e["name"], e["kind"], e["columns"], e["viewdef"])
            for oid, e in by_oid.items()]


def function_query(oid: int) -> CatalogQuery:
    return CatalogQuery(FUNCTION_SQL, (str(oid),))


def parse_function(rows: list[tuple[str | None, ...]]) -> str | None:
    if not rows or rows[0][0] is None or rows[0][1] is None:
        return None
    return f"{rows[0][0]}.{rows[0][1]}"
