"""Audit end to end (SPEC §7): the decision line is on disk before the upstream sees the request,
the outcome line follows, `audit verify` catches edits, deletions and reorderings, a gateway that
cannot write its log refuses with 503, and neither the log nor stdout holds a secret."""

from __future__ import annotations

import json
import resource
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from tests.conftest import UPSTREAM_TOKEN
from tests.fixtures.authcases import AuditSnoopServer
from tests.fixtures.gateway import ROOT, Gateway
from tests.fixtures.oidc import OIDCIssuer

pytestmark = pytest.mark.e2e

POLICY = """
rules:
  - id: agents-read
    effect: allow
    reason: agents may read
    when: {groups: [agents], http: {methods: [GET], paths: ["/audit/ok/**"]}}
  - id: no-secrets
    effect: deny
    reason: secrets are off limits
    when: {http: {paths: ["/audit/secret/**"]}}
"""


def start(directory: Path, upstream: AuditSnoopServer, oidc: OIDCIssuer, ca: Path) -> Gateway:
    cfg = {"identity": {"issuers": [oidc.config()]},
           "targets": [{"name": "snoop", "protocol": "http",
                        "hosts": [f"localhost:{upstream.port}"],
                        "credentials": {"type": "bearer", "token_env": "UPSTREAM_TOKEN"},
                        "tls": {"ca_file": str(ca)}}]}
    gw = Gateway(directory, cfg, env={"UPSTREAM_TOKEN": UPSTREAM_TOKEN},
                 policies={"p.yaml": POLICY})
    upstream.audit_path = gw.audit_path
    return gw.start()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, test_ca: Any, oidc: OIDCIssuer
        ) -> Iterator[SimpleNamespace]:
    d = tmp_path_factory.mktemp("audit")
    cert, key = test_ca.issue(d, ["localhost"])
    upstream = AuditSnoopServer(cert, key)
    gw = start(d / "gw", upstream, oidc, test_ca.cert_path)
    token = oidc.token(sub="audited-agent", groups=["agents"])
    client = httpx.Client(proxy=gw.proxy_with_token(token), timeout=20,
                          verify=ssl.create_default_context(cafile=str(gw.ca)))
    base = f"https://localhost:{upstream.port}"
    for path in ("/audit/ok/1", "/audit/secret/1", "/audit/ok/2", "/audit/other",
                 "/audit/ok/3"):
        client.get(base + path)
    try:
        yield SimpleNamespace(gw=gw, upstream=upstream, token=token, client=client, base=base,
                              cert=cert, key=key, dir=d)
    finally:
        client.close()
        gw.stop()
        upstream.close()


def records(text: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in text.splitlines()]


def decision_for(recs: list[dict[str, Any]], path: str) -> dict[str, Any] | None:
    for r in recs:
        if r["type"] == "decision" and (r["operation"].get("http") or {}).get("path") == path:
            return r
    return None


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "addons.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)


# --- written before forwarding, outcome after -------------------------------------------------


def test_decision_on_disk_before_upstream_sees_request(env: SimpleNamespace) -> None:
    path = "/audit/ok/before"
    r = env.client.get(env.base + path)
    assert r.status_code == 200, r.text
    at_arrival = records(env.upstream.snapshots[path])
    decision = decision_for(at_arrival, path)
    assert decision is not None, "the decision was not on disk when the request arrived"
    assert decision["decision"] == "allow" and decision["rules"] == ["agents-read"]
    assert decision["identity"]["sub"] == "audited-agent"
    assert not [x for x in at_arrival if x.get("decision_id") == decision["id"]]
    # The outcome line comes later and refers to the decision.
    after = records(env.gw.audit_text())
    [outcome] = [x for x in after if x.get("decision_id") == decision["id"]]
    assert outcome["type"] == "outcome" and outcome["outcome"] == {"status": 200}
    assert after.index(outcome) > after.index(decision)
    assert outcome["duration_ms"] >= 0


def test_one_decision_line_per_request(env: SimpleNamespace) -> None:
    recs = records(env.gw.audit_text())
    for path, effect, rule in (("/audit/ok/1", "allow", "agents-read"),
                               ("/audit/secret/1", "deny", "no-secrets"),
                               ("/audit/other", "deny", "default-deny")):
        found = [r for r in recs if r["type"] == "decision"
                 and (r["operation"].get("http") or {}).get("path") == path]
        assert len(found) == 1, path
        assert found[0]["decision"] == effect and found[0]["rules"] == [rule]
        assert found[0]["protocol"] == "http" and found[0]["target"] == "snoop"
        assert found[0]["client"].startswith("127.0.0.1:")
        outcomes = [r for r in recs if r.get("decision_id") == found[0]["id"]]
        assert [o["outcome"]["status"] for o in outcomes] == [200 if effect == "allow" else 403]
    assert "/audit/secret/1" not in env.upstream.snapshots


