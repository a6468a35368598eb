"""Statement decisions for the Postgres gateway: classification + policy + masks, as plain data.

Pure glue over the shared engines (`addons.sql`, `addons.policy`): no asyncio, no I/O. The
session calls `decide()` for every simple Query, Parse, Execute and fast-path call and turns the
resulting `Verdict` into wire messages; audit writes happen in the session because their
failure mode (refuse) is part of the protocol flow.

Decisions are cached per (exact SQL text, identity, target) and invalidated by a new policy
version. The key is the full text (never a fingerprint, which drops constants and would make
`SET ROLE reader` and `SET ROLE postgres` look alike), and session-dependent texts (EXECUTE of a
prepared statement) are never cached.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any

import pgparse

from addons import sql as sqlmod
from addons.model import Decision, Denied, Identity, Operation, PortcullisError
from addons.policy import PolicySet, evaluate, glob_match, matching_masks

# Kinds whose statements change the catalog: cached table/column names may be stale after them.
DDL_KINDS = frozenset(("create", "alter", "drop", "other", "do", "call"))
UNPARSEABLE = "unparseable-sql"
CACHE_SIZE = 4096


class ApprovalRequired(Denied):
    """A `review` decision: the server holds the statement for an approval (42501 when it is
    denied or times out, or when no approval store is configured)."""

    error = "approval_required"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the gateway decided about one message (all its statements)."""

    decision: Decision
    operations: tuple[Operation, ...]
    masks: tuple[Any, ...]  # MaskRule objects whose `when` matched some operation
    kinds: tuple[str, ...]
    tables: tuple[str, ...]
    statements: int
    normalized: str
    policy: PolicySet | None
    refusal: PortcullisError | None = None  # set when the message must not run
    extra: dict[str, Any] = field(default_factory=dict)  # goes into the audit record
    approval: dict[str, Any] | None = None  # a reviewed verdict: {"id", "state"} for the audit
    memo: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # internal

    @property
    def allowed(self) -> bool:
        return self.refusal is None

    @property
    def empty(self) -> bool:
        return self.statements == 0 and self.refusal is None

    @property
    def column_masks(self) -> tuple[Any, ...]:
        return tuple(m for m in self.masks if m.columns)

    @property
    def changes_catalog(self) -> bool:
        return any(k in DDL_KINDS for k in self.kinds)

    @property
    def mask_ids(self) -> tuple[str, ...]:
        ids = self.memo.get("mask_ids")
        if ids is None:
            ids = self.memo["mask_ids"] = tuple(m.id for m in self.masks)
        return ids

    def audit_operation(self) -> dict[str, Any]:
        """The `operation` of the audit record: normalised text (constants removed), kinds,
        tables, and every (kind, table) operation. Never a literal value. Built once per
        verdict (callers must not modify it)."""
        op = self.memo.get("audit_op")
        if op is None:
            op = self.memo["audit_op"] = self._audit_operation()
        return op

    def _audit_operation(self) -> dict[str, Any]:
        summary = self.normalized[:500] or "(empty)"
        return {
            "protocol": "postgres",
            "summary": summary,
            "sql": {
                "normalized": self.normalized,
                "kinds": list(self.kinds),
                "tables": list(self.tables),
                "statements": self.statements,
                **self.extra,
            },
        }


def refusal_for(decision: Decision) -> PortcullisError | None:
    if decision.effect == "allow":
        return None
    if decision.effect == "review":
        return ApprovalRequired(
            f"portcullis: approval required by rule {decision.rule}: {decision.reason}",
            rule=decision.rule)
    return Denied(f"portcullis: denied by rule {decision.rule}: {decision.reason}",
                  rule=decision.rule)


def _may_cover(mask: Any, tables: tuple[str, ...]) -> bool:
    """Could a `columns:` pattern of `mask` name a column of one of `tables`? Patterns are
    `table.column` globs; the table part is compared with the bare and qualified names."""
    for pattern in getattr(mask, "columns", ()):
        table_part = pattern.rsplit(".", 1)[0] if "." in pattern else "*"
        if not tables:
            return True
        for t in tables:
            if glob_match([table_part], t) or glob_match([table_part], t.split(".", 1)[-1]):
                return True
    return False


