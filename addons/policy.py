"""Policy engine: load YAML policy files and decide operations. Pure functions over plain data.

Decision rules (SPEC §4):
- an operation is denied if any matching rule denies, else reviewed if any matching rule
  reviews, else allowed if any matching rule allows, else denied (default deny);
- a request's decision is the strictest decision of its operations;
- every decision names the rules that produced it.

`when` matches when every key given matches; a list matches when any item does. `unless` has
the same shape and cancels the rule when it matches. Keys a rule does not give match anything.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from addons.model import (
    EFFECTS,
    STRICTNESS,
    Decision,
    Identity,
    Operation,
    OperationDecision,
    RuleMatch,
)

DEFAULT_DENY = "default-deny"
DEFAULT_DENY_REASON = "no policy rule allows this operation"
IMPERSONATION_DENIED = RuleMatch(
    "impersonation-not-allowed", "deny",
    "Impersonate-* headers need a rule with kubernetes.impersonate: true")

WHEN_KEYS = {"subjects", "groups", "targets", "http", "kubernetes", "sql"}
HTTP_KEYS = {"methods", "paths"}
K8S_KEYS = {"verbs", "resources", "subresources", "namespaces", "names", "commands", "impersonate"}
# Verbs the Kubernetes classifier produces: resource verbs, connect subresources (verb = the
# subresource name) and lower-case HTTP methods of non-resource URLs.
K8S_VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection",
             "exec", "attach", "portforward", "proxy", "post", "put", "options")
SQL_KEYS = {"statements", "tables", "columns", "functions", "unbounded"}
RULE_KEYS = {"id", "effect", "reason", "when", "unless", "description"}
MASK_KEYS = {"id", "when", "unless", "json_paths", "columns", "detectors", "strategy", "reason",
             "description"}
TEST_KEYS = {"name", "identity", "request", "expect", "masked"}
FILE_KEYS = {"rules", "masks", "tests"}


class PolicyError(ValueError):
    """A policy file problem, located by file, line and rule id."""

    def __init__(self, message: str, file: str | Path | None = None, line: int | None = None,
                 rule_id: str | None = None) -> None:
        self.message = message
        self.file = str(file) if file is not None else None
        self.line = line
        self.rule_id = rule_id
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file or "<policy>"
        if self.line:
            where += f":{self.line}"
        if self.rule_id:
            where += f" [{self.rule_id}]"
        return f"{where}: {self.message}"


@dataclass(frozen=True)
class Rule:
    id: str
    effect: str
    reason: str
    when: dict[str, Any]
    unless: dict[str, Any] | None
    file: str
    line: int


@dataclass(frozen=True)
class MaskRule:
    id: str
    when: dict[str, Any]
    unless: dict[str, Any] | None
    json_paths: tuple[str, ...]
    columns: tuple[str, ...]
    detectors: tuple[str, ...]
    strategy: str
    file: str
    line: int


@dataclass(frozen=True)
class PolicyTest:
    name: str
    identity: dict[str, Any]
    request: dict[str, Any]
    expect: str
    masked: tuple[str, ...] | None
    file: str
    line: int


@dataclass
class PolicySet:
    rules: list[Rule] = field(default_factory=list)
    masks: list[MaskRule] = field(default_factory=list)
    tests: list[PolicyTest] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    # mask id -> compiled form from addons.masking.compile_mask (built once per policy version)
    compiled_masks: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Loading


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every mapping in `__line__`."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict[str, Any]:
    loader.flatten_mapping(node)
    mapping: dict[str, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in mapping:
            raise PolicyError(f"duplicate key {key!r}", line=key_node.start_mark.line + 1)
        mapping[key] = loader.construct_object(value_node, deep=True)
    mapping["__line__"] = node.start_mark.line + 1
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _strip_lines(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_lines(v) for k, v in value.items() if k != "__line__"}
    if isinstance(value, list):
        return [_strip_lines(v) for v in value]
    return value


def policy_files(directory: str | Path) -> list[Path]:
    root = Path(directory)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise PolicyError(f"policy directory {root} does not exist", file=root)
    return sorted(p for p in root.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def load_policies(directory: str | Path, known_targets: Iterable[str] | None = None) -> PolicySet:
    """Load and validate every *.yaml below `directory`. Raises PolicyError (a ValueError)."""
    policy = PolicySet()
    seen_rules: dict[str, str] = {}
    seen_masks: dict[str, str] = {}
    targets = set(known_targets) if known_targets is not None else None
    for path in policy_files(directory):
        load_file(path, policy, seen_rules, seen_masks, targets)
    return policy


def load_file(path: Path, policy: PolicySet, seen_rules: dict[str, str],
              seen_masks: dict[str, str], targets: set[str] | None) -> None:
    fname = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyError(f"cannot read: {e}", file=fname) from e
    try:
        doc = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - SafeLoader subclass
    except PolicyError as e:
        raise PolicyError(e.message, file=fname, line=e.line) from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise PolicyError(f"invalid YAML: {getattr(e, 'problem', e)}", file=fname, line=line) from e
    if doc is None:
        doc = {"__line__": 1}
    if not isinstance(doc, dict):
        raise PolicyError("a policy file must be a mapping with rules:, masks:, tests:", file=fname,
                          line=1)
    _unknown_keys(doc, FILE_KEYS, fname, doc.get("__line__"), None, "top-level key")
    policy.files.append(fname)
    for raw in _as_list(doc.get("rules"), "rules", fname, doc.get("__line__")):
        rule = _parse_rule(raw, fname, targets)
        if rule.id in seen_rules:
            raise PolicyError(f"duplicate rule id (first defined in {seen_rules[rule.id]})",
                              file=fname, line=rule.line, rule_id=rule.id)
        seen_rules[rule.id] = f"{fname}:{rule.line}"
        policy.rules.append(rule)
    for raw in _as_list(doc.get("masks"), "masks", fname, doc.get("__line__")):
        mask = _parse_mask(raw, fname, targets)
        if mask.id in seen_masks:
            raise PolicyError(f"duplicate mask id (first defined in {seen_masks[mask.id]})",
                              file=fname, line=mask.line, rule_id=mask.id)
        seen_masks[mask.id] = f"{fname}:{mask.line}"
        from addons import masking  # local import: masking imports policy types

        try:
            policy.compiled_masks[mask.id] = masking.compile_mask(mask)
        except ValueError as e:
            raise PolicyError(str(e), file=fname, line=mask.line, rule_id=mask.id) from e
        policy.masks.append(mask)
    for raw in _as_list(doc.get("tests"), "tests", fname, doc.get("__line__")):
        policy.tests.append(_parse_test(raw, fname))


def _as_list(value: Any, key: str, fname: str, line: int | None) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise PolicyError(f"{key}: must be a list", file=fname, line=line)
    return value


def _unknown_keys(raw: dict[str, Any], allowed: set[str], fname: str, line: int | None,
                  rule_id: str | None, what: str) -> None:
    for key in raw:
        if key != "__line__" and key not in allowed:
            raise PolicyError(f"unknown {what} {key!r} (allowed: {', '.join(sorted(allowed))})",
                              file=fname, line=line, rule_id=rule_id)


def _str_list(value: Any, key: str, fname: str, line: int, rule_id: str | None) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(
        isinstance(v, (str, int)) and not isinstance(v, bool) for v in value
    ):
        raise PolicyError(f"{key}: must be a non-empty list of strings", file=fname, line=line,
                          rule_id=rule_id)
    return [str(v) for v in value]


def _parse_condition(raw: Any, key: str, fname: str, line: int, rule_id: str,
                     targets: set[str] | None) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise PolicyError(f"{key}: must be a mapping", file=fname, line=line, rule_id=rule_id)
    line = raw.get("__line__", line)
    _unknown_keys(raw, WHEN_KEYS, fname, line, rule_id, f"{key} key")
    cond: dict[str, Any] = {}
    for k in ("subjects", "groups", "targets"):
        if k in raw:
            cond[k] = _str_list(raw[k], f"{key}.{k}", fname, line, rule_id)
    if targets is not None and "targets" in cond:
        for t in cond["targets"]:
            if not any(ch in t for ch in "*?[") and t not in targets:
                raise PolicyError(f"{key}.targets: unknown target {t!r}", file=fname, line=line,
                                  rule_id=rule_id)
    for proto, allowed in (("http", HTTP_KEYS), ("kubernetes", K8S_KEYS), ("sql", SQL_KEYS)):
        if proto not in raw:
            continue
        sub = raw[proto]
        if not isinstance(sub, dict):
            raise PolicyError(f"{key}.{proto}: must be a mapping", file=fname, line=line,
                              rule_id=rule_id)
        sline = sub.get("__line__", line)
        _unknown_keys(sub, allowed, fname, sline, rule_id, f"{key}.{proto} key")
        parsed: dict[str, Any] = {}
        for k, v in sub.items():
            if k == "__line__":
                continue
            if k in ("unbounded", "impersonate"):
                if not isinstance(v, bool):
                    raise PolicyError(f"{key}.{proto}.{k}: must be true or false", file=fname,
                                      line=sline, rule_id=rule_id)
                parsed[k] = v
                continue
            items = _str_list(v, f"{key}.{proto}.{k}", fname, sline, rule_id)
            if k == "methods":
                items = [m.upper() for m in items]
            elif k in ("statements", "verbs"):
                items = [s.lower() for s in items]
                if k == "verbs":
                    # A misspelt verb would silently never match: a deny that never denies.
                    for v in items:
                        if not any(ch in v for ch in "*?[") and v not in K8S_VERBS:
                            raise PolicyError(
                                f"{key}.kubernetes.verbs: unknown verb {v!r} (one of "
                                f"{', '.join(K8S_VERBS)})", file=fname, line=sline,
                                rule_id=rule_id)
                if k == "statements":
                    from addons.sql import STATEMENT_KINDS

                    for s in items:
                        if s != "*" and s not in STATEMENT_KINDS:
                            raise PolicyError(
                                f"{key}.sql.statements: unknown statement kind {s!r}",
                                file=fname, line=sline, rule_id=rule_id)
            elif k == "resources" and any("/" in r for r in items):
                raise PolicyError(f"{key}.kubernetes.resources: write pods/exec as resources: "
                                  "[pods] + subresources: [exec]", file=fname, line=sline,
                                  rule_id=rule_id)
            elif k == "paths":
                for p in items:
                    if not p.startswith("/"):
                        raise PolicyError(f"{key}.http.paths: {p!r} must start with /",
                                          file=fname, line=sline, rule_id=rule_id)
            parsed[k] = items
        cond[proto] = parsed
    return cond


def _parse_common(raw: Any, what: str, fname: str, allowed: set[str]) -> tuple[str, int]:
    if not isinstance(raw, dict):
        raise PolicyError(f"each {what} must be a mapping", file=fname)
    line = raw.get("__line__", 0)
    rid = raw.get("id")
    if not isinstance(rid, str) or not rid.strip():
        raise PolicyError(f"{what} without an id", file=fname, line=line)
    _unknown_keys(raw, allowed, fname, line, rid, f"{what} key")
    return rid, line


def _parse_rule(raw: Any, fname: str, targets: set[str] | None) -> Rule:
    rid, line = _parse_common(raw, "rule", fname, RULE_KEYS)
    effect = raw.get("effect")
    if effect not in EFFECTS:
        raise PolicyError(f"effect must be one of {', '.join(EFFECTS)}, got {effect!r}",
                          file=fname, line=line, rule_id=rid)
    if "when" not in raw:
        raise PolicyError("rule needs a when: (use when: {} to match everything)", file=fname,
                          line=line, rule_id=rid)
    when = _parse_condition(raw.get("when") or {}, "when", fname, line, rid, targets)
    unless = None
    if raw.get("unless") is not None:
        unless = _parse_condition(raw["unless"], "unless", fname, line, rid, targets)
    reason = raw.get("reason") or ""
    if not isinstance(reason, str):
        raise PolicyError("reason must be a string", file=fname, line=line, rule_id=rid)
    return Rule(id=rid, effect=effect, reason=reason.strip(), when=when, unless=unless, file=fname,
                line=line)


def _parse_mask(raw: Any, fname: str, targets: set[str] | None) -> MaskRule:
    rid, line = _parse_common(raw, "mask", fname, MASK_KEYS)
    when = _parse_condition(raw.get("when") or {}, "when", fname, line, rid, targets)
    unless = None
    if raw.get("unless") is not None:
        unless = _parse_condition(raw["unless"], "unless", fname, line, rid, targets)
    lists = {}
    for k in ("json_paths", "columns", "detectors"):
        lists[k] = tuple(_str_list(raw[k], k, fname, line, rid)) if k in raw else ()
    if not any(lists.values()):
        raise PolicyError("mask needs json_paths, columns or detectors", file=fname, line=line,
                          rule_id=rid)
    strategy = raw.get("strategy", "redact")
    if strategy is None:
        strategy = "null"  # YAML reads `strategy: null` as None
    return MaskRule(id=rid, when=when, unless=unless, strategy=strategy, file=fname, line=line,
                    **lists)


def _parse_test(raw: Any, fname: str) -> PolicyTest:
    if not isinstance(raw, dict):
        raise PolicyError("each test must be a mapping", file=fname)
    line = raw.get("__line__", 0)
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise PolicyError("test without a name", file=fname, line=line)
    _unknown_keys(raw, TEST_KEYS, fname, line, name, "test key")
    expect = raw.get("expect")
    if expect not in EFFECTS:
        raise PolicyError(f"expect must be one of {', '.join(EFFECTS)}", file=fname, line=line,
                          rule_id=name)
    identity = _strip_lines(raw.get("identity") or {})
    request = _strip_lines(raw.get("request") or {})
    if not isinstance(identity, dict) or "sub" not in identity:
        raise PolicyError("test identity needs sub", file=fname, line=line, rule_id=name)
    if not isinstance(request, dict) or "target" not in request:
        raise PolicyError("test request needs target", file=fname, line=line, rule_id=name)
    kinds = [k for k in ("http", "kubernetes", "sql") if k in request]
    if len(kinds) != 1:
        raise PolicyError("test request needs exactly one of http, kubernetes, sql", file=fname,
                          line=line, rule_id=name)
    masked = raw.get("masked")
    if masked is not None and (not isinstance(masked, list)
                               or not all(isinstance(m, str) for m in masked)):
        raise PolicyError("masked: must be a list of paths, columns or mask ids ([] = no mask)",
                          file=fname, line=line, rule_id=name)
    return PolicyTest(name=name, identity=identity, request=request, expect=expect,
                      masked=tuple(masked) if masked is not None else None, file=fname,
                      line=line)


# ---------------------------------------------------------------------------------------------
# Matching


@lru_cache(maxsize=4096)
def _glob_re(pattern: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(pattern), re.DOTALL)


def glob_match(patterns: Sequence[str], value: str | None) -> bool:
    """fnmatch-style globs (`*` matches any characters). None never matches."""
    if value is None:
        return False
    return any(_glob_re(p).match(value) is not None for p in patterns)


def _part_glob(pattern: str, sep: str, question: bool = False, empty_tail: bool = False) -> str:
    """Regex source for a glob over `sep`-separated parts: `*` stays inside one part, `**`
    spans parts; `?` is one character of a part when `question`; with `empty_tail`, `<sep>**`
    as a whole part also matches zero parts (`/v1/**` matches `/v1`)."""
    part = f"[^{re.escape(sep)}]"
    out = []
    i = 0
    while i < len(pattern):
        if empty_tail and pattern.startswith(sep + "**", i) and (
                i + 3 == len(pattern) or pattern[i + 3] == sep):
            out.append(f"(?:{re.escape(sep)}{part}+)*")  # zero or more whole parts
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append(part + "*")
            i += 1
        elif question and pattern[i] == "?":
            out.append(part)
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


@lru_cache(maxsize=4096)
def _path_re(pattern: str) -> re.Pattern[str]:
    """`*` matches one path segment (or part of one), `**` any number of segments."""
    # Case-insensitive: many upstreams route `/V1/ADMIN` like `/v1/admin`, so a deny must too.
    return re.compile(_part_glob(pattern, "/", empty_tail=True) + r"/?\Z",
                      re.DOTALL | re.IGNORECASE)


def path_match(patterns: Sequence[str], path: str | None) -> bool:
    if path is None:
        return False
    return any(_path_re(p).match(path) is not None for p in patterns)


def _k8s_resource_name(k8s: dict[str, Any]) -> str | None:
    resource = k8s.get("resource")
    if not resource:
        return None
    group = k8s.get("group") or ""
    return f"{resource}.{group}" if group else resource


def _match_http(cond: dict[str, Any], op: Operation) -> bool:
    http = op.http
    if http is None:
        return False
    if "methods" in cond and "*" not in cond["methods"] and http.get("method") not in cond["methods"]:
        return False
    if "paths" in cond and not path_match(cond["paths"], http.get("path")):
        return False
    return True


@lru_cache(maxsize=4096)
def _word_glob_re(pattern: str) -> re.Pattern[str]:
    """Command globs in narrow mode: `*` stays inside one argument, `**` spans arguments."""
    return re.compile(_part_glob(pattern, " ", question=True) + r"\Z", re.DOTALL)


def _match_kubernetes(cond: dict[str, Any], op: Operation, broad: bool) -> bool:
    k8s = op.kubernetes
    if k8s is None:
        return False
    if k8s.get("nonresource") and not broad:
        return False  # non-resource URLs are allowed with http: conditions only
    checks = (
        ("verbs", k8s.get("verb")),
        ("resources", _k8s_resource_name(k8s)),
        ("subresources", k8s.get("subresource")),
        ("namespaces", k8s.get("namespace")),
        ("names", k8s.get("name")),
    )
    for key, value in checks:
        if key in cond and not glob_match(cond[key], value):
            return False
    sub = k8s.get("subresource")
    if not broad and "resources" in cond and "subresources" not in cond and sub and (
            sub != k8s.get("verb") or "verbs" not in cond):
        # An allow on a resource does not reach its subresources (log, status, …) unless they
        # are named; exec/attach/portforward/proxy are named by their verb.
        return False
    if "commands" in cond:
        command = k8s.get("command")
        if command is None:
            return False
        if broad:
            if not glob_match(cond["commands"], command):
                return False
        elif not any(_word_glob_re(p).match(command) for p in cond["commands"]):
            return False
    if "impersonate" in cond and bool(k8s.get("impersonate")) != cond["impersonate"]:
        return False
    return True


def _match_sql(cond: dict[str, Any], op: Operation, broad: bool) -> bool:
    sql = op.sql
    if sql is None:
        return False
    if "statements" in cond and "*" not in cond["statements"] and sql.get("kind") not in cond[
        "statements"
    ]:
        return False
    if "tables" in cond:
        table = sql.get("table")
        if table is None:
            return False
        # Unqualified names in patterns match the table's bare name too.
        bare = table.split(".", 1)[-1]
        if not (glob_match(cond["tables"], table) or glob_match(cond["tables"], bare)):
            return False
    # Broad (deny): any referenced column/function in the list matches. Narrow (allow): every
    # referenced column/function must be in the list.
    for key in ("columns", "functions"):
        if key in cond:
            used = sql.get(key) or []
            hits = [glob_match(cond[key], c) for c in used]
            if not (any(hits) if broad else all(hits)):
                return False
    if "unbounded" in cond and bool(sql.get("unbounded")) != cond["unbounded"]:
        return False
    return True


def condition_matches(cond: dict[str, Any], identity: Identity | None, op: Operation,
                      broad: bool = True) -> bool:
    """`broad` is how deny rules (and the `unless` of allow rules, and masks) match: when in
    doubt, match. Allow/review rules match narrowly: when in doubt, don't. The difference shows
    only where a condition is a set question — subresources of a resource, command globs across
    arguments, the columns/functions a statement uses, non-resource Kubernetes URLs."""
    if "subjects" in cond and (identity is None or not glob_match(cond["subjects"], identity.sub)):
        return False
    if "groups" in cond:
        if identity is None or not any(glob_match(cond["groups"], g) for g in identity.groups):
            return False
    if "targets" in cond and not glob_match(cond["targets"], op.target):
        return False
    if "http" in cond and not _match_http(cond["http"], op):
        return False
    if "kubernetes" in cond and not _match_kubernetes(cond["kubernetes"], op, broad):
        return False
    if "sql" in cond and not _match_sql(cond["sql"], op, broad):
        return False
    return True


def _applies(when: dict[str, Any], unless: dict[str, Any] | None, identity: Identity | None,
             op: Operation, broad: bool) -> bool:
    if not condition_matches(when, identity, op, broad):
        return False
    return not (unless is not None and condition_matches(unless, identity, op, not broad))


def matching_rules(policy: PolicySet, identity: Identity | None, op: Operation) -> list[Rule]:
    return [r for r in policy.rules
            if _applies(r.when, r.unless, identity, op, broad=r.effect == "deny")]


def decide_operation(policy: PolicySet, identity: Identity | None, op: Operation
                     ) -> OperationDecision:
    rules = matching_rules(policy, identity, op)
    matches = tuple(RuleMatch(r.id, r.effect, r.reason) for r in rules)
    if not matches:
        return OperationDecision(op, "deny", ())
    effect = max((m.effect for m in matches), key=STRICTNESS.__getitem__)
    if effect != "deny" and op.kubernetes is not None and op.kubernetes.get("impersonate"):
        # Impersonate-* headers are refused unless a rule allows them by name.
        explicit = any(r.effect == effect and r.when.get("kubernetes", {}).get("impersonate")
                       is True for r in rules)
        if not explicit:
            return OperationDecision(op, "deny", matches + (IMPERSONATION_DENIED,))
    return OperationDecision(op, effect, matches)


def evaluate(policy: PolicySet, identity: Identity | None, operations: Sequence[Operation]
             ) -> Decision:
    """Decide a request made of `operations`. No operations at all is denied."""
    if not operations:
        return Decision("deny", DEFAULT_DENY, "request has no operation to decide", (DEFAULT_DENY,))
    per_op = tuple(decide_operation(policy, identity, op) for op in operations)
    effect = max((d.effect for d in per_op), key=STRICTNESS.__getitem__)
    rules: list[str] = []
    first: RuleMatch | None = None
    default = False
    for d in per_op:
        if d.effect != effect:
            continue
        deciding = [m for m in d.matches if m.effect == effect]
        if not deciding:
            default = True
            continue
        for m in deciding:
            if first is None:
                first = m
            if m.id not in rules:
                rules.append(m.id)
    if default and effect == "deny":
        # A default-denied operation is the clearest explanation when no rule denied.
        if first is None:
            return Decision("deny", DEFAULT_DENY, DEFAULT_DENY_REASON, (DEFAULT_DENY,), per_op)
        rules.append(DEFAULT_DENY)
    assert first is not None
    return Decision(effect, first.id, first.reason, tuple(rules), per_op)


def matching_masks(policy: PolicySet, identity: Identity | None, op: Operation) -> list[MaskRule]:
    """Every mask whose when matches (and unless does not) applies."""
    return [m for m in policy.masks if _applies(m.when, m.unless, identity, op, broad=True)]


# ---------------------------------------------------------------------------------------------
# mitmproxy adapter


def http_operation(target: str, method: str, path: str) -> Operation:
    return Operation(protocol="http", target=target, summary=f"{method} {path}",
                     http={"method": method, "path": path}, fingerprint=f"http {method} {path}")


def refusal_for(decision: Decision) -> Exception | None:
    """The error a non-allow decision turns into (None when allowed)."""
    from addons.model import ApprovalRequired, Denied

    if decision.effect == "allow":
        return None
    if decision.effect == "review":
        return ApprovalRequired(decision.reason or "this operation needs a human approval",
                                rule=decision.rule)
    return Denied(decision.reason or DEFAULT_DENY_REASON, rule=decision.rule)


class PolicyAddon:
    """Classifies each request into operations and decides it against the policy in force."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def request(self, flow) -> None:  # noqa: ANN001
        from addons import flows
        from addons.httppath import encode_path, normalise_path

        with flows.guard(flow):
            if flow.response is not None:
                return
            target = flow.metadata[flows.TARGET]
            identity = flow.metadata[flows.IDENTITY]
            policy = self.store.current
            flow.metadata[flows.POLICY] = policy
            path = normalise_path(flow.request.path)
            query = flow.request.path.partition("?")[2]
            # What goes upstream is exactly what was decided on.
            flow.request.path = encode_path(path) + (f"?{query}" if query else "")
            method = flow.request.method.upper()
            if target.protocol == "kubernetes":
                from addons import kubernetes

                ops = [kubernetes.to_operation(
                    target.name, method, path, list(flow.request.query.items(multi=True)),
                    dict(flow.request.headers.items()))]
            else:
                ops = [http_operation(target.name, method, path)]
            flow.metadata[flows.OPERATIONS] = ops
            decision = evaluate(policy, identity, ops)
            flow.metadata[flows.DECISION] = decision
            err = refusal_for(decision)
            if err is not None:
                raise err
