"""`policy check | test | explain` (addons/policytools.py), in-process and through the CLI."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from addons import policytools
from addons.cli import build_parser
from tests.fixtures.gateway import ROOT

CONFIG = {
    "identity": {"dev_issuer": True},
    "policies": "pol",
    "targets": [
        {"name": "api", "protocol": "http", "hosts": ["api.example:443"],
         "credentials": {"type": "bearer", "token_env": "NOT_SET_IN_TESTS"}},
        {"name": "k8s", "protocol": "kubernetes", "hosts": ["k8s.example:6443"]},
        {"name": "db", "protocol": "postgres", "database": "orders",
         "upstream": {"host": "127.0.0.1", "dbname": "orders", "user": "u"}},
    ],
}

API = """
rules:
  - id: api-read
    effect: allow
    reason: agents read users
    when: {targets: [api], groups: [agents], http: {methods: [GET], paths: ["/v1/users/**"]}}
  - id: api-admin
    effect: deny
    reason: admin is off limits
    when: {targets: [api], http: {paths: ["/v1/admin/**"]}}
  - id: api-any-for-ops
    effect: allow
    reason: ops may do anything
    when: {targets: [api], groups: [ops]}
    unless: {subjects: ["intern-*"]}
masks:
  - id: cards
    when: {targets: [api], http: {paths: ["/v1/users/**"]}}
    json_paths: ["$.users[*].card"]
    strategy: partial
  - id: ssn
    when: {targets: [db]}
    columns: ["*.ssn"]
tests:
  - name: agents read users
    identity: {sub: agent-1, groups: [agents]}
    request: {target: api, http: "GET /v1/users/7"}
    expect: allow
    masked: [cards, "$.users[*].card"]
  - name: admin is denied through encodings
    identity: {sub: agent-1, groups: [agents]}
    request: {target: api, http: "GET /v1/users/%2E%2e/admin/keys"}
    expect: deny
  - name: ambiguous path is refused
    identity: {sub: agent-1, groups: [agents]}
    request: {target: api, http: "GET /v1/users%2f..%2fadmin"}
    expect: deny
"""

K8S = """
rules:
  - id: k8s-read
    effect: allow
    when: {targets: [k8s], kubernetes: {verbs: [get, list, watch], resources: [pods],
           namespaces: ["team-*"]}}
  - id: k8s-exec-ls
    effect: allow
    when: {targets: [k8s], kubernetes: {verbs: [exec], commands: ["ls", "ls *"]}}
  - id: k8s-discovery
    effect: allow
    when: {targets: [k8s], http: {methods: [GET], paths: ["/version", "/api", "/apis/**"]}}
tests:
  - name: list pods
    identity: {sub: agent-7, groups: [sre]}
    request: {target: k8s, kubernetes: "list pods -n team-a"}
    expect: allow
  - name: exec ls
    identity: {sub: agent-7}
    request: {target: k8s, kubernetes: "exec pods/web-1 -n team-a -- ls -la"}
    expect: allow
  - name: exec sh
    identity: {sub: agent-7}
    request: {target: k8s, kubernetes: "exec pods/web-1 -n team-a -- sh"}
    expect: deny
  - name: discovery over http
    identity: {sub: agent-7}
    request: {target: k8s, http: "GET /version"}
    expect: allow
  - name: kube-system is not ours
    identity: {sub: agent-7}
    request: {target: k8s, kubernetes: "get pods/x -n kube-system"}
    expect: deny
"""

DB = """
rules:
  - id: db-read
    effect: allow
    when: {targets: [db], sql: {statements: [select]}}
  - id: db-wide-delete
    effect: review
    when: {targets: [db], sql: {statements: [delete], unbounded: true}}
tests:
  - name: select
    identity: {sub: a}
    request: {target: db, sql: "SELECT name, ssn FROM users"}
    expect: allow
    masked: [users.ssn]
  - name: delete everything needs review
    identity: {sub: a}
    request: {target: db, sql: "DELETE FROM users"}
    expect: review
  - name: a hidden delete is not a select
    identity: {sub: a}
    request: {target: db, sql: "WITH d AS (DELETE FROM users WHERE id = 1 RETURNING *) SELECT * FROM d"}
    expect: deny
  - name: unparseable SQL is denied
    identity: {sub: a}
    request: {target: db, sql: "SELEC * FROM users"}
    expect: deny
