"""`./mitm.sh policy check|test|explain` (SPEC §1, §4). Exit codes: 0 ok, 1 failed, 2 usage.

The tooling reads only `policies` and `targets[].name/protocol` from the gateway config, so it
runs in CI without the secrets the gateway itself needs. It decides with the very engine the
gateway uses (`addons.policy`), after the same request preparation (`addons.policycases`). A
request the gateway would refuse before policy (ambiguous path, unclassifiable Kubernetes call,
unparseable SQL) is reported as `deny` with `refused: reason`.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table
from rich.text import Text

from addons.model import Identity, Operation
from addons.policy import (
    MaskRule,
    PolicyError,
    PolicySet,
    Rule,
    load_file,
    load_policies,
    policy_files,
)
from addons.policycases import (
    KIND_PROTOCOL,
    TEST_ISSUER,
    Outcome,
    RequestError,
    decide,
    missing_cases,
    prepare,
    prepare_test,
    rule_state,
    run_tests,
)

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
PROTOCOLS = ("http", "kubernetes", "postgres")


class UsageError(Exception):
    """Bad arguments or configuration (exit 2)."""


@dataclass
class ToolConfig:
    path: Path | None
    policies: Path
    targets: dict[str, str] | None  # name -> protocol; None without a config


# ---------------------------------------------------------------------------------------------
# Config, loading


def read_config(config_arg: str | None, dir_arg: str | None) -> ToolConfig:
    default = "gateway.yaml"
    path = Path(config_arg or default)
    explicit = (config_arg not in (None, default)) or "PORTCULLIS_CONFIG" in os.environ
    if not path.exists():
        if explicit:
            raise UsageError(f"config {path} does not exist")
        return ToolConfig(None, Path(dir_arg or "policies"), None)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UsageError(f"{path}: config: cannot read: {e}") from e
    doc = doc if doc is not None else {}
    if not isinstance(doc, dict):
        raise UsageError(f"{path}: config: must be a mapping")
    pol = doc.get("policies", "policies")
    if not isinstance(pol, str) or not pol:
        raise UsageError(f"{path}: policies: must be a path")
    pol_path = Path(os.path.expanduser(pol))
    if not pol_path.is_absolute():
        pol_path = _short(path.resolve().parent / pol_path)
    targets: dict[str, str] = {}
    raw_targets = doc.get("targets") or []
    if not isinstance(raw_targets, list):
        raise UsageError(f"{path}: targets: must be a list")
    for i, t in enumerate(raw_targets):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"]:
            raise UsageError(f"{path}: targets[{i}].name: is required")
        if t.get("protocol") not in PROTOCOLS:
            raise UsageError(f"{path}: targets[{i}].protocol: must be one of "
                             f"{', '.join(PROTOCOLS)}")
        targets[t["name"]] = t["protocol"]
    return ToolConfig(path, Path(dir_arg) if dir_arg else pol_path, targets)


def _short(p: Path) -> Path:
    """`policies` rather than `/abs/path/to/cwd/policies` in messages, when under the cwd."""
    try:
        return p.relative_to(Path.cwd())
    except ValueError:
        return p


def load_collecting(directory: Path, targets: Sequence[str] | None
                    ) -> tuple[PolicySet, list[PolicyError]]:
    """Load every file like the gateway does, but keep going after an error to report all."""
    try:
        files = policy_files(directory)
    except PolicyError as e:
        raise UsageError(str(e)) from e
    policy = PolicySet()
    seen_rules: dict[str, str] = {}
    seen_masks: dict[str, str] = {}
    known = set(targets) if targets is not None else None
    errors: list[PolicyError] = []
    for path in files:
        try:
            load_file(path, policy, seen_rules, seen_masks, known)
        except PolicyError as e:
            if str(path) not in policy.files:
                policy.files.append(str(path))
            errors.append(e)
    return policy, errors


# ---------------------------------------------------------------------------------------------
# Requests -> operations


# ---------------------------------------------------------------------------------------------
# Output helpers


def make_console() -> Console:
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return Console(highlight=False)
    return Console(highlight=False, width=max(shutil.get_terminal_size((200, 24)).columns, 200))


def t(value: Any, style: str | None = None) -> Text:
    """Plain text for rich (policy ids like `[x]` must never be read as markup)."""
    return Text("" if value is None else str(value), style=style or "")


def where(file: str | None, line: int | None) -> str:
    return f"{file}:{line}" if file and line else (file or "")


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_check(cfg: ToolConfig, out: Console) -> int:
    policy, errors = load_collecting(cfg.policies, _target_names(cfg))
    for test in policy.tests:
        try:
            prepare_test(cfg.targets, test)
        except RequestError as e:
            errors.append(PolicyError(str(e), file=test.file, line=test.line, rule_id=test.name))
    _print_source(cfg, out)
    bad_files = Counter(e.file for e in errors)
    table = Table(title="policy check", title_justify="left")
    for col in ("file", "rules", "masks", "tests", "status"):
        table.add_column(col, overflow="fold")
    for f in policy.files:
        n = bad_files.get(f, 0)
        table.add_row(t(f), t(sum(r.file == f for r in policy.rules)),
                      t(sum(m.file == f for m in policy.masks)),
                      t(sum(x.file == f for x in policy.tests)),
                      t(f"{n} error(s)", "bold red") if n else t("ok", "green"))
    out.print(table)
    if not policy.files:
        out.print(t(f"no policy files (*.yaml, *.yml) under {cfg.policies}", "bold red"))
        return EXIT_FAIL
    if errors:
        err = Table(title="errors", title_justify="left", title_style="bold red")
        for col in ("file", "line", "rule / test", "error"):
            err.add_column(col, overflow="fold")
        for problem in errors:
            err.add_row(t(problem.file), t(problem.line or ""), t(problem.rule_id or ""),
                        t(problem.message, "red"))
        out.print(err)
        for problem in errors:  # one grep-able line each, never wrapped
            out.print(t(f"error: {problem}", "red"), soft_wrap=True)
        out.print(t(f"{len(errors)} error(s) in {len(bad_files)} file(s)", "bold red"))
        return EXIT_FAIL
    out.print(t(f"OK: {len(policy.files)} file(s), {len(policy.rules)} rule(s), "
                f"{len(policy.masks)} mask(s), {len(policy.tests)} test(s)", "bold green"))
    return EXIT_OK


def cmd_test(cfg: ToolConfig, out: Console) -> int:
    policy, errors = load_collecting(cfg.policies, _target_names(cfg))
    _print_source(cfg, out)
    if errors:
        for e in errors:
            out.print(t(f"error: {e}", "red"), soft_wrap=True)
        out.print(t("policy files do not load; run `policy check` for details", "bold red"))
        return EXIT_FAIL
    results = run_tests(cfg.targets, policy)
    table = Table(title="policy test", title_justify="left")
    for col in ("result", "test", "where", "request", "expect", "got", "rules / reason"):
        table.add_column(col, overflow="fold")
    style = {"PASS": "green", "FAIL": "bold red", "ERROR": "bold red"}
    for r in results:
        kind = next(k for k in ("http", "kubernetes", "sql") if k in r.test.request)
        req = f"{r.test.request.get('target')}: {r.test.request[kind]}"
        table.add_row(t(r.status, style[r.status]), t(r.test.name),
                      t(where(r.test.file, r.test.line)), t(req), t(r.test.expect), t(r.got),
                      t(r.detail))
    out.print(table)
    for r in results:
        if r.status != "PASS":
            out.print(t(f"{r.status.lower()}: {where(r.test.file, r.test.line)} "
                        f"[{r.test.name}]: {r.detail}", "red"), soft_wrap=True)
    for f, missing in missing_cases(policy).items():
        out.print(t(f"warning: {f} has rules but no test case expecting {' or '.join(missing)}",
                    "yellow"), soft_wrap=True)
    counts = Counter(r.status for r in results)
    summary = (f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['ERROR']} error(s) "
               f"in {len(policy.files)} file(s)")
    if not results:
        out.print(t(f"no tests: cases under {cfg.policies}", "bold red"))
        return EXIT_FAIL
    ok = counts["PASS"] == len(results)
    out.print(t(summary, "bold green" if ok else "bold red"))
    return EXIT_OK if ok else EXIT_FAIL


def cmd_explain(cfg: ToolConfig, args: Any, out: Console) -> int:
    try:
        policy = load_policies(cfg.policies, _target_names(cfg))
    except PolicyError as e:
        raise UsageError(f"policy does not load: {e}") from e
    target = args.target
    kind = "http" if args.http is not None else "kubernetes" if args.k8s is not None else "sql"
    text = {"http": args.http, "kubernetes": args.k8s, "sql": args.sql}[kind]
    if cfg.targets is not None:
        if target not in cfg.targets:
            raise UsageError(f"unknown target {target!r} (configured in {cfg.path}: "
                             f"{', '.join(sorted(cfg.targets)) or 'none'})")
        protocol = cfg.targets[target]
    else:
        named = _targets_named_in(policy)
        if target not in named:
            raise UsageError(f"unknown target {target!r}: no config found and no policy names it "
                             f"(named: {', '.join(sorted(named)) or 'none'}); pass --config")
        protocol = KIND_PROTOCOL[kind]
    identity = Identity(args.sub, iss=TEST_ISSUER,
                        groups=tuple(g for g in (args.groups or "").split(",") if g))
    try:
        prepared = prepare(kind, text, target, protocol)
    except RequestError as e:
        raise UsageError(str(e)) from e
    got = decide(policy, identity, prepared)
    _print_source(cfg, out)
    out.print(t(f"identity: sub={identity.sub} groups={','.join(identity.groups) or '-'}   "
                f"target: {target} ({protocol})   request: {text}"), soft_wrap=True)
    colour = {"allow": "bold green", "deny": "bold red", "review": "bold yellow"}[got.effect]
    head = Text("decision: ")
    head.append(got.effect.upper(), style=colour)
    if got.decision is not None:
        head.append(f"  rule: {got.decision.rule}  reason: {got.reason or '-'}")
        head.append(f"  rules: {', '.join(got.rules)}")
    else:
        head.append(f"  {got.reason} (the gateway answers 400 before any policy rule)")
    out.print(head, soft_wrap=True)
    if got.decision is None:
        return EXIT_OK
    _explain_tables(policy, identity, got, out)
    return EXIT_OK


def _explain_tables(policy: PolicySet, identity: Identity, got: Outcome, out: Console) -> None:
    assert got.decision is not None
    ops = Table(title="operations", title_justify="left")
    for col in ("#", "operation", "details", "effect"):
        ops.add_column(col, overflow="fold")
    for i, od in enumerate(got.decision.operations, 1):
        ops.add_row(t(i), t(od.operation.summary), t(_details(od.operation)),
                    t(od.effect + ("" if od.matches else " (default deny)")))
    out.print(ops)
    rules = Table(title="matching rules", title_justify="left")
    for col in ("rule", "effect", "where", "op", "reason", "note"):
        rules.add_column(col, overflow="fold")
    n = 0
    for i, od in enumerate(got.decision.operations, 1):
        for rule in policy.rules:
            state = rule_state(rule, identity, od.operation)
            if state is None:
                continue
            n += 1
            note = state or ("decides" if rule.effect == od.effect else "outranked")
            rules.add_row(t(rule.id), t(rule.effect), t(where(rule.file, rule.line)), t(i),
                          t(rule.reason), t(note))
        ids = {r.id for r in policy.rules}
        for m in od.matches:  # built-in decisions such as impersonation-not-allowed
            if m.id not in ids:
                n += 1
                rules.add_row(t(m.id), t(m.effect), t("(built-in)"), t(i), t(m.reason),
                              t("decides" if m.effect == od.effect else "outranked"))
    out.print(rules if n else t("matching rules: none (default deny)"))
    masks = Table(title="masks that would apply", title_justify="left")
    for col in ("mask", "strategy", "json_paths", "columns", "detectors", "where"):
        masks.add_column(col, overflow="fold")
    for mask in got.masks:
        masks.add_row(t(mask.id), t(mask.strategy), t(", ".join(mask.json_paths)),
                      t(", ".join(mask.columns)), t(", ".join(mask.detectors)),
                      t(where(mask.file, mask.line)))
    out.print(masks if got.masks else t("masks that would apply: none"))


def _details(op: Operation) -> str:
    fields = op.kubernetes or op.sql or op.http or {}
    shown = []
    for k, v in fields.items():
        if v in (None, "", [], False) and k != "unbounded":
            continue
        if isinstance(v, list):
            v = ",".join(map(str, v))
        shown.append(f"{k}={v}")
    return " ".join(shown)


def _targets_named_in(policy: PolicySet) -> set[str]:
    names: set[str] = set()
    items: list[Rule | MaskRule] = [*policy.rules, *policy.masks]
    for item in items:
        for cond in (item.when, item.unless or {}):
            names.update(x for x in cond.get("targets", []) if not any(c in x for c in "*?["))
    names.update(target for x in policy.tests if (target := x.request.get("target")))
    return names


def _target_names(cfg: ToolConfig) -> list[str] | None:
    return list(cfg.targets) if cfg.targets is not None else None


def _print_source(cfg: ToolConfig, out: Console) -> None:
    if cfg.targets is None:
        src = "no config (targets not checked)"
    else:
        src = f"config {cfg.path} (targets: {', '.join(sorted(cfg.targets)) or 'none'})"
    out.print(t(f"policies: {cfg.policies}   {src}", "dim"), soft_wrap=True)


def main(args: Any, console: Console | None = None) -> int:
    out = console or make_console()
    try:
        cfg = read_config(getattr(args, "config", None), getattr(args, "dir", None))
        if args.policy_cmd == "check":
            return cmd_check(cfg, out)
        if args.policy_cmd == "test":
            return cmd_test(cfg, out)
        if args.policy_cmd == "explain":
            return cmd_explain(cfg, args, out)
        raise UsageError(f"unknown policy command {args.policy_cmd!r}")
    except UsageError as e:
        print(f"portcullis: {e}", file=sys.stderr)
        return EXIT_USAGE
