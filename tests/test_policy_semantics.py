"""Allow rules match narrowly, deny rules broadly, where a condition is a set question."""

from __future__ import annotations

from pathlib import Path

from addons.kubernetes import parse_shorthand
from addons.model import Identity, Operation
from addons.policy import evaluate, load_policies

AGENT = Identity(sub="agent-1", iss="t", groups=("sre",))

POLICY = """
rules:
  - id: read-pods
    effect: allow
    when: {kubernetes: {verbs: [get, list], resources: [pods]}}
  - id: cat-logs
    effect: allow
    when: {kubernetes: {verbs: [exec], resources: [pods], commands: ["cat /var/log/*"]}}
  - id: no-rm
    effect: deny
    when: {kubernetes: {commands: ["rm *"]}}
  - id: get-only
    effect: allow
    when: {targets: [other], kubernetes: {verbs: [get]}}
  - id: select-safe-columns
    effect: allow
    when: {sql: {statements: [select], tables: [users], columns: [id, name]}}
  - id: no-ssn
    effect: deny
    when: {sql: {columns: [ssn]}}
"""


def decide(tmp_path: Path, op: Operation) -> tuple[str, str]:
    (tmp_path / "p.yaml").write_text(POLICY)
    d = evaluate(load_policies(tmp_path), AGENT, [op])
    return d.effect, d.rule


def sql_op(columns: list[str]) -> Operation:
    return Operation("postgres", "db", "select", sql={"kind": "select", "table": "public.users",
                                                      "columns": columns, "functions": [],
                                                      "unbounded": False})


def test_allow_on_resource_does_not_reach_subresources(tmp_path: Path) -> None:
    assert decide(tmp_path, parse_shorthand("get pods/web -n a", "k"))[0] == "allow"
    assert decide(tmp_path, parse_shorthand("get pods/web/log -n a", "k"))[0] == "deny"


def test_allow_command_glob_stays_in_one_argument(tmp_path: Path) -> None:
    ok = parse_shorthand("exec pods/web -n a -- cat /var/log/syslog", "k")
    assert decide(tmp_path, ok) == ("allow", "cat-logs")
    sneaky = parse_shorthand("exec pods/web -n a -- cat /var/log/x /etc/shadow", "k")
    assert decide(tmp_path, sneaky)[0] == "deny"


def test_deny_command_glob_spans_arguments(tmp_path: Path) -> None:
    op = parse_shorthand("exec pods/web -n a -- rm -rf /", "k")
    assert decide(tmp_path, op) == ("deny", "no-rm")


def test_kubernetes_allow_never_matches_non_resource_urls(tmp_path: Path) -> None:
    op = parse_shorthand("get /logs/", "other")
    assert decide(tmp_path, op) == ("deny", "default-deny")


def test_sql_allow_needs_every_column_deny_needs_any(tmp_path: Path) -> None:
    assert decide(tmp_path, sql_op(["id", "name"])) == ("allow", "select-safe-columns")
    assert decide(tmp_path, sql_op(["id", "email"]))[0] == "deny"
    assert decide(tmp_path, sql_op(["id", "ssn"])) == ("deny", "no-ssn")


IMPERSONATION = """
rules:
  - id: read-pods
    effect: allow
    when: {kubernetes: {verbs: [list], resources: [pods]}}
  - id: ops-impersonate
    effect: allow
    when: {subjects: [ops-*], kubernetes: {verbs: [list], resources: [pods], impersonate: true}}
"""


def test_impersonation_needs_a_rule_that_names_it(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(IMPERSONATION)
    policy = load_policies(tmp_path)
    plain = parse_shorthand("list pods -n a", "k")
    imp = parse_shorthand("list pods -n a --as admin", "k")
    assert imp.kubernetes is not None and imp.kubernetes["impersonate"] is True
    assert evaluate(policy, AGENT, [plain]).effect == "allow"
    d = evaluate(policy, AGENT, [imp])
    assert (d.effect, d.rule) == ("deny", "impersonation-not-allowed")
    ops = Identity(sub="ops-1", iss="t", groups=())
    assert evaluate(policy, ops, [imp]).effect == "allow"
