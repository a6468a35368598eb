"""SQL statement classification with PostgreSQL's own grammar (libpg_query via pgparse).

Pure engine (no mitmproxy, no asyncio): `classify(sql)` turns one simple-Query message (or one
Parse text) into operations, one per (statement kind, table) found anywhere in the parse tree:
CTEs (data-modifying ones too), subqueries, EXPLAIN's inner statement, every statement of a
multi-statement message, PREPARE's inner statement, INSERT ... SELECT, MERGE actions, functions
in any expression. Text that the parser rejects raises `SqlError` (the gateway denies it).

The parser and the server must lex the text the same way, so statements that would make them
disagree are refused: turning `standard_conforming_strings` off (then `'a\\''` ends earlier on
the server than in the parser) and switching `client_encoding` away from UTF-8. Changing
`search_path` adds an `other` operation because later unqualified names (reported as
`public.name`) would no longer mean what the classifier says. See docs/sql.md.

Output-column lineage for result masking (`output_column_sources`) lives in
addons/sql_lineage.py (sqlglot), imported only when used. This file is longer than the house
~400 lines because the tree walker and its handler table are one unit.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

import pgparse

from addons.model import Operation

STATEMENT_KINDS = (
    "select insert update delete merge truncate copy_to copy_from copy_program create alter drop "
    "grant revoke role set show transaction prepare execute deallocate explain call do lock "
    "maintenance listen_notify other"
).split()

MAX_SQL_CHARS = 4 * 1024 * 1024  # larger texts are refused rather than parsed
SUMMARY_CHARS = 160
_CACHED_MAX_CHARS = 16 * 1024  # only short texts go into the classify_cached LRU


class SqlError(ValueError):
    """Statement text that cannot be classified exactly; the gateway denies it."""


@dataclass(frozen=True, slots=True)
class SqlOp:
    """One (kind, table) a message touches. `table` is `schema.table` or None."""

    kind: str
    table: str | None
    columns: tuple[str, ...] = ()
    functions: tuple[str, ...] = ()
    unbounded: bool = False

    def __getitem__(self, key: str) -> Any:
        if key not in ("kind", "table", "columns", "functions", "unbounded"):
            raise KeyError(key)
        return getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "table": self.table, "columns": list(self.columns),
                "functions": list(self.functions), "unbounded": self.unbounded}


@dataclass(frozen=True, slots=True)
class Classification:
    """What a message does. `normalized` has constants replaced and comments removed.

    `executes` names the prepared statements the message EXECUTEs (resolved by
    `classify_in_session`); `events` are ("prepare", name, ops) / ("deallocate", name|None)
    in statement order, for the session's PreparedRegistry.
    """

    operations: tuple[SqlOp, ...]
    statements: int
    fingerprints: tuple[str, ...]
    normalized: str
    key: str
    executes: tuple[str, ...] = ()
    events: tuple[tuple[Any, ...], ...] = ()

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(op.kind for op in self.operations))

    @property
    def session_dependent(self) -> bool:
        """True when the meaning depends on session state (EXECUTE): never decision-cache it."""
        return bool(self.executes)


# ---------------------------------------------------------------------------------------------
# Statement node type -> kind

_KIND_OF = {
    "SelectStmt": "select", "InsertStmt": "insert", "UpdateStmt": "update",
    "DeleteStmt": "delete", "MergeStmt": "merge", "TruncateStmt": "truncate",
    "IndexStmt": "create", "ViewStmt": "create", "RuleStmt": "create", "DefineStmt": "create",
    "CompositeTypeStmt": "create", "ImportForeignSchemaStmt": "create",
    "RenameStmt": "alter", "CommentStmt": "alter", "SecLabelStmt": "alter",
    "ReassignOwnedStmt": "alter", "AlterDefaultPrivilegesStmt": "alter",
    "DropOwnedStmt": "drop", "DropdbStmt": "drop",
    "CreateRoleStmt": "role", "AlterRoleStmt": "role", "AlterRoleSetStmt": "role",
    "DropRoleStmt": "role",
    "VariableShowStmt": "show", "TransactionStmt": "transaction",
    "DiscardStmt": "set", "ConstraintsSetStmt": "set",
    "ExecuteStmt": "execute", "DeallocateStmt": "deallocate", "ExplainStmt": "explain",
    "CallStmt": "call", "DoStmt": "do", "LockStmt": "lock",
    "VacuumStmt": "maintenance", "ClusterStmt": "maintenance", "ReindexStmt": "maintenance",
    "CheckPointStmt": "maintenance", "RefreshMatViewStmt": "maintenance",
    "ListenStmt": "listen_notify", "UnlistenStmt": "listen_notify", "NotifyStmt": "listen_notify",
    "FetchStmt": "select", "ClosePortalStmt": "deallocate",
}
# DROP objects that name relations (their names become tables)
_DROP_RELATIONS = {"OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW", "OBJECT_SEQUENCE",
                   "OBJECT_INDEX", "OBJECT_FOREIGN_TABLE"}
# Functions that run SQL given as text or read tables named by a string: the classifier
# cannot see what they do, so they add an `other` operation.
_OPAQUE_FUNCTIONS = frozenset("""
query_to_xml query_to_xmlschema query_to_xml_and_xmlschema cursor_to_xml cursor_to_xmlschema
table_to_xml table_to_xmlschema table_to_xml_and_xmlschema schema_to_xml schema_to_xmlschema
schema_to_xml_and_xmlschema database_to_xml database_to_xmlschema database_to_xml_and_xmlschema
ts_stat dblink dblink_exec dblink_open dblink_fetch dblink_send_query dblink_get_result
""".split())
_SKIP = frozenset(("String", "A_Const", "Integer", "Float", "Boolean", "BitString", "ParamRef",
                   "SQLValueFunction", "TypeName", "A_Star", "RoleSpec", "Alias"))
_ROLE_GUCS = ("role", "session_authorization")
TOP = "<statement>"  # walker context: a node in statement position (not a kind)


def _const_str(node: Any) -> str | None:
    """The text of an A_Const/String node, or None when it is not a constant."""
    if not isinstance(node, dict):
        return None
    body = node.get("A_Const", node)
    for key in ("sval", "ival", "fval", "boolval"):
        if key in body:
            val = body[key]
            if isinstance(val, dict):
                val = val.get(key, 0 if key == "ival" else False if key == "boolval" else "")
            return str(val).lower() if key == "boolval" else str(val)
    if "String" in node:
        return node["String"].get("sval", "")
    return None


def _check_guc(name: str, value: str | None, *, reset: bool) -> None:
    """Refuse settings that would make the server lex text differently from the parser."""
    if reset:
        return
    if name == "standard_conforming_strings":
        if value is None or value.strip().lower() not in ("on", "true", "yes", "1", "t", "y"):
            raise SqlError("standard_conforming_strings can only be on behind the gateway")
    elif name == "client_encoding":
        clean = re.sub(r"[^0-9a-z]", "", (value or "").lower())
        if clean not in ("utf8", "unicode"):
            raise SqlError("client_encoding can only be UTF8 behind the gateway")


class _Stmt:
    """What one top-level statement touches, before columns are attributed to tables."""

    __slots__ = ("ops", "marked", "aliases", "colrefs", "targets", "functions", "extra")

    def __init__(self) -> None:
        self.ops: dict[tuple[str, str], bool] = {}  # (kind, table) -> unbounded
        self.marked: list[str] = []  # kinds seen (a table-less op unless a table op exists)
        self.aliases: dict[str, set[str]] = {}
        self.colrefs: list[tuple[str | None, str]] = []
        self.targets: list[tuple[str, str]] = []
        self.functions: set[str] = set()
        self.extra: list[SqlOp] = []  # finished ops of PREPARE's inner statement

    def add(self, kind: str, table: str, unbounded: bool = False) -> None:
        key = (kind, table)
        self.ops[key] = self.ops.get(key, False) or unbounded

    def mark(self, kind: str) -> None:
        if kind not in self.marked:
            self.marked.append(kind)

    def finish(self) -> list[SqlOp]:
        tables = {t for _, t in self.ops}
        per_table: dict[str, set[str]] = {t: set() for t in tables}
        everything: set[str] = set()
        for qual, name in self.colrefs:
            everything.add(name)
            for t in (self.aliases.get(qual) if qual else None) or tables:
                per_table[t].add(name)
        for t, name in self.targets:
            everything.add(name)
            per_table.setdefault(t, set()).add(name)
        funcs = tuple(sorted(self.functions))
        out = []
        for (kind, table), unbounded in self.ops.items():
            bare = table.split(".", 1)[-1]
            cols = per_table[table]
            out.append(SqlOp(kind, table, tuple(sorted(cols | {f"{bare}.{c}" for c in cols})),
                             funcs, unbounded))
        with_table = {k for k, _ in self.ops}
        for kind in self.marked:
            if kind not in with_table:
                out.append(SqlOp(kind, None, tuple(sorted(everything)), funcs, False))
        return out + self.extra


class _Walker:
    """Walks libpg_query's JSON tree; `kind` is what a table met here is being used for."""

    def __init__(self) -> None:
        self.stmt = _Stmt()
        self.executes: list[str] = []
        self.events: list[tuple[Any, ...]] = []
        # True once the outcome depended on a constant's value (SET, set_config): such a
        # classification must not be shared by texts that differ only in constants.
        self.read_constants = False
        self.default_schema = "public"  # CREATE SCHEMA s CREATE TABLE t creates s.t

    # -- generic traversal ----------------------------------------------------------------
    def walk(self, node: Any, kind: str, ctes: frozenset[str]) -> None:
        if type(node) is list:
            for item in node:
                if type(item) is dict or type(item) is list:
                    self.walk(item, kind, ctes)
            return
        if type(node) is not dict:
            return
        if len(node) == 1:
            ((name, body),) = node.items()
            if name[0].isupper():
                if name in _SKIP:
                    return
                handler = _HANDLERS.get(name)
                if handler is not None:
                    handler(self, body, kind, ctes)
                elif name.endswith("Stmt"):
                    self.statement(name, body, ctes)
                else:
                    self.fields(body, kind, ctes)
                return
        if "relname" in node:
            self.range_var(node, kind, ctes)
        elif "funcformat" in node:
            self.func_call(node, kind, ctes)
        else:
            self.fields(node, kind, ctes)

    def fields(self, body: dict[str, Any], kind: str, ctes: frozenset[str],
               skip: tuple[str, ...] = ()) -> None:
        for key, val in body.items():
            if (type(val) is dict or type(val) is list) and key not in skip:
                self.walk(val, kind, ctes)

    def statement(self, name: str, body: dict[str, Any], ctes: frozenset[str]) -> None:
        kind = _KIND_OF.get(name)
        if kind is None:
            if name.startswith("Create"):
                kind = "create"
            elif name.startswith("Alter"):
                kind = "alter"
            elif name.startswith("Drop"):
                kind = "drop"
            else:
                kind = "other"
        self.stmt.mark(kind)
        self.fields(body, kind, ctes)

    # -- leaves ---------------------------------------------------------------------------
    def table_name(self, rv: dict[str, Any], ctes: frozenset[str]) -> list[str]:
        rel = rv.get("relname", "")
        schema = rv.get("schemaname")
        if schema:
            return [f"{schema}.{rel}"]
        if rel in ctes:
            return []
        if rv.get("relpersistence") == "t":
            return [f"pg_temp.{rel}"]
        if rel.startswith("pg_"):  # pg_catalog is searched before public
            return [f"pg_catalog.{rel}", f"{self.default_schema}.{rel}"]
        return [f"{self.default_schema}.{rel}"]

    def range_var(self, rv: dict[str, Any], kind: str, ctes: frozenset[str],
                  unbounded: bool = False) -> list[str]:
        if kind == TOP:
            kind = "other"
        names = self.table_name(rv, ctes)
        for table in names:
            self.stmt.add(kind, table, unbounded)
            for alias in (rv.get("relname"), (rv.get("alias") or {}).get("aliasname")):
                if alias:
                    self.stmt.aliases.setdefault(alias, set()).add(table)
        return names

    def column_ref(self, body: dict[str, Any], kind: str, ctes: frozenset[str]) -> None:
        fields = body.get("fields") or []
        names = [f["String"].get("sval", "") if "String" in f else "*" for f in fields]
        if names:
            self.stmt.colrefs.append((names[-2] if len(names) > 1 else None, names[-1]))

    def func_call(self, body: dict[str, Any], kind: str, ctes: frozenset[str]) -> None:
        parts = [p["String"].get("sval", "") for p in body.get("funcname", []) if "String" in p]
        if parts:
            bare = parts[-1]
            self.stmt.functions.add(bare)
            if len(parts) > 1:
                self.stmt.functions.add(".".join(parts))
            if bare == "set_config":
                self.set_config(body.get("args") or [])
            elif bare in _OPAQUE_FUNCTIONS:
                self.stmt.mark("other")
        self.fields(body, kind, ctes, skip=("funcname",))

    def set_config(self, args: list[Any]) -> None:
        self.read_constants = True
        name = _const_str(args[0]) if args else None
        self.stmt.mark("set")
        if name is None:
            raise SqlError("set_config with a computed setting name cannot be classified")
        name = name.strip().lower()
        if name in _ROLE_GUCS:
            self.stmt.mark("role")
        elif name == "search_path":
            self.stmt.mark("other")
        _check_guc(name, _const_str(args[1]) if len(args) > 1 else None, reset=False)

    # -- statements with structure ----------------------------------------------------------
    def with_clause(self, body: dict[str, Any], ctes: frozenset[str]) -> frozenset[str]:
        wc = body.get("withClause")
        if not wc:
            return ctes
        wc = wc.get("WithClause", wc)
        items = [c.get("CommonTableExpr", c) for c in wc.get("ctes") or []]
        names = [c.get("ctename", "") for c in items]
        everything = ctes | frozenset(names)
        for i, cte in enumerate(items):
            visible = everything if wc.get("recursive") else ctes | frozenset(names[:i])
            self.walk(cte.get("ctequery"), "select", visible)
        return everything

    def select(self, body: dict[str, Any], kind: str, ctes: frozenset[str]) -> None:
        # A SELECT in statement position is a select even when it reads no table; nested ones
        # (subqueries, CTE bodies, INSERT ... VALUES) only count through the tables they read.
        if kind == TOP:
            self.stmt.mark("select")
        inner = self.with_clause(body, ctes)
        into = body.get("intoClause")
        if into:
            self.stmt.mark("create")
            self.range_var(into.get("rel") or {}, "create", inner)
        self.fields(body, "select", inner, skip=("withClause", "intoClause", "lockingClause"))

    def dml(self, body: dict[str, Any], kind: str, ctes: frozenset[str], dml: str) -> None:
        inner = self.with_clause(body, ctes)
        unbounded = dml in ("update", "delete") and not _narrows(body.get("whereClause"))
        self.stmt.mark(dml)
        targets = self.range_var(body.get("relation") or {}, dml, frozenset(), unbounded)
        extra_kinds = []
        conflict = body.get("onConflictClause")
        if conflict and conflict.get("action") == "ONCONFLICT_UPDATE":
            extra_kinds.append(("update", conflict.get("targetList") or []))
        for clause in body.get("mergeWhenClauses") or []:
            clause = clause.get("MergeWhenClause", clause)
            action = {"CMD_UPDATE": "update", "CMD_DELETE": "delete",
                      "CMD_INSERT": "insert"}.get(clause.get("commandType", ""))
            if action:
                extra_kinds.append((action, clause.get("targetList") or []))
        for action, tlist in extra_kinds:
            self.stmt.mark(action)
            for t in targets:
                self.stmt.add(action, t)
            self.target_names(tlist, targets)
        for key in ("cols", "targetList"):
            self.target_names(body.get(key) or [], targets)
        self.fields(body, "select", inner, skip=("withClause", "relation", "cols"))

    def target_names(self, tlist: list[Any], targets: list[str]) -> None:
        for item in tlist:
            name = item.get("ResTarget", {}).get("name")
            if name:
                self.stmt.targets.extend((t, name) for t in targets)

    def copy(self, body: dict[str, Any], kind: str, ctes: frozenset[str]) -> None:
        if body.get("is_program"):
            ck = "copy_program"
        else:
            ck = "copy_from" if body.get("is_from") else "copy_to"
        self.stmt.mark(ck)
        if body.get("relation"):
            tables = self.range_var(body["relation"], ck, ctes)
            for col in body.get("attlist") or []:
                name = _const_str(col)
                if name:
                    self.stmt.targets.extend((t, name) for t in tables)
        if body.get("query"):
            self.walk(body["query"], TOP, ctes)
            for k, t in list(self.stmt.ops):
                if k == "select":  # COPY (query) TO exports what the query reads
                    self.stmt.add(ck, t)
        self.fields(body, ck, ctes, skip=("relation", "query", "attlist"))

    def variable_set(self, body: dict[str, Any], kind: str, ctes: frozenset[str]) -> None:
        self.read_constants = True
        name = (body.get("name") or "").lower()
        vkind = body.get("kind", "")
        if name in _ROLE_GUCS:
            self.stmt.mark("role")
        elif name == "transaction" or name == "transaction_snapshot":
            self.stmt.mark("transaction")
        else:
            self.stmt.mark("set")
            if name == "search_path":
                self.stmt.mark("other")
        args = body.get("args") or []
        value = ",".join(v for v in (_const_str(a) for a in args) if v is not None)
        _check_guc(name, value, reset=vkind in ("VAR_RESET", "VAR_SET_DEFAULT", "VAR_RESET_ALL"))
        self.fields(body, kind, ctes)

    def prepare(self, body: dict[str, Any], kind: str, ctes: frozenset[str]) -> None:
        self.stmt.mark("prepare")
        outer, self.stmt = self.stmt, _Stmt()
        try:
            self.walk(body.get("query"), TOP, ctes)
            inner = tuple(self.stmt.finish())
        finally:
            self.stmt = outer
        self.stmt.extra.extend(inner)
        self.events.append(("prepare", body.get("name", ""), inner))
        self.fields(body, kind, ctes, skip=("query",))

    def execute(self, body: dict[str, Any], kind: str, ctes: frozenset[str]) -> None:
        self.stmt.mark("execute")
        self.executes.append(body.get("name", ""))
        self.fields(body, "select", ctes)

    def deallocate(self, body: dict[str, Any], kind: str, ctes: frozenset[str]) -> None:
        self.stmt.mark("deallocate")
        self.events.append(("deallocate", None if body.get("isall") else body.get("name")))

    def drop(self, body: dict[str, Any], kind: str, ctes: frozenset[str]) -> None:
        self.stmt.mark("drop")
        if body.get("removeType") in _DROP_RELATIONS:
            for obj in body.get("objects") or []:
                items = obj.get("List", {}).get("items", [obj])
                parts = [p["String"].get("sval", "") for p in items if "String" in p]
                if parts:
                    self.range_var({"relname": parts[-1], "schemaname": ".".join(parts[:-1])},
                                   "drop", frozenset())

    def grant(self, body: dict[str, Any], kind: str, ctes: frozenset[str], role: bool) -> None:
        gk = "grant" if body.get("is_grant") else "revoke"
        self.stmt.mark(gk)
        if role:  # GRANT role TO user changes what a login may do
            self.stmt.mark("role")
        self.fields(body, gk, ctes)

    def rename(self, body: dict[str, Any], kind: str, ctes: frozenset[str]) -> None:
        self.statement("RenameStmt", body, ctes)
        if body.get("renameType") == "OBJECT_ROLE":
            self.stmt.mark("role")

    def explain(self, body: dict[str, Any], kind: str, ctes: frozenset[str]) -> None:
        self.stmt.mark("explain")
        self.walk(body.get("query"), TOP, ctes)

    def call(self, body: dict[str, Any], kind: str, ctes: frozenset[str]) -> None:
        self.stmt.mark("call")
        self.func_call(body.get("funccall") or {}, "call", ctes)

    def fetch(self, body: dict[str, Any], kind: str, ctes: frozenset[str]) -> None:
        self.stmt.mark("select")

    def cursor(self, body: dict[str, Any], kind: str, ctes: frozenset[str]) -> None:
        self.walk(body.get("query"), TOP, ctes)  # DECLARE c CURSOR FOR <query>

    def create_as(self, body: dict[str, Any], kind: str, ctes: frozenset[str]) -> None:
        self.stmt.mark("create")
        self.range_var((body.get("into") or {}).get("rel") or {}, "create", frozenset())
        self.walk(body.get("query"), TOP, ctes)

    def create_schema(self, body: dict[str, Any], kind: str, ctes: frozenset[str]) -> None:
        saved = self.default_schema
        self.default_schema = body.get("schemaname") or saved
        try:
            self.statement("CreateSchemaStmt", body, ctes)
        finally:
            self.default_schema = saved

    def set_elsewhere(self, name: str, body: dict[str, Any], ctes: frozenset[str]) -> None:
        """ALTER SYSTEM / DATABASE / ROLE ... SET: later sessions get the setting."""
        self.statement(name, body, ctes)
        setstmt = body.get("setstmt")
        if isinstance(setstmt, dict):
            self.read_constants = True
            args = setstmt.get("args") or []
            value = ",".join(v for v in (_const_str(a) for a in args) if v is not None)
            _check_guc((setstmt.get("name") or "").lower(), value,
                       reset=setstmt.get("kind") != "VAR_SET_VALUE")

    def view(self, body: dict[str, Any], kind: str, ctes: frozenset[str]) -> None:
        self.stmt.mark("create")
        self.range_var(body.get("view") or {}, "create", frozenset())
        self.walk(body.get("query"), TOP, ctes)