# --- audit verify -----------------------------------------------------------------------------


def test_verify_good_log(env: SimpleNamespace) -> None:
    res = cli("audit", "verify", str(env.gw.audit_path))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "OK" in res.stdout and "hash chain intact" in res.stdout


def _tampered(env: SimpleNamespace, tmp_path: Path, change: Any) -> subprocess.CompletedProcess:
    lines = env.gw.audit_text().splitlines(keepends=True)
    assert len(lines) >= 8
    copy = tmp_path / "audit.jsonl"
    copy.write_text("".join(change(lines)))
    return cli("audit", "verify", str(copy))


def test_verify_detects_edited_line(env: SimpleNamespace, tmp_path: Path) -> None:
    def edit(lines: list[str]) -> list[str]:
        # line 3 is the denied /audit/secret/1: rewrite history to "allow"
        assert '"decision":"deny"' in lines[2] and "/audit/secret/1" in lines[2]
        lines[2] = lines[2].replace('"decision":"deny"', '"decision":"allow"')
        return lines

    res = _tampered(env, tmp_path, edit)
    assert res.returncode == 1, res.stdout
    assert "BROKEN at line 3" in res.stdout and "edited" in res.stdout


def test_verify_detects_deleted_line(env: SimpleNamespace, tmp_path: Path) -> None:
    res = _tampered(env, tmp_path, lambda lines: lines[:4] + lines[5:])
    assert res.returncode == 1, res.stdout
    assert "BROKEN at line 5" in res.stdout and "deleted" in res.stdout


def test_verify_detects_reordered_lines(env: SimpleNamespace, tmp_path: Path) -> None:
    def swap(lines: list[str]) -> list[str]:
        lines[5], lines[6] = lines[6], lines[5]
        return lines

    res = _tampered(env, tmp_path, swap)
    assert res.returncode == 1, res.stdout
    assert "BROKEN at line 6" in res.stdout and "reordered" in res.stdout


def test_show_lists_decisions(env: SimpleNamespace) -> None:
    res = cli("audit", "show", "--file", str(env.gw.audit_path), "--decision", "deny")
    assert res.returncode == 0, res.stderr
    assert "no-secrets" in res.stdout and "default-deny" in res.stdout
    assert "agents-read" not in res.stdout


# --- an unwritable log refuses traffic --------------------------------------------------------


def test_unwritable_audit_log_refuses_with_503(env: SimpleNamespace, oidc: OIDCIssuer,
                                               test_ca: Any) -> None:
    upstream = AuditSnoopServer(env.cert, env.key)
    gw = start(env.dir / "gw-full", upstream, oidc, test_ca.cert_path)
    try:
        token = oidc.token(sub="audited-agent", groups=["agents"])
        base = f"https://localhost:{upstream.port}"
        with httpx.Client(proxy=gw.proxy_with_token(token), timeout=20,
                          verify=ssl.create_default_context(cafile=str(gw.ca))) as c:
            assert c.get(base + "/audit/ok/while-writable").status_code == 200
            # From now on the running gateway cannot grow any file: every audit write fails
            # (EFBIG), exactly like a full disk.
            size = gw.audit_path.stat().st_size
            assert gw.proc is not None
            resource.prlimit(gw.proc.pid, resource.RLIMIT_FSIZE, (size, size))
            r = c.get(base + "/audit/ok/unaudited")
        assert r.status_code == 503, r.text
        assert r.json()["error"] == "audit_unavailable"
        assert "/audit/ok/unaudited" not in upstream.snapshots
        assert [q["path"] for q in upstream.requests] == ["/audit/ok/while-writable"]
        assert gw.proc.poll() is None  # refused, not crashed
        assert gw.audit_path.stat().st_size == size
        assert cli("audit", "verify", str(gw.audit_path)).returncode == 0
    finally:
        gw.stop()
        upstream.close()


# --- nothing secret -------------------------------------------------------------------------


def test_zz_no_token_or_credential_in_log_or_stdout(env: SimpleNamespace) -> None:
    audit, stdout = env.gw.audit_text(), env.gw.stdout
    assert len(records(audit)) >= 10 and "DENY" in stdout
    for secret in (env.token, env.token.rsplit(".", 1)[1], UPSTREAM_TOKEN):
        assert secret not in audit
        assert secret not in stdout