def _unparseable(reason: str, policy: PolicySet | None, summary: str) -> Verdict:
    decision = Decision("deny", UNPARSEABLE, f"statement cannot be classified ({reason})",
                        (UNPARSEABLE,))
    return Verdict(decision, (), (), (), (), 0, summary, policy, refusal_for(decision))


def verdict_for(policy: PolicySet, identity: Identity, target: str,
                classification: Any, extra: dict[str, Any] | None = None) -> Verdict:
    """Decide a classification (from addons.sql) for `identity` on `target`."""
    ops = tuple(sqlmod.to_operations(classification, target))
    if classification.statements == 0:
        # Only comments/whitespace: PostgreSQL answers EmptyQueryResponse; nothing runs.
        decision = Decision("allow", "empty-query", "no statement", ())
        return Verdict(decision, (), (), (), (), 0, "", policy)
    decision = evaluate(policy, identity, ops)
    masks: dict[str, Any] = {}
    for op in ops:
        for m in matching_masks(policy, identity, op):
            masks.setdefault(m.id, m)
        if op.sql and op.sql["kind"] == "copy_to":
            # COPY TO reads like a SELECT: masks written for reads apply to it too.
            as_select = replace(op, sql={**op.sql, "kind": "select"})
            for m in matching_masks(policy, identity, as_select):
                masks.setdefault(m.id, m)
    kinds = tuple(dict.fromkeys(op.sql["kind"] for op in ops if op.sql))
    tables = tuple(dict.fromkeys(op.sql["table"] for op in ops if op.sql and op.sql["table"]))
    refusal = refusal_for(decision)
    if refusal is None and "copy_to" in kinds:
        covering = [m.id for m in masks.values() if _may_cover(m, tables)]
        if covering:
            # COPY TO streams rows the gateway does not split into columns: data a column
            # mask may cover is refused rather than sent raw (SELECT is masked column by
            # column). Detector-only masks are applied to the text/CSV lines (relay.py).
            refusal = Denied("portcullis: denied: COPY TO of columns covered by masks "
                             f"{', '.join(covering)} is not allowed; use SELECT",
                             rule="masked-copy")
    return Verdict(decision, ops, tuple(masks.values()), kinds, tables,
                   classification.statements, classification.normalized, policy, refusal,
                   dict(extra or {}))


# Kinds whose classification never looks at a constant's value, and functions that do.
TEMPLATE_KINDS = frozenset(("select",))
CONSTANT_SENSITIVE_FUNCTIONS = frozenset(("set_config", "pg_catalog.set_config"))
TEMPLATE_MAX_CHARS = 16 * 1024


def _template(sql: str) -> str | None:
    """The text with every constant replaced by $n (libpg_query's normaliser), or None."""
    if len(sql) > TEMPLATE_MAX_CHARS:
        return None
    try:
        return pgparse.normalize(sql)
    except Exception:  # noqa: BLE001 - unparseable: the full path decides (and denies)
        return None


def _template_safe(template: str, classification: Any) -> bool:
    """May every text with this template share `classification`'s decision?

    Only when the message is read-only (every operation a `select`), calls no function whose
    classification depends on its arguments, and the template itself classifies to exactly the
    same operations: the classifier then provably ignored the constants, which are the only
    thing two texts with one template differ in. Anything else (SET ROLE x, set_config, COPY
    TO PROGRAM 'cmd', DML whose fingerprint keys approvals) is decided text by text."""
    ops = classification.operations
    if not ops or classification.session_dependent or classification.events:
        return False
    for op in ops:
        if op.kind not in TEMPLATE_KINDS or CONSTANT_SENSITIVE_FUNCTIONS & set(op.functions):
            return False
    try:
        again = sqlmod.classify_cached(template)
    except sqlmod.SqlError:
        return False
    return again.operations == ops and again.statements == classification.statements


