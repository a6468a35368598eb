"""The policy engine (addons/policy.py): loading with located errors, matching, decisions."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from addons.model import Identity, Operation
from addons.policy import (
    DEFAULT_DENY,
    PolicyError,
    PolicySet,
    Rule,
    evaluate,
    glob_match,
    http_operation,
    load_policies,
    matching_masks,
    path_match,
)

AGENT = Identity("agent-7", "test", ("sre-agents", "readers"))
STRANGER = Identity("someone", "test", ())


def rule(rid: str, effect: str, when: dict | None = None, unless: dict | None = None) -> Rule:
    return Rule(rid, effect, f"reason of {rid}", when or {}, unless, "mem.yaml", 1)


def policy(*rules: Rule) -> PolicySet:
    return PolicySet(rules=list(rules))


def get(path: str, target: str = "api", method: str = "GET") -> Operation:
    return http_operation(target, method, path)


def load(tmp_path: Path, text: str, name: str = "p.yaml", **kw: object) -> PolicySet:
    (tmp_path / name).write_text(textwrap.dedent(text))
    return load_policies(tmp_path, **kw)  # type: ignore[arg-type]


def k8s_op(**fields: object) -> Operation:
    base = {"verb": "get", "group": "", "version": "v1", "resource": "pods", "subresource": None,
            "namespace": "team-a", "name": "web-1", "command": None, "impersonate": False}
    base.update(fields)
    return Operation("kubernetes", "k8s", "k8s op", http={"method": "GET", "path": "/api/v1/x"},
                     kubernetes=base)


def sql_op(kind: str = "select", table: str | None = "public.users", columns: tuple = (),
           functions: tuple = (), unbounded: bool = False) -> Operation:
    return Operation("postgres", "db", f"{kind} {table}", sql={
        "kind": kind, "table": table, "columns": list(columns), "functions": list(functions),
        "unbounded": unbounded})


# --- decisions --------------------------------------------------------------------------------

@pytest.mark.parametrize("effects,expected", [
    ((), "deny"),
    (("allow",), "allow"),
    (("review",), "review"),
    (("deny",), "deny"),
    (("allow", "review"), "review"),
    (("review", "allow"), "review"),
    (("allow", "deny"), "deny"),
    (("deny", "allow"), "deny"),
    (("allow", "review", "deny"), "deny"),
])
def test_deny_beats_review_beats_allow_beats_default_deny(effects: tuple, expected: str) -> None:
    rules = [rule(f"r{i}-{e}", e) for i, e in enumerate(effects)]
    d = evaluate(policy(*rules), AGENT, [get("/x")])
    assert d.effect == expected
    if not effects:
        assert d.rule == DEFAULT_DENY and d.rules == (DEFAULT_DENY,)
    else:
        deciding = [r.id for r in rules if r.effect == expected]
        assert d.rules == tuple(deciding) and d.rule == deciding[0]
        assert d.reason == f"reason of {deciding[0]}"


def test_no_operation_is_denied() -> None:
    d = evaluate(policy(rule("all", "allow")), AGENT, [])
    assert d.effect == "deny" and d.rule == DEFAULT_DENY


def test_strictest_operation_wins() -> None:
    p = policy(rule("read", "allow", {"http": {"methods": ["GET"]}}),
               rule("wipe", "review", {"http": {"methods": ["DELETE"]}}),
               rule("admin", "deny", {"http": {"paths": ["/admin/**"]}}))
    d = evaluate(p, AGENT, [get("/a"), get("/b", method="DELETE")])
    assert d.effect == "review" and d.rules == ("wipe",)
    assert [o.effect for o in d.operations] == ["allow", "review"]
    d = evaluate(p, AGENT, [get("/a"), get("/b", method="DELETE"), get("/admin/x")])
    assert d.effect == "deny" and d.rule == "admin"
    # an operation no rule allows denies the whole request, named as default-deny
    d = evaluate(p, AGENT, [get("/a"), get("/b", method="POST")])
    assert d.effect == "deny" and d.rule == DEFAULT_DENY and d.rules == (DEFAULT_DENY,)
    # an explicit deny is named first, and the default deny of another operation too
    d = evaluate(p, AGENT, [get("/admin/x", method="PUT"), get("/b", method="POST")])
    assert d.rule == "admin" and d.rules == ("admin", DEFAULT_DENY)


def test_unless_cancels_a_rule() -> None:
    p = policy(rule("read", "allow", {"groups": ["readers"]}, unless={"subjects": ["agent-7"]}),
               rule("nope", "deny", {"http": {"paths": ["/x"]}}, unless={"groups": ["sre-*"]}))
    assert evaluate(p, AGENT, [get("/y")]).rule == DEFAULT_DENY  # read cancelled for agent-7
    other = Identity("agent-8", "test", ("readers",))
    assert evaluate(p, other, [get("/y")]).rule == "read"
    assert evaluate(p, other, [get("/x")]).rule == "nope"
    assert evaluate(p, AGENT, [get("/x")]).rule == DEFAULT_DENY  # deny cancelled for sre-*


def test_identity_conditions() -> None:
    p = policy(rule("r", "allow", {"subjects": ["agent-*"], "groups": ["sre-agents", "x"],
                                   "targets": ["api", "api-*"]}))
    assert evaluate(p, AGENT, [get("/", target="api-2")]).effect == "allow"
    assert evaluate(p, AGENT, [get("/", target="other")]).effect == "deny"
    assert evaluate(p, Identity("AGENT-7", "t", ("sre-agents",)), [get("/")]).effect == "deny"
    assert evaluate(p, Identity("agent-7", "t", ("readers",)), [get("/")]).effect == "deny"
    assert evaluate(p, None, [get("/")]).effect == "deny"


# --- HTTP globs -------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern,path,ok", [
    ("/v1/users/*", "/v1/users/7", True),
    ("/v1/users/*", "/v1/users/7/", True),
    ("/v1/users/*", "/v1/users/7/keys", False),
    ("/v1/users/*", "/v1/users", False),
    ("/v1/users/*.json", "/v1/users/a.json", True),
    ("/v1/users/*.json", "/v1/users/a/b.json", False),
    ("/v1/*/keys", "/v1/admin/keys", True),
    ("/v1/*/keys", "/v1/a/b/keys", False),
    ("/v1/admin/**", "/v1/admin", True),
    ("/v1/admin/**", "/v1/admin/", True),
    ("/v1/admin/**", "/v1/admin/a/b/c", True),
    ("/v1/admin/**", "/v1/administrator", False),
    ("/v1/**/keys", "/v1/keys", True),
    ("/v1/**/keys", "/v1/a/b/keys", True),
    ("/v1/**/keys", "/v1/a/b/keys/x", False),
    ("/**", "/", True),
    ("/**", "/anything/at/all", True),
    ("/v1/a**", "/v1/abc/d", True),
    ("/v1/users", "/v1/users", True),
    ("/v1/users", "/v1/users/", True),
    ("/v1/users", "/v1/users2", False),
    ("/v1/admin/**", "/V1/ADMIN/keys", True),  # case-insensitive: /V1/ADMIN must hit the deny
    ("/v1/Users/*", "/v1/users/x", True),
    ("/v1/a.b", "/v1/aXb", False),  # only * is special; . ? [ are literal
    ("/v1/a?b", "/v1/aXb", False),
    ("/v1/[ab]", "/v1/a", False),
])
def test_path_globs(pattern: str, path: str, ok: bool) -> None:
    assert path_match([pattern], path) is ok


def test_path_none_never_matches() -> None:
    assert not path_match(["/**"], None)


def test_other_globs_are_fnmatch_and_case_sensitive() -> None:
    assert glob_match(["team-*"], "team-a/b")  # no segment notion outside paths
    assert glob_match(["team-?"], "team-a") and not glob_match(["team-?"], "team-ab")
    assert glob_match(["team-[ab]"], "team-b") and not glob_match(["team-[ab]"], "team-c")
    assert not glob_match(["team-*"], "TEAM-a")
    assert not glob_match(["*"], None)


def test_http_methods_and_paths() -> None:
    p = policy(rule("w", "allow", {"http": {"methods": ["POST", "PUT"], "paths": ["/w/**"]}}),
               rule("any", "review", {"http": {"methods": ["*"], "paths": ["/r"]}}))
    assert evaluate(p, AGENT, [get("/w/1", method="PUT")]).effect == "allow"
    assert evaluate(p, AGENT, [get("/w/1")]).effect == "deny"
    assert evaluate(p, AGENT, [get("/r", method="PATCH")]).effect == "review"
    # an http condition never matches a postgres operation
    assert evaluate(p, AGENT, [sql_op()]).effect == "deny"


# --- Kubernetes conditions --------------------------------------------------------------------

def test_kubernetes_conditions() -> None:
    p = policy(
        rule("read", "allow", {"kubernetes": {"verbs": ["get", "list"],
                                              "resources": ["pods", "deployments.apps"],
                                              "namespaces": ["team-*"]}}),
        rule("exec-ls", "allow", {"kubernetes": {"verbs": ["exec"], "commands": ["ls", "ls *"]}}),
        rule("no-secrets", "deny", {"kubernetes": {"resources": ["secrets"],
                                                   "names": ["prod-*"]}}),
        rule("logs", "review", {"kubernetes": {"subresources": ["log"]}}),
    )

    def eff(**fields: object) -> str:
        return evaluate(p, AGENT, [k8s_op(**fields)]).effect

    assert eff() == "allow"
    assert eff(verb="list", name=None) == "allow"
    assert eff(verb="delete") == "deny"
    assert eff(namespace="kube-system") == "deny"
    assert eff(namespace=None) == "deny"  # a namespaces condition needs a namespace
    assert eff(resource="deployments", group="apps") == "allow"
    assert eff(resource="deployments", group="extensions") == "deny"  # group is part of it
    assert eff(verb="exec", subresource="exec", command="ls -la") == "allow"
    assert eff(verb="exec", subresource="exec", command="ls") == "allow"
    assert eff(verb="exec", subresource="exec", command="sh -c ls") == "deny"
    assert eff(verb="exec", subresource="exec", command=None) == "deny"
    # names: a list (no name) is not about prod-db, get of prod-db is
    assert eff(resource="secrets", name="prod-db") == "deny"
    assert evaluate(p, AGENT, [k8s_op(resource="secrets", name="prod-db")]).rule == "no-secrets"
    assert eff(subresource="log") == "review"
    # a kubernetes condition never matches a plain HTTP operation
    assert evaluate(p, AGENT, [get("/api/v1/pods")]).effect == "deny"


def test_kubernetes_request_is_http_too() -> None:
    p = policy(rule("discovery", "allow", {"http": {"methods": ["GET"],
                                                    "paths": ["/version", "/api", "/apis/**"]}}))
    op = Operation("kubernetes", "k8s", "get /version", http={"method": "GET", "path": "/version"},
                   kubernetes={"verb": "get", "nonresource": True, "resource": None})
    assert evaluate(p, AGENT, [op]).effect == "allow"


def test_kubernetes_shorthand_exec_is_verb_exec() -> None:
    from addons.kubernetes import parse_shorthand

    p = policy(rule("exec-ls", "allow", {"kubernetes": {"verbs": ["exec"], "resources": ["pods"],
                                                        "commands": ["ls *"]}}))
    op = parse_shorthand("exec pods/web-1 -n team-a -- ls -la", "k8s")
    assert op.kubernetes is not None and op.kubernetes["verb"] == "exec"
    assert evaluate(p, AGENT, [op]).effect == "allow"
    # in an allow rule `*` stays inside one argument (`**` spans several)
    op = parse_shorthand("exec pods/web-1 -n team-a -- ls -la /etc/shadow", "k8s")
    assert evaluate(p, AGENT, [op]).effect == "deny"
    op = parse_shorthand("exec pods/web-1 -n team-a -- sh -c 'ls'", "k8s")
    assert evaluate(p, AGENT, [op]).effect == "deny"


# --- SQL conditions ---------------------------------------------------------------------------

def test_sql_conditions() -> None:
    p = policy(
        rule("read", "allow", {"sql": {"statements": ["select"], "tables": ["public.*", "audit"]}}),
        rule("pii", "deny", {"sql": {"columns": ["*ssn", "cards.number"]}}),
        rule("fn", "deny", {"sql": {"functions": ["pg_read_*"]}}),
        rule("wide", "review", {"sql": {"statements": ["update", "delete"], "unbounded": True}}),
        rule("narrow", "allow", {"sql": {"statements": ["update", "delete"],
                                         "unbounded": False}}),
    )

    def eff(op: Operation) -> str:
        return evaluate(p, AGENT, [op]).effect

    assert eff(sql_op(columns=("id", "name"))) == "allow"
    assert eff(sql_op(table="other.audit")) == "allow"  # bare name matches unqualified pattern
    assert eff(sql_op(table="other.x")) == "deny"
    assert eff(sql_op(table=None)) == "deny"  # a tables condition needs a table
    # columns / functions match when ANY referenced one matches
    assert eff(sql_op(columns=("id", "users.ssn"))) == "deny"
    assert eff(sql_op(columns=("id", "cards.number", "name"))) == "deny"
    assert eff(sql_op(functions=("lower", "pg_read_file"))) == "deny"
    assert eff(sql_op(functions=("lower",))) == "allow"
    assert eff(sql_op(kind="delete", unbounded=True)) == "review"
    assert eff(sql_op(kind="delete", unbounded=False)) == "allow"
    assert eff(sql_op(kind="insert")) == "deny"
    # an sql condition never matches an HTTP operation
    assert evaluate(p, AGENT, [get("/")]).effect == "deny"


def test_sql_from_real_statements() -> None:
    from addons import sql

    p = policy(rule("read", "allow", {"sql": {"statements": ["select"]}}),
               rule("no-delete", "deny", {"sql": {"statements": ["delete"]}}))
    ops = sql.to_operations(sql.classify(
        "WITH d AS (DELETE FROM users RETURNING *) SELECT * FROM d"), "db")
    assert {o.sql["kind"] for o in ops if o.sql} >= {"delete", "select"}
    assert evaluate(p, AGENT, ops).rule == "no-delete"
    ops = sql.to_operations(sql.classify("SELECT 1; SELECT 2"), "db")
    assert evaluate(p, AGENT, ops).effect == "allow"


# --- masks ------------------------------------------------------------------------------------

def test_every_matching_mask_applies(tmp_path: Path) -> None:
    p = load(tmp_path, """
        masks:
          - id: cards
            when: {targets: [api], http: {paths: ["/v1/**"]}}
            json_paths: ["$..card"]
          - id: ssn
            when: {http: {paths: ["/v1/users/**"]}}
            unless: {groups: [auditors]}
            columns: ["*.ssn"]
          - id: elsewhere
            when: {targets: [other]}
            detectors: [email]
        """)
    ids = [m.id for m in matching_masks(p, AGENT, get("/v1/users/1"))]
    assert ids == ["cards", "ssn"]
    auditor = Identity("a", "t", ("auditors",))
    assert [m.id for m in matching_masks(p, auditor, get("/v1/users/1"))] == ["cards"]


# --- loader errors name file, line and rule id ------------------------------------------------

def load_error(tmp_path: Path, text: str, name: str = "p.yaml", **kw: object) -> PolicyError:
    with pytest.raises(PolicyError) as exc:
        load(tmp_path, text, name, **kw)
    err = exc.value
    assert err.file == str(tmp_path / name)
    assert str(err).startswith(f"{tmp_path / name}")
    return err


GOOD_RULE = """
rules:
  - id: ok
    effect: allow
    when: {groups: [a]}
