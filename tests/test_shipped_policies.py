"""Meta-test over the policies this repository ships (like OPA gatekeeper-library's suites):
every file passes `policy check` and `policy test` against the shipped `gateway.yaml`, and every
file with rules carries at least one allow-expecting and one deny-expecting test case."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from addons import policycases
from addons.policy import load_policies, policy_files
from tests.fixtures.gateway import ROOT

POLICY_DIR = ROOT / "policies"
CONFIG = ROOT / "gateway.yaml"
SHIPPED = policy_files(POLICY_DIR)


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "addons.cli", "policy", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=90)


def test_policies_are_shipped() -> None:
    assert SHIPPED, f"no policy files under {POLICY_DIR}"


def test_shipped_policies_pass_check() -> None:
    res = cli("check", str(POLICY_DIR), "--config", str(CONFIG))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "OK:" in res.stdout


def test_shipped_policies_pass_their_tests() -> None:
    res = cli("test", str(POLICY_DIR), "--config", str(CONFIG))
    assert res.returncode == 0, res.stdout + res.stderr
    assert " 0 failed, 0 error(s)" in res.stdout


def test_each_policy_file_with_rules_has_allowed_and_denied_cases() -> None:
    policy = load_policies(POLICY_DIR)
    assert policy.tests, "the shipped policies carry no tests: cases"
    missing = policycases.missing_cases(policy)
    assert not missing, "policy files with rules but no allow/deny test cases: " + "; ".join(
        f"{f} lacks {' and '.join(m)}" for f, m in missing.items())
    assert {t.file for t in policy.tests} >= {r.file for r in policy.rules}


def test_meta_check_fails_a_policy_without_cases(tmp_path: Path) -> None:
    """The coverage check itself: a file with rules and only allow cases is caught."""
    (tmp_path / "p.yaml").write_text(
        "rules:\n  - id: r\n    effect: allow\n    when: {groups: [a]}\n"
        "tests:\n  - name: ok\n    identity: {sub: s, groups: [a]}\n"
        "    request: {target: t, http: GET /}\n    expect: allow\n")
    (tmp_path / "q.yaml").write_text(
        "rules:\n  - id: q\n    effect: deny\n    when: {groups: [b]}\n")
    (tmp_path / "masks.yaml").write_text("masks:\n  - id: m\n    columns: ['*.ssn']\n")
    missing = policycases.missing_cases(load_policies(tmp_path))
    assert missing == {str(tmp_path / "p.yaml"): ["deny"],
                       str(tmp_path / "q.yaml"): ["allow", "deny"]}