"""


def write(d: Path, files: dict[str, str]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(textwrap.dedent(text))


@pytest.fixture
def setup(tmp_path: Path) -> Path:
    (tmp_path / "gateway.yaml").write_text(yaml.safe_dump(CONFIG))
    write(tmp_path / "pol", {"api.yaml": API, "k8s.yaml": K8S, "db.yaml": DB})
    return tmp_path


def run(*argv: str) -> tuple[int, str, str]:
    """policytools.main in-process: (exit code, stdout, stderr)."""
    args = build_parser().parse_args(["policy", *argv])
    buf = io.StringIO()
    err = io.StringIO()
    console = Console(file=buf, width=400, color_system=None, highlight=False)
    old = sys.stderr
    sys.stderr = err
    try:
        code = policytools.main(args, console=console)
    finally:
        sys.stderr = old
    return code, buf.getvalue(), err.getvalue()


# --- check ------------------------------------------------------------------------------------

def test_check_ok_uses_the_configs_policy_dir(setup: Path) -> None:
    code, out, _ = run("check", "--config", str(setup / "gateway.yaml"))
    assert code == 0, out
    assert "OK: 3 file(s), 8 rule(s), 2 mask(s), 12 test(s)" in out
    for f in ("api.yaml", "k8s.yaml", "db.yaml"):
        assert f in out


def test_check_reports_every_error_with_file_line_and_rule(setup: Path) -> None:
    pol = setup / "pol"
    (pol / "db.yaml").write_text(DB.replace("statements: [select]", "statements: [selekt]"))
    (pol / "zz.yaml").write_text("rules:\n  - id: api-read\n    effect: allow\n    when: {}\n")
    (pol / "bad.yaml").write_text("rules: [\n")
    (pol / "k8s.yaml").write_text(K8S.replace("exec pods/web-1 -n team-a -- sh",
                                              "exce pods/web-1 -- sh"))
    code, out, _ = run("check", str(pol), "--config", str(setup / "gateway.yaml"))
    assert code == 1
    lines = [x for x in out.splitlines() if x.startswith("error: ")]
    assert len(lines) == 4, out
    text = "\n".join(lines)
    assert f"{pol / 'db.yaml'}:5 [db-read]: when.sql.statements: unknown statement kind" in text
    assert f"{pol / 'zz.yaml'}:2 [api-read]: duplicate rule id (first defined in " \
           f"{pol / 'api.yaml'}:3)" in text
    assert f"{pol / 'bad.yaml'}:" in text and "invalid YAML" in text
    assert f"{pol / 'k8s.yaml'}:22 [exec sh]: kubernetes: unknown verb 'exce'" in text
    assert "4 error(s) in 4 file(s)" in out


def test_check_validates_targets_against_the_config(setup: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    pol = setup / "pol"
    (pol / "x.yaml").write_text(
        "rules:\n  - id: x\n    effect: allow\n    when: {targets: [apii]}\n")
    (pol / "y.yaml").write_text(
        "tests:\n  - name: t\n    identity: {sub: a}\n    request: {target: nowhere, "
        "http: GET /}\n    expect: deny\n")
    code, out, _ = run("check", "--config", str(setup / "gateway.yaml"))
    assert code == 1
    assert f"{pol / 'x.yaml'}:4 [x]: when.targets: unknown target 'apii'" in out
    assert f"{pol / 'y.yaml'}:2 [t]: unknown target 'nowhere'" in out
    # without a config, target names cannot be checked (and are not)
    monkeypatch.delenv("PORTCULLIS_CONFIG", raising=False)
    monkeypatch.chdir(pol)
    for name in ("x.yaml", "y.yaml"):
        code, out, _ = run("check", str(pol / name), "--config", "gateway.yaml")
        assert code == 0, out


def test_check_defaults_to_policies_dir_without_config(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PORTCULLIS_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "policies", {"a.yaml": API})
    code, out, _ = run("check")
    assert code == 0, out
    assert "no config (targets not checked)" in out and "a.yaml" in out


def test_check_usage_errors(setup: Path, tmp_path: Path) -> None:
    code, _, err = run("check", str(tmp_path / "missing"), "--config", str(setup / "gateway.yaml"))
    assert code == 2 and "does not exist" in err
    code, _, err = run("check", "--config", str(tmp_path / "nope.yaml"))
    assert code == 2 and "nope.yaml does not exist" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("targets:\n  - {name: x, protocol: ftp}\n")
    code, _, err = run("check", "--config", str(bad))
    assert code == 2 and "targets[0].protocol" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, _ = run("check", str(empty), "--config", str(setup / "gateway.yaml"))
    assert code == 1 and "no policy files" in out


# --- test -------------------------------------------------------------------------------------

def test_test_runs_every_case(setup: Path) -> None:
    code, out, _ = run("test", "--config", str(setup / "gateway.yaml"))
    assert code == 0, out
    assert "12 passed, 0 failed, 0 error(s) in 3 file(s)" in out
    assert out.count("PASS") == 12
    row = next(x for x in out.splitlines() if "ambiguous path is refused" in x)
    assert "refused: encoded slash in path is ambiguous" in row
    row = next(x for x in out.splitlines() if "unparseable SQL" in x)
    assert "refused: SQL cannot be classified" in row
    row = next(x for x in out.splitlines() if "kube-system" in x)
    assert "default-deny" in row


@pytest.mark.parametrize("case,expected", [
    ('identity: {sub: a, groups: [agents]}\n    request: {target: api, http: "GET /v1/users"}\n'
     "    expect: deny", "expected deny"),
    ('identity: {sub: a, groups: [agents]}\n    request: {target: api, http: "GET /v1/users"}\n'
     "    expect: allow\n    masked: []", "unexpected mask cards"),
    ('identity: {sub: a, groups: [agents]}\n    request: {target: api, http: "GET /v1/users"}\n'
     "    expect: allow\n    masked: [\"$.users[*].ssn\"]", "not masked: $.users[*].ssn"),
    ('identity: {sub: a}\n    request: {target: db, sql: "SELECT card FROM users"}\n'
     "    expect: allow\n    masked: [users.card]", "not masked: users.card"),
    ('identity: {sub: a, groups: [ops]}\n    request: {target: api, http: "DELETE /v1/x"}\n'
     "    expect: allow\n    masked: []", None),
    ('identity: {sub: intern-1, groups: [ops]}\n    request: {target: api, http: "DELETE /v1/x"}\n'
     "    expect: deny", None),
])
def test_test_compares_effect_and_masks(setup: Path, case: str, expected: str | None) -> None:
    (setup / "pol" / "extra.yaml").write_text(f"tests:\n  - name: extra\n    {case}\n")
    code, out, _ = run("test", "--config", str(setup / "gateway.yaml"))
    if expected is None:
        assert code == 0, out
        return
    assert code == 1, out
    fail = [x for x in out.splitlines() if x.startswith("fail: ")]
    assert len(fail) == 1 and f"{setup / 'pol' / 'extra.yaml'}:2 [extra]: " in fail[0], out
    assert expected in fail[0]
    assert "12 passed, 1 failed, 0 error(s)" in out


@pytest.mark.parametrize("case,expected", [
    ('identity: {sub: a, group: [agents]}\n    request: {target: api, http: "GET /v1/users"}',
     "unknown identity key 'group'"),
    ('identity: {sub: a}\n    request: {target: api, kubernets: "get pods", http: "GET /"}',
     "unknown request key 'kubernets'"),
    ('identity: {sub: a}\n    request: {target: api, http: "/v1/users"}',
     "write 'METHOD /path'"),
    ('identity: {sub: a}\n    request: {target: api, sql: "SELECT 1"}',
     "target 'api' is a http target: use http:"),
    ('identity: {sub: a}\n    request: {target: db, kubernetes: "list pods"}',
     "target 'db' is a postgres target: use sql:"),
    ('identity: {sub: a}\n    request: {target: k8s, kubernetes: "list pods/x/y/z"}',
     "kubernetes: too many parts"),
    ('identity: {sub: a}\n    request: {target: elsewhere, http: "GET /"}',
     "unknown target 'elsewhere'"),
])
def test_malformed_cases_are_errors_not_denials(setup: Path, case: str, expected: str) -> None:
    """A typo must never make a deny-expecting case pass."""
    (setup / "pol" / "extra.yaml").write_text(
        f"tests:\n  - name: extra\n    {case}\n    expect: deny\n")
    code, out, _ = run("test", "--config", str(setup / "gateway.yaml"))
    assert code == 1, out
    lines = [x for x in out.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1 and expected in lines[0], out
    assert "12 passed, 0 failed, 1 error(s)" in out


def test_test_kubernetes_http_path_that_cannot_be_classified_is_refused(setup: Path) -> None:
    (setup / "pol" / "extra.yaml").write_text(
        "tests:\n  - name: extra\n    identity: {sub: a}\n    request: {target: k8s, "
        "http: \"GET /API/v1/pods\"}\n    expect: deny\n")
    code, out, _ = run("test", "--config", str(setup / "gateway.yaml"))
    assert code == 0, out
    row = next(x for x in out.splitlines() if "/API/v1/pods" in x)
    assert "refused:" in row and "mixed case" in row


def test_test_warns_about_files_without_allow_and_deny_cases(setup: Path) -> None:
    (setup / "pol" / "lonely.yaml").write_text(
        "rules:\n  - id: lonely\n    effect: allow\n    when: {targets: [api]}\n")
    code, out, _ = run("test", "--config", str(setup / "gateway.yaml"))
    assert code == 0
    assert f"warning: {setup / 'pol' / 'lonely.yaml'} has rules but no test case expecting " \
           "allow or deny" in out


def test_test_fails_when_policy_does_not_load_or_has_no_tests(setup: Path) -> None:
    (setup / "pol" / "bad.yaml").write_text("rules:\n  - id: r\n    effect: nope\n    when: {}\n")
    code, out, _ = run("test", "--config", str(setup / "gateway.yaml"))
    assert code == 1 and f"{setup / 'pol' / 'bad.yaml'}:2 [r]" in out
    only = setup / "only"
    write(only, {"r.yaml": "rules:\n  - id: r\n    effect: allow\n    when: {}\n"})
    code, out, _ = run("test", str(only), "--config", str(setup / "gateway.yaml"))
    assert code == 1 and "no tests: cases" in out


# --- explain ----------------------------------------------------------------------------------

def test_explain_http_lists_every_matching_rule_and_mask(setup: Path) -> None:
    code, out, _ = run("explain", "--config", str(setup / "gateway.yaml"), "--sub", "agent-1",
                       "--groups", "agents,ops", "--target", "api",
                       "--http", "GET /v1/users/../users/7")
    assert code == 0, out
    assert "decision: ALLOW" in out
    assert "rules: api-read, api-any-for-ops" in out
    pol = setup / "pol"
    rows = {x.split("│")[1].strip(): x for x in out.splitlines() if x.startswith("│")}
    assert "allow" in rows["api-read"] and f"{pol / 'api.yaml'}:3" in rows["api-read"]
    assert f"{pol / 'api.yaml'}:11" in rows["api-any-for-ops"]
    assert "partial" in rows["cards"] and "$.users[*].card" in rows["cards"]
    assert f"{pol / 'api.yaml'}:17" in rows["cards"]
    assert "path=/v1/users/7" in out


def test_explain_deny_shows_outranked_and_cancelled_rules(setup: Path) -> None:
    code, out, _ = run("explain", "--config", str(setup / "gateway.yaml"), "--sub", "intern-3",
                       "--groups", "ops,agents", "--target", "api", "--http", "GET /v1/admin/x")
    assert code == 0, out
    assert "decision: DENY  rule: api-admin  reason: admin is off limits" in out
    rows = {x.split("│")[1].strip(): x for x in out.splitlines() if x.startswith("│")}
    assert "decides" in rows["api-admin"]
    assert "cancelled by unless" in rows["api-any-for-ops"]
    assert "api-read" not in rows
    assert "masks that would apply: none" in out


def test_explain_kubernetes_and_sql(setup: Path) -> None:
    cfg = str(setup / "gateway.yaml")
    code, out, _ = run("explain", "--config", cfg, "--sub", "a", "--target", "k8s",
                       "--k8s", "exec pods/web-1 -n team-a -- ls /tmp")
    assert code == 0, out
    assert "decision: ALLOW  rule: k8s-exec-ls" in out
    assert "verb=exec" in out and "command=ls /tmp" in out and "namespace=team-a" in out
    code, out, _ = run("explain", "--config", cfg, "--sub", "a", "--target", "k8s",
                       "--k8s", "exec pods/web-1 -n team-a -- sh", "--groups", "")
    assert code == 0 and "decision: DENY  rule: default-deny" in out
    assert "matching rules: none" in out
    code, out, _ = run("explain", "--config", cfg, "--sub", "a", "--target", "db",
                       "--sql", "SELECT ssn FROM users; DELETE FROM users")
    assert code == 0, out
    assert "decision: REVIEW  rule: db-wide-delete" in out
    rows = {x.split("│")[1].strip(): x for x in out.splitlines() if x.startswith("│")}
    assert "*.ssn" in rows["ssn"]
    # a Kubernetes target takes raw HTTP too, classified like the gateway does
    code, out, _ = run("explain", "--config", cfg, "--sub", "a", "--target", "k8s",
                       "--http", "GET /api/v1/namespaces/team-a/pods?watch=true")
    assert code == 0 and "decision: ALLOW  rule: k8s-read" in out and "verb=watch" in out


def test_explain_refused_request(setup: Path) -> None:
    code, out, _ = run("explain", "--config", str(setup / "gateway.yaml"), "--sub", "a",
                       "--target", "api", "--http", "GET /v1/users/..;/admin")
    assert code == 0
    assert "decision: DENY  refused:" in out and "';'" in out


@pytest.mark.parametrize("argv,needle", [
    (["--target", "nope", "--http", "GET /"], "unknown target 'nope'"),
    (["--target", "api", "--http", "GET"], "write 'METHOD /path'"),
    (["--target", "api", "--http", "GET v1/x"], "write 'METHOD /path'"),
    (["--target", "api", "--k8s", "list pods"], "target 'api' is a http target"),
    (["--target", "k8s", "--sql", "SELECT 1"], "target 'k8s' is a kubernetes target"),
    (["--target", "k8s", "--k8s", "frobnicate pods"], "unknown verb"),
])
def test_explain_usage_errors_exit_2(setup: Path, argv: list[str], needle: str) -> None:
    code, out, err = run("explain", "--config", str(setup / "gateway.yaml"), "--sub", "a", *argv)
    assert code == 2 and needle in err and out == ""


def test_explain_without_config_knows_targets_from_policies(
        setup: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PORTCULLIS_CONFIG", raising=False)
    monkeypatch.chdir(setup)
    (setup / "gateway.yaml").unlink()
    (setup / "pol").rename(setup / "policies")
    code, out, _ = run("explain", "--sub", "a", "--groups", "agents", "--target", "api",
                       "--http", "GET /v1/users")
    assert code == 0 and "decision: ALLOW" in out and "no config" in out
    code, _, err = run("explain", "--sub", "a", "--target", "apx", "--http", "GET /")
    assert code == 2 and "unknown target 'apx'" in err and "pass --config" in err


def test_explain_with_broken_policy_is_a_configuration_error(setup: Path) -> None:
    (setup / "pol" / "bad.yaml").write_text("rules: [\n")
    code, _, err = run("explain", "--config", str(setup / "gateway.yaml"), "--sub", "a",
                       "--target", "api", "--http", "GET /")
    assert code == 2 and "bad.yaml" in err


def test_policy_ids_are_not_read_as_rich_markup(setup: Path) -> None:
    (setup / "pol" / "m.yaml").write_text(
        "rules:\n  - id: '[bold]x[/bold]'\n    effect: deny\n    reason: '[red]r'\n"
        "    when: {targets: [api], http: {paths: [/m]}}\n")
    code, out, _ = run("explain", "--config", str(setup / "gateway.yaml"), "--sub", "a",
                       "--target", "api", "--http", "GET /m")
    assert code == 0 and "rule: [bold]x[/bold]  reason: [red]r" in out


# --- through ./mitm.sh's CLI ------------------------------------------------------------------

def test_cli_exit_codes(setup: Path) -> None:
    cfg = str(setup / "gateway.yaml")

    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "addons.cli", "policy", *argv], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)

    res = cli("check", "--config", cfg)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "policy check" in res.stdout and "┃" in res.stdout  # a rich table
    res = cli("test", "--config", cfg)
    assert res.returncode == 0 and "12 passed" in res.stdout, res.stdout + res.stderr
    (setup / "pol" / "bad.yaml").write_text("rules:\n  - id: r\n    effect: nope\n    when: {}\n")
    res = cli("check", "--config", cfg)
    assert res.returncode == 1 and "bad.yaml:2 [r]" in res.stdout
    res = cli("explain", "--config", cfg, "--sub", "a", "--target", "nope", "--http", "GET /")
    assert res.returncode == 2
    res = cli("explain", "--config", cfg, "--sub", "a", "--target", "api")
    assert res.returncode == 2  # argparse: one of --http/--k8s/--sql is required