"""


@pytest.mark.parametrize("text,line,rid,needle", [
    ("rules:\n  - id: a\n    effect: allow\n    when: {}\n  - id: a\n    effect: deny\n"
     "    when: {}\n", 5, "a", "duplicate rule id"),
    ("masks:\n  - id: m\n    json_paths: [$.a]\n  - id: m\n    json_paths: [$.b]\n", 4, "m",
     "duplicate mask id"),
    ("rules: []\npolicies: []\n", 1, None, "unknown top-level key 'policies'"),
    ("rules:\n  - id: r\n    effect: allow\n    whne: {}\n", 2, "r", "unknown rule key 'whne'"),
    ("rules:\n  - id: r\n    effect: allow\n    when:\n      group: [a]\n", 5, "r",
     "unknown when key 'group'"),
    ("rules:\n  - id: r\n    effect: allow\n    when:\n      http:\n        path: [/a]\n", 6, "r",
     "unknown when.http key 'path'"),
    ("rules:\n  - id: r\n    effect: allow\n    when: {}\n    unless: {sql: {tabels: [x]}}\n", 5,
     "r", "unknown unless.sql key 'tabels'"),
    ("rules:\n  - id: r\n    effect: permit\n    when: {}\n", 2, "r", "effect must be one of"),
    ("rules:\n  - id: r\n    when: {}\n", 2, "r", "effect must be one of"),
    ("rules:\n  - id: r\n    effect: deny\n    when: {sql: {statements: [selec]}}\n", 4, "r",
     "unknown statement kind 'selec'"),
    ("rules:\n  - id: r\n    effect: deny\n    when: {kubernetes: {verbs: [exce]}}\n", 4, "r",
     "unknown verb 'exce'"),
    ("rules:\n  - id: r\n    effect: deny\n    when: {kubernetes: {resources: [pods/exec]}}\n", 4,
     "r", "subresources: [exec]"),
    ("rules:\n  - id: r\n    effect: deny\n    when: {http: {paths: [admin/**]}}\n", 4, "r",
     "must start with /"),
    ("rules:\n  - id: r\n    effect: deny\n    when: {http: {methods: []}}\n", 4, "r",
     "non-empty list"),
    ("rules:\n  - id: r\n    effect: deny\n    when: {kubernetes: {impersonate: yes please}}\n",
     4, "r", "true or false"),
    ("rules:\n  - id: r\n    effect: deny\n", 2, "r", "needs a when"),
    ("rules:\n  - effect: deny\n    when: {}\n", 2, None, "without an id"),
    ("rules:\n  - id: r\n    effect: deny\n    effect: allow\n    when: {}\n", 4, None,
     "duplicate key 'effect'"),
    ("rules:\n  - id: r\n    effect: [deny\n", 4, None, "invalid YAML"),
    ("rules:\n  - id: r\n\teffect: deny\n", 3, None, "invalid YAML"),
    ("- just\n- a list\n", 1, None, "must be a mapping"),
    ("rules: {id: r}\n", 1, None, "rules: must be a list"),
    ("masks:\n  - id: m\n    when: {}\n", 2, "m", "needs json_paths, columns or detectors"),
    ("masks:\n  - id: m\n    columns: [a.b]\n    strategy: shred\n", 2, "m", "strategy"),
    ("tests:\n  - name: t\n    identity: {groups: [a]}\n    request: {target: x, http: GET /}\n"
     "    expect: allow\n", 2, "t", "identity needs sub"),
    ("tests:\n  - name: t\n    identity: {sub: a}\n    request: {http: GET /}\n"
     "    expect: allow\n", 2, "t", "request needs target"),
    ("tests:\n  - name: t\n    identity: {sub: a}\n    request: {target: x, http: GET /, sql: x}\n"
     "    expect: allow\n", 2, "t", "exactly one of http, kubernetes, sql"),
    ("tests:\n  - name: t\n    identity: {sub: a}\n    request: {target: x, http: GET /}\n"
     "    expect: allowed\n", 2, "t", "expect must be one of"),
    ("tests:\n  - name: t\n    identity: {sub: a}\n    request: {target: x, http: GET /}\n"
     "    expect: allow\n    masked: $.ssn\n", 2, "t", "masked: must be a list"),
    ("tests:\n  - name: t\n    identity: {sub: a}\n    request: {target: x, http: GET /}\n"
     "    expect: allow\n    expected: deny\n", 2, "t", "unknown test key 'expected'"),
])
def test_loader_errors_are_located(tmp_path: Path, text: str, line: int, rid: str | None,
                                   needle: str) -> None:
    err = load_error(tmp_path, text)
    assert needle in err.message, err
    assert err.line == line, err
    assert err.rule_id == rid, err
    where = f"{tmp_path / 'p.yaml'}:{line}"
    assert str(err).startswith(where + (f" [{rid}]" if rid else "") + ":"), str(err)


def test_duplicate_rule_id_across_files_names_both(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(GOOD_RULE)
    err = load_error(tmp_path, "\n\nrules:\n  - id: ok\n    effect: deny\n    when: {}\n",
                     name="b.yaml")
    assert err.rule_id == "ok" and err.line == 4
    assert f"first defined in {tmp_path / 'a.yaml'}:3" in err.message


def test_unknown_target_is_an_error_only_with_known_targets(tmp_path: Path) -> None:
    text = "rules:\n  - id: r\n    effect: allow\n    when: {targets: [nope, 'glob-*']}\n"
    assert len(load(tmp_path, text).rules) == 1
    err = load_error(tmp_path, text, known_targets=["api"])
    assert "unknown target 'nope'" in err.message and err.rule_id == "r" and err.line == 4


def test_missing_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as exc:
        load_policies(tmp_path / "nope")
    assert "does not exist" in str(exc.value)


def test_loaded_rules_know_where_they_are(tmp_path: Path) -> None:
    p = load(tmp_path, """
        # comment
        rules:
          - id: first
            effect: allow
            when: {groups: [a]}
          - id: second
            effect: deny
            reason: "  padded  "
            when:
              http: {methods: [get], paths: [/x]}
              kubernetes: {verbs: [GET]}
        tests:
          - name: t
            identity: {sub: a}
            request: {target: x, http: GET /}
            expect: allow
            masked: []
        """)
    assert [(r.id, r.line) for r in p.rules] == [("first", 4), ("second", 7)]
    second = p.rules[1]
    assert second.reason == "padded"
    assert second.when["http"]["methods"] == ["GET"]  # methods upper-cased
    assert second.when["kubernetes"]["verbs"] == ["get"]  # verbs lower-cased
    assert p.tests[0].masked == () and p.tests[0].line == 14  # [] = "no mask applies"