def _narrows(where: Any) -> bool:
    """A WHERE that mentions no column at all (`WHERE true`, `WHERE 1 = 1`) narrows nothing."""
    if where is None:
        return False
    stack = [where]
    while stack:
        node = stack.pop()
        if type(node) is dict:
            if "ColumnRef" in node or "CurrentOfExpr" in node:
                return True
            stack.extend(v for v in node.values() if type(v) is dict or type(v) is list)
        elif type(node) is list:
            stack.extend(node)
    return False


_HANDLERS: dict[str, Any] = {
    "RangeVar": _Walker.range_var,
    "ColumnRef": _Walker.column_ref,
    "FuncCall": _Walker.func_call,
    "SelectStmt": _Walker.select,
    "InsertStmt": lambda w, b, k, c: w.dml(b, k, c, "insert"),
    "UpdateStmt": lambda w, b, k, c: w.dml(b, k, c, "update"),
    "DeleteStmt": lambda w, b, k, c: w.dml(b, k, c, "delete"),
    "MergeStmt": lambda w, b, k, c: w.dml(b, k, c, "merge"),
    "CopyStmt": _Walker.copy,
    "VariableSetStmt": _Walker.variable_set,
    "PrepareStmt": _Walker.prepare,
    "ExecuteStmt": _Walker.execute,
    "DeallocateStmt": _Walker.deallocate,
    "DropStmt": _Walker.drop,
    "GrantStmt": lambda w, b, k, c: w.grant(b, k, c, role=False),
    "GrantRoleStmt": lambda w, b, k, c: w.grant(b, k, c, role=True),
    "RenameStmt": _Walker.rename,
    "ExplainStmt": _Walker.explain,
    "CallStmt": _Walker.call,
    "FetchStmt": _Walker.fetch,
    "DeclareCursorStmt": _Walker.cursor,
    "CreateTableAsStmt": _Walker.create_as,
    "ViewStmt": _Walker.view,
    "CreateSchemaStmt": _Walker.create_schema,
    "AlterSystemStmt": lambda w, b, k, c: w.set_elsewhere("AlterSystemStmt", b, c),
    "AlterDatabaseSetStmt": lambda w, b, k, c: w.set_elsewhere("AlterDatabaseSetStmt", b, c),
    "AlterRoleSetStmt": lambda w, b, k, c: w.set_elsewhere("AlterRoleSetStmt", b, c),
    "ReturnStmt": lambda w, b, k, c: w.fields(b, k, c),  # RETURN expr of an SQL function body
}


