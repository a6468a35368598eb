"""Policy test cases, pure: request text -> operations -> decision, compared with `expect`.

No rich, no config I/O (the CLI is `addons/policytools.py`). A test or `policy explain` request is
prepared exactly as the gateway prepares a live one: HTTP paths normalised
(`addons.httppath`), Kubernetes requests classified (`addons.kubernetes`), SQL classified with
libpg_query (`addons.sql`). A request the gateway refuses before policy (ambiguous path,
unclassifiable Kubernetes call, unparseable SQL) is `Prepared.refused` and decides `deny`. A
malformed request text is a `RequestError`: an error of the test, never a denial (a typo must not
make a deny-expecting case pass).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from addons.model import BadRequest, Decision, Identity, Operation
from addons.policy import (
    MaskRule,
    PolicySet,
    PolicyTest,
    Rule,
    condition_matches,
    evaluate,
    glob_match,
    http_operation,
    matching_masks,
)

KIND_PROTOCOL = {"http": "http", "kubernetes": "kubernetes", "sql": "postgres"}
REQUEST_KEYS = {"target", "http", "kubernetes", "sql"}
IDENTITY_KEYS = {"sub", "groups"}
TEST_ISSUER = "policy-test"
_HTTP_LINE = re.compile(r"\s*([A-Za-z][A-Za-z0-9_-]*)\s+(\S+)\s*\Z")


class RequestError(ValueError):
    """A test's or explain's request text is malformed (an error of the test, not a refusal)."""


@dataclass
class Prepared:
    """A request as the gateway sees it: operations, or the reason it is refused before policy."""

    operations: list[Operation] = field(default_factory=list)
    refused: str | None = None


@dataclass
class Outcome:
    effect: str
    rules: tuple[str, ...]
    reason: str
    masks: list[MaskRule]
    decision: Decision | None = None


@dataclass
class CaseResult:
    test: PolicyTest
    status: str  # PASS | FAIL | ERROR
    got: str  # the effect, "" on ERROR
    detail: str


def build_identity(raw: Any) -> Identity:
    if not isinstance(raw, dict):
        raise RequestError("identity must be a mapping with sub and groups")
    unknown = set(raw) - IDENTITY_KEYS
    if unknown:
        raise RequestError(f"unknown identity key {sorted(unknown)[0]!r} (allowed: groups, sub)")
    sub = raw.get("sub")
    if not isinstance(sub, str) or not sub:
        raise RequestError("identity.sub must be a non-empty string")
    groups = raw.get("groups") or []
    if isinstance(groups, str):
        groups = [g for g in groups.split(",") if g]
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise RequestError("identity.groups must be a list of strings")
    return Identity(sub, iss=TEST_ISSUER, groups=tuple(groups))


def prepare(kind: str, text: Any, target: str, protocol: str | None) -> Prepared:
    """Turn `http:`/`kubernetes:`/`sql:` request text into operations (RequestError if bad)."""
    if not isinstance(text, str) or not text.strip():
        raise RequestError(f"{kind}: must be a non-empty string")
    if protocol is not None and protocol != KIND_PROTOCOL[kind] and not (
            kind == "http" and protocol == "kubernetes"):
        use = {"http": "http", "kubernetes": "kubernetes", "postgres": "sql"}[protocol]
        raise RequestError(f"target {target!r} is a {protocol} target: use {use}:")
    if kind == "http":
        return _prepare_http(text, target, protocol)
    if kind == "kubernetes":
        return _prepare_k8s(text, target)
    return _prepare_sql(text, target)


def _prepare_http(text: str, target: str, protocol: str | None) -> Prepared:
    m = _HTTP_LINE.match(text)
    if not m or not m.group(2).startswith("/"):
        raise RequestError(f"http: write 'METHOD /path', got {text!r}")
    method, raw_path = m.group(1).upper(), m.group(2)
    try:
        path = normalise(raw_path)
    except BadRequest as e:
        return Prepared(refused=e.reason)
    if protocol == "kubernetes":
        from urllib.parse import parse_qsl

        from addons import kubernetes

        query = parse_qsl(raw_path.partition("?")[2], keep_blank_values=True)
        try:
            return Prepared([kubernetes.to_operation(target, method, path, query, {})])
        except ValueError as e:
            return Prepared(refused=str(e))
    return Prepared([http_operation(target, method, path)])


def normalise(path: str) -> str:
    from addons.httppath import normalise_path

    return normalise_path(path)


def _prepare_k8s(text: str, target: str) -> Prepared:
    from addons import kubernetes

    try:
        method, path, query, headers = kubernetes.shorthand_request(text)
    except ValueError as e:
        raise RequestError(f"kubernetes: {e}") from e
    try:
        path = normalise(path)
    except BadRequest as e:
        return Prepared(refused=e.reason)
    try:
        return Prepared([kubernetes.to_operation(target, method, path, query, headers)])
    except ValueError as e:
        return Prepared(refused=str(e))


def _prepare_sql(text: str, target: str) -> Prepared:
    from addons import sql

    classify = getattr(sql, "classify", None)
    to_operations = getattr(sql, "to_operations", None)
    if classify is None or to_operations is None:
        raise RequestError("sql: SQL classification is not available in this build")
    try:
        classification = classify(text)
    except ValueError as e:  # the gateway denies what libpg_query cannot classify
        return Prepared(refused=f"SQL cannot be classified: {e}")
    return Prepared(list(to_operations(classification, target)))


def decide(policy: PolicySet, identity: Identity, prepared: Prepared) -> Outcome:
    if prepared.refused is not None:
        return Outcome("deny", ("refused",), f"refused: {prepared.refused}", [])
    decision = evaluate(policy, identity, prepared.operations)
    masks: dict[str, MaskRule] = {}
    for op in prepared.operations:
        for m in matching_masks(policy, identity, op):
            masks.setdefault(m.id, m)
    return Outcome(decision.effect, decision.rules, decision.reason, list(masks.values()),
                   decision)


def mask_gaps(expected: Sequence[str], masks: Sequence[MaskRule]) -> list[str]:
    """What a test's `masked:` list says that the matching masks do not deliver.

    An item is covered by a mask id, a json_path, or a column (equal, or matched by the mask's
    column glob such as `*.ssn`). `masked: []` says no mask applies.
    """
    if not expected:
        return [f"unexpected mask {m.id}" for m in masks]
    gaps = []
    for item in expected:
        if not any(item == m.id or item in m.json_paths or item in m.columns
                   or glob_match(m.columns, item) for m in masks):
            gaps.append(f"not masked: {item}")
    return gaps


def target_name(target: Any) -> str:
    """`request.target` as a target name (RequestError if it is not a non-empty string)."""
    if not isinstance(target, str) or not target:
        raise RequestError("request.target must be a target name")
    return target


def target_protocol(targets: Mapping[str, str] | None, target: Any) -> str | None:
    """The configured protocol of `target` (None when no config says; RequestError if unknown)."""
    target = target_name(target)
    if targets is None:
        return None
    if target not in targets:
        raise RequestError(f"unknown target {target!r} (configured: "
                           f"{', '.join(sorted(targets)) or 'none'})")
    return targets[target]


def prepare_test(targets: Mapping[str, str] | None, test: PolicyTest
                 ) -> tuple[Identity, Prepared]:
    unknown = set(test.request) - REQUEST_KEYS
    if unknown:
        raise RequestError(f"unknown request key {sorted(unknown)[0]!r} "
                           f"(allowed: {', '.join(sorted(REQUEST_KEYS))})")
    identity = build_identity(test.identity)
    target = target_name(test.request.get("target"))
    protocol = target_protocol(targets, target)
    kind = next(k for k in ("http", "kubernetes", "sql") if k in test.request)
    return identity, prepare(kind, test.request[kind], target, protocol)


def run_tests(targets: Mapping[str, str] | None, policy: PolicySet) -> list[CaseResult]:
    """Run every test case of `policy`."""
    results = []
    for test in policy.tests:
        try:
            identity, prepared = prepare_test(targets, test)
        except RequestError as e:
            results.append(CaseResult(test, "ERROR", "", str(e)))
            continue
        got = decide(policy, identity, prepared)
        problems = []
        if got.effect != test.expect:
            problems.append(f"expected {test.expect}")
        if test.masked is not None:
            problems += mask_gaps(test.masked, got.masks)
        detail = ", ".join(got.rules)
        if got.effect != "allow" and got.reason:
            detail += f": {got.reason}"
        if got.masks:
            detail += f" (masks: {', '.join(m.id for m in got.masks)})"
        if problems:
            detail = "; ".join(problems) + " | " + detail
        results.append(CaseResult(test, "FAIL" if problems else "PASS", got.effect, detail))
    return results


def coverage(policy: PolicySet) -> dict[str, Counter[str]]:
    """file -> how many of its tests expect allow / deny / review."""
    out: dict[str, Counter[str]] = {f: Counter() for f in policy.files}
    for test in policy.tests:
        out.setdefault(test.file, Counter())[test.expect] += 1
    return out


def missing_cases(policy: PolicySet) -> dict[str, list[str]]:
    """Files that have rules but lack an allow-expecting or a deny-expecting test case."""
    with_rules = {r.file for r in policy.rules}
    cov = coverage(policy)
    out = {}
    for f in sorted(with_rules):
        missing = [e for e in ("allow", "deny") if not cov.get(f, Counter())[e]]
        if missing:
            out[f] = missing
    return out


def rule_state(rule: Rule, identity: Identity, op: Operation) -> str | None:
    """None = does not match; "" = matches; "cancelled by unless" = when matched, unless too."""
    if not condition_matches(rule.when, identity, op):
        return None
    if rule.unless is not None and condition_matches(rule.unless, identity, op):
        return "cancelled by unless (not counted)"
    return ""