class Gate:
    """Per-session decision maker with a bounded cache shared across its statements."""

    def __init__(self, target: str, registry: sqlmod.PreparedRegistry | None = None,
                 cache_size: int = CACHE_SIZE) -> None:
        self.target = target
        self.registry = registry if registry is not None else sqlmod.PreparedRegistry()
        self._cache: OrderedDict[tuple[str, Identity], Verdict] = OrderedDict()
        # Decisions of read-only texts that differ only in constants (see _template_safe).
        self._templates: OrderedDict[tuple[str, Identity], Verdict] = OrderedDict()
        self._cache_policy: PolicySet | None = None
        self.cache_size = cache_size

    def decide(self, policy: PolicySet, identity: Identity, sql: str) -> Verdict:
        if policy is not self._cache_policy:
            self._cache.clear()
            self._templates.clear()
            self._cache_policy = policy
        key = (sql, identity)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            # Re-apply registry side effects (PREPARE/DEALLOCATE) as a fresh classify would.
            if hit.memo.get("registry_events"):
                sqlmod.classify_in_session(sql, self.registry)
            return hit
        template = _template(sql)
        if template is not None:
            hit = self._templates.get((template, identity))
            if hit is not None:
                return hit
        try:
            classification = sqlmod.classify_in_session(sql, self.registry)
        except sqlmod.SqlError as e:
            return _unparseable(str(e), policy, "(unparseable statement)")
        verdict = verdict_for(policy, identity, self.target, classification)
        if not classification.session_dependent:
            if classification.events:
                verdict.memo["registry_events"] = True
            self._remember(self._cache, key, verdict)
            if template is not None and _template_safe(template, classification):
                self._remember(self._templates, (template, identity), verdict)
        return verdict

    def _remember(self, cache: OrderedDict, key: Any, verdict: Verdict) -> None:
        cache[key] = verdict
        if len(cache) > self.cache_size:
            cache.popitem(last=False)

    def decide_parse(self, policy: PolicySet, identity: Identity, name: str,
                     sql: str) -> Verdict:
        """A Parse message: decide the text; a named statement enters the registry (it shares
        the server's namespace with SQL PREPARE, so `EXECUTE name` must know what it does)."""
        verdict = self.decide(policy, identity, sql)
        if name and verdict.allowed:
            try:
                self.registry.register(name, sqlmod.classify_cached(sql))
            except sqlmod.SqlError:
                pass
        return verdict

    def decide_prepared(self, policy: PolicySet, identity: Identity, name: str) -> Verdict:
        """Execute of a portal bound to a statement this session did not Parse (one made by SQL
        PREPARE): decide the registry's operations. Unknown names are denied."""
        ops = self.registry.lookup(name)
        if ops is None:
            decision = Decision("deny", "unknown-prepared-statement",
                                f"prepared statement {name!r} was not decided by the gateway",
                                ("unknown-prepared-statement",))
            return Verdict(decision, (), (), (), (), 1, f"EXECUTE {name}", policy,
                           refusal_for(decision))
        cls = sqlmod.Classification(operations=tuple(ops), statements=1, fingerprints=(),
                                    normalized=f"EXECUTE {name}", key="")
        return verdict_for(policy, identity, self.target, cls)

    def decide_function(self, policy: PolicySet, identity: Identity, function: str | None,
                        oid: int) -> Verdict:
        """A fast-path FunctionCall ('F'): kind `call` with the resolved function name."""
        name = function or f"oid:{oid}"
        # As the classifier reports calls: pg_catalog functions by their bare name (how they
        # are called), others by bare and schema-qualified name.
        schema, _, bare = name.rpartition(".")
        names = [bare] if schema in ("", "pg_catalog") else [bare, name]
        op = Operation(protocol="postgres", target=self.target, summary=f"fast-path call {name}",
                       sql={"kind": "call", "table": None, "columns": [], "functions": names,
                            "unbounded": False, "fastpath": True})
        decision = evaluate(policy, identity, [op])
        if function is None:
            decision = Decision("deny", "unknown-function",
                                f"function oid {oid} could not be resolved",
                                ("unknown-function",))
        masks: dict[str, Any] = {}
        for m in matching_masks(policy, identity, op):
            masks.setdefault(m.id, m)
        return Verdict(decision, (op,), tuple(masks.values()), ("call",), (), 1,
                       f"fast-path call {name}", policy, refusal_for(decision),
                       {"fastpath": True, "functions": names})

    def forget(self, name: str) -> None:
        self.registry.forget(name)