# ---------------------------------------------------------------------------------------------
# Normalised text for audit and summaries

_SPECIAL = re.compile(r"--|/\*|[\"'$]")
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_\u0080-\U0010ffff]*)?\$")
_SPACES = re.compile(r"\s+")


def _ident_char(ch: str) -> bool:
    return ch.isalnum() or ch in "_$" or ord(ch) >= 0x80


def scrub(text: str) -> str:
    """Drop comments and any string literal pgparse.normalize left (COPY file names, COMMENT
    texts, NOTIFY payloads), collapse whitespace. Literals become `?`.

    Lexes as the server does with standard_conforming_strings on (the only setting the gateway
    lets through); anything unterminated is cut off rather than passed on."""
    out: list[str] = []
    pos, end = 0, len(text)
    while pos < end:
        m = _SPECIAL.search(text, pos)
        if m is None:
            out.append(text[pos:])
            break
        start, tok = m.start(), m.group()
        out.append(text[pos:start])
        prev = text[start - 1] if start else " "
        if tok == "--":
            nl = text.find("\n", start)
            pos = end if nl < 0 else nl
            out.append(" ")
        elif tok == "/*":
            depth, pos = 1, start + 2
            while depth and pos < end:
                if text.startswith("/*", pos):
                    depth, pos = depth + 1, pos + 2
                elif text.startswith("*/", pos):
                    depth, pos = depth - 1, pos + 2
                else:
                    pos += 1
            out.append(" ")
        elif tok == '"':
            close = start + 1
            while True:
                close = text.find('"', close)
                if close < 0 or not text.startswith('""', close):
                    break
                close += 2
            pos = end if close < 0 else close + 1
            out.append(text[start:pos])
        elif tok == "'":
            lone = start < 2 or not _ident_char(text[start - 2])
            escapes = prev in "eE" and lone
            if out and out[-1] and (prev == "&" or (prev in "eEbBxXnN" and lone)):
                out[-1] = out[-1][:-1]  # drop the E/B/X/N/U& prefix with the literal
                if prev == "&" and out[-1][-1:] in ("u", "U"):
                    out[-1] = out[-1][:-1]
            i = start + 1
            while i < end:
                ch = text[i]
                if escapes and ch == "\\":
                    i += 2
                elif ch == "'":
                    if text.startswith("''", i):
                        i += 2
                    else:
                        break
                else:
                    i += 1
            pos = i + 1
            out.append("?")
        else:  # "$": a dollar quote unless it is part of an identifier or a $n parameter
            dm = None if _ident_char(prev) else _DOLLAR_TAG.match(text, start)
            if dm is None:
                out.append("$")
                pos = start + 1
            else:
                close = text.find(dm.group(), dm.end())
                pos = end if close < 0 else close + len(dm.group())
                out.append("?")
    return _SPACES.sub(" ", "".join(out)).strip()


# ---------------------------------------------------------------------------------------------
# Public API


def cache_key(sql: str) -> str:
    """A decision-cache key for `sql`: a hash of the exact text, constants included.

    pgparse fingerprints drop constants (`SET ROLE reader` and `SET ROLE postgres` share one),
    so they must never key decisions. Decisions also depend on identity, target and policy
    version, and for `session_dependent` classifications on the session: key those too.
    """
    digest = hashlib.blake2b(sql.encode("utf-8", "surrogatepass"), digest_size=16)
    return "sql:" + digest.hexdigest()


# libpg_query quotes the token where parsing failed ('syntax error at or near "'4111…'" at
# position 10'); that token may be a literal value, and the message goes into the audit log.
_NEAR_TOKEN = re.compile(r' at or near ".*"(?=( at position \d+)?$)', re.DOTALL)


def parse_error_message(message: str) -> str:
    """A parser error without the offending token (its position is kept)."""
    return _NEAR_TOKEN.sub("", message)


def _parse(sql: str) -> list[dict[str, Any]]:
    if not isinstance(sql, str):
        raise SqlError("statement text must be a string")
    if len(sql) > MAX_SQL_CHARS:
        raise SqlError(f"statement text longer than {MAX_SQL_CHARS} characters")
    if "\x00" in sql:  # libpg_query would stop at the NUL and miss what follows
        raise SqlError("statement text contains a NUL character")
    try:
        return pgparse.parse(sql)
    except pgparse.PGQueryError as exc:
        message = parse_error_message(str(exc.args[0])) if exc.args else "syntax error"
        position = getattr(exc, "position", None)
        if isinstance(position, int) and position > 0:
            message += f" at position {position}"
        raise SqlError(message) from None
    except RecursionError:
        raise SqlError("statement nested too deeply") from None
    except Exception as exc:  # e.g. UnicodeEncodeError on lone surrogates
        raise SqlError(f"statement cannot be parsed: {type(exc).__name__}") from None


def _merge(ops: list[SqlOp]) -> tuple[SqlOp, ...]:
    merged: dict[tuple[str, str | None], SqlOp] = {}
    for op in ops:
        key = (op.kind, op.table)
        old = merged.get(key)
        if old is None:
            merged[key] = op
        else:
            merged[key] = SqlOp(op.kind, op.table,
                                tuple(sorted(set(old.columns) | set(op.columns))),
                                tuple(sorted(set(old.functions) | set(op.functions))),
                                old.unbounded or op.unbounded)
    return tuple(merged.values())


def _statement_texts(sql: str, tree: list[dict[str, Any]]) -> list[str]:
    raw = sql.encode("utf-8")  # libpg_query locations are byte offsets
    texts = []
    for item in tree:
        start = item.get("stmt_location", 0)
        length = item.get("stmt_len", 0)
        texts.append(raw[start:start + length if length else len(raw)].decode("utf-8", "replace"))
    return texts


def _classify(sql: str, normalized: str | None = None) -> tuple[Classification, bool]:
    """Classification and whether it holds for every text with the same normalised form."""
    tree = _parse(sql)
    walker = _Walker()
    ops: list[SqlOp] = []
    try:
        for item in tree:
            walker.stmt = _Stmt()
            walker.walk(item.get("stmt"), TOP, frozenset())
            ops.extend(walker.stmt.finish())
        if len(tree) == 1:
            fingerprints: tuple[str, ...] = (pgparse.fingerprint(sql),)
        else:
            fingerprints = tuple(pgparse.fingerprint(t) for t in _statement_texts(sql, tree))
        if normalized is None:
            normalized = pgparse.normalize(sql) if tree else ""
        text = scrub(normalized)
    except SqlError:
        raise
    except RecursionError:
        raise SqlError("statement nested too deeply") from None
    except Exception as exc:  # a tree shape this walker does not know: refuse, never guess
        raise SqlError(f"statement cannot be classified: {type(exc).__name__}") from None
    result = Classification(operations=_merge(ops), statements=len(tree),
                            fingerprints=fingerprints, normalized=text, key=cache_key(sql),
                            executes=tuple(walker.executes), events=tuple(walker.events))
    return result, not walker.read_constants


def classify(sql: str) -> Classification:
    """Classify one message (one or more statements). Raises SqlError, and nothing else."""
    return _classify(sql)[0]


class _LRU:
    """A small thread-safe LRU mapping."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data: OrderedDict[str, Classification] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: str) -> Classification | None:
        with self.lock:
            val = self.data.get(key)
            if val is not None:
                self.data.move_to_end(key)
            return val

    def put(self, key: str, val: Classification) -> None:
        with self.lock:
            self.data[key] = val
            self.data.move_to_end(key)
            while len(self.data) > self.size:
                self.data.popitem(last=False)

    def clear(self) -> None:
        with self.lock:
            self.data.clear()


_BY_TEXT = _LRU(2048)
_BY_NORMALIZED = _LRU(4096)


def classify_cached(sql: str) -> Classification:
    """classify() behind two LRUs: the exact text, then pgparse's normalised text.

    The second one lets `... WHERE id = 1` and `... WHERE id = 2` share one walk. It is only
    filled with classifications that read no constant (SET, set_config do), and is looked up
    only after pgparse.normalize parsed the new text and found its constants at the same
    places: the two texts then differ in constant values only, which did not matter.
    """
    if not isinstance(sql, str) or len(sql) > _CACHED_MAX_CHARS:
        return classify(sql)
    hit = _BY_TEXT.get(sql)
    if hit is not None:
        return hit
    try:
        normalized = pgparse.normalize(sql) if "\x00" not in sql else None
    except Exception:
        normalized = None  # classify() below reports the error properly
    shared = _BY_NORMALIZED.get(normalized) if normalized is not None else None
    if shared is not None:
        result = replace(shared, key=cache_key(sql))
    else:
        result, constant_free = _classify(sql, normalized)
        if constant_free and normalized is not None:
            _BY_NORMALIZED.put(normalized, result)
    _BY_TEXT.put(sql, result)
    return result


def clear_caches() -> None:
    _BY_TEXT.clear()
    _BY_NORMALIZED.clear()


class PreparedRegistry:
    """A session's prepared statements (SQL PREPARE and extended-protocol named Parse share one
    namespace on the server): name -> the operations its statement performs."""

    def __init__(self) -> None:
        self.statements: dict[str, tuple[SqlOp, ...]] = {}

    def register(self, name: str, ops: Classification | tuple[SqlOp, ...]) -> None:
        """Remember `name`. Re-preparing an existing name keeps the union: the server may still
        hold the older statement (its PREPARE fails with 42P05)."""
        new = ops.operations if isinstance(ops, Classification) else tuple(ops)
        self.statements[name] = _merge([*self.statements.get(name, ()), *new])

    def forget(self, name: str | None) -> None:
        """DEALLOCATE name / Close('S', name); None forgets everything (DEALLOCATE ALL)."""
        if name is None:
            self.statements.clear()
        else:
            self.statements.pop(name, None)

    def lookup(self, name: str) -> tuple[SqlOp, ...] | None:
        return self.statements.get(name)


def classify_in_session(sql: str, registry: PreparedRegistry) -> Classification:
    """classify_cached() plus what each EXECUTEd prepared statement does; updates `registry`.

    An EXECUTE is resolved against the registry and every PREPARE of the same message (a union:
    over-approximating is safe). An unknown name adds `other` (it may come from a DO block).
    """
    base = classify_cached(sql)
    if not base.executes and not base.events:
        return base
    pending: dict[str, list[SqlOp]] = {}
    for event in base.events:
        if event[0] == "prepare":
            pending.setdefault(event[1], []).extend(event[2])
    ops = list(base.operations)
    for name in base.executes:
        found = [*(registry.lookup(name) or ()), *pending.get(name, ())]
        ops.extend(found or [SqlOp("other", None)])
    for event in base.events:
        if event[0] == "prepare":
            registry.register(event[1], event[2])
        else:
            registry.forget(event[1])
    return replace(base, operations=_merge(ops))


def to_operations(classification: Classification, target: str) -> list[Operation]:
    """Policy operations for a classified message (`protocol="postgres"`).

    `fingerprint` is the exact-text cache key, so an approval grant for `SET ROLE reader` can
    never cover `SET ROLE postgres`. Summaries hold the normalised text only (no literals).
    """
    text = classification.normalized
    if len(text) > SUMMARY_CHARS:
        text = text[:SUMMARY_CHARS - 1] + "…"
    out = []
    for op in classification.operations:
        head = f"{op.kind} {op.table}" if op.table else op.kind
        out.append(Operation(protocol="postgres", target=target, summary=f"{head}: {text}",
                             sql=op.to_dict(), fingerprint=classification.key))
    return out


def output_column_sources(sql: str, schema: dict[str, dict[str, str]] | None = None,
                          views: dict[str, str] | None = None) -> list[set[str]] | None:
    """For each output column, the `table.column`s it is computed from; None when unknown.

    See addons/sql_lineage.py (sqlglot is imported only when result masking needs it)."""
    from addons.sql_lineage import output_column_sources as lineage

    return lineage(sql, schema, views)
