"""`./mitm.sh demo` works as the README says: the printed copy-paste commands run and show an
allowed call, a denied call, a review and the audit log. The demo runs on free ports from a copy
of gateway.yaml so it cannot collide with anything."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures import pg_cluster
from tests.fixtures.gateway import ROOT, free_port


@pytest.fixture
def demo(tmp_path: Path) -> Any:
    cfg = yaml.safe_load((ROOT / "gateway.yaml").read_text())
    cfg["state_dir"] = str(tmp_path / "state")
    cfg["policies"] = str(ROOT / "policies")
    cfg["listen"]["proxy"] = f"127.0.0.1:{free_port()}"
    cfg["listen"]["admin"] = f"127.0.0.1:{free_port()}"
    cfg["listen"]["postgres"] = f"127.0.0.1:{free_port()}"
    for t in cfg["targets"]:
        port = free_port()
        if t["protocol"] == "postgres":
            t["upstream"]["port"] = port
            t["upstream"]["password_file"] = str(tmp_path / "state/demo/pg.password")
            continue
        t["hosts"] = [f"localhost:{port}"]
        t["credentials"]["token_file"] = str(tmp_path / "state/demo" / Path(
            t["credentials"]["token_file"]).name)
        t["tls"]["ca_file"] = str(tmp_path / "state/demo/upstream-ca.pem")
        if "listen" in t:
            t["listen"] = f"127.0.0.1:{free_port()}"
            t["upstream"] = f"https://localhost:{port}"
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "addons.cli", "demo", "--config", str(path)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    done = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "audit verify" in line:
                done.set()

    threading.Thread(target=reader, daemon=True).start()
    try:
        assert done.wait(60), "".join(lines)
        time.sleep(0.2)
        yield path, "".join(lines)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def test_demo_commands_show_allow_deny_review_and_audit(demo: Any) -> None:
    path, out = demo
    block = out.split("copy-paste these in another terminal ===", 1)[1]
    commands = [ln for ln in block.splitlines() if ln and not ln.startswith("#")]
    script = "set -e\ncd " + str(ROOT) + "\n"
    script += "\n".join(c.replace("./mitm.sh", f"{sys.executable} -m addons.cli")
                        for c in commands if c.startswith("export"))
    results = []
    env = {**os.environ, "COLUMNS": "200"}
    background: list[tuple[str, subprocess.Popen[str]]] = []
    last = prev = ""
    for cmd in commands:
        if cmd.startswith("export"):
            continue
        line = cmd.replace("./mitm.sh", f"{sys.executable} -m addons.cli")
        if line.endswith("&"):  # held for approval: runs while the reviewer acts
            background.append((cmd, subprocess.Popen(
                ["bash", "-c", script + "\n" + line[:-1]], stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, env=env)))
            continue
        for _ in range(50):  # the reviewer's list may run before the request is held
            ids = re.findall(r"\b[0-9a-f]{12}\b", last)
            if "<ID>" not in line or ids:
                break
            time.sleep(0.2)
            last = subprocess.run(["bash", "-c", script + "\n" + prev], capture_output=True,
                                  text=True, timeout=60, env=env).stdout
        if "<ID>" in line:
            line = line.replace("<ID>", ids[0])
        res = subprocess.run(["bash", "-c", script + "\n" + line], capture_output=True,
                             text=True, timeout=60, env=env)
        last, prev = res.stdout, line
        results.append((cmd, res.returncode, res.stdout + res.stderr))
    for cmd, proc in background:
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("\n".join(f"$ {c}\n{o}" for c, _, o in results)) from None
        results.append((cmd, proc.returncode, out))
    text = "\n".join(f"$ {c}\n{o}" for c, _, o in results)
    # allowed call reaches the sample API (which only answers to the injected token)
    assert '"users"' in text and "Ada Lovelace" in text, text
    # masked: cards keep their last four, emails are hashed, SSNs and API keys removed
    for raw in ("4111 1111 1111 1111", "ada@example.com", "123-45-6789", "AKIAIOSFODNN7EXAMPLE"):
        assert raw not in text, raw
    assert "1111" in text and "[MASKED:" in text, text
    assert "sample-api-cards" in text, text[text.find("policy explain"):][:3000]  # masks listed
    assert '"rule": "sample-api-admin-deny"' in text, text
    assert "approval" in text and ": approved by alice" in text, text
    assert '{"deleted": 2}' in text, text  # the held DELETE ran after the approval
    assert '"unauthenticated"' in text, text
    assert re.search(r"OK \(\d+ records, hash chain intact\)", text), text
    assert "sample-api-read" in text  # audit show / explain name the rule
    if pg_cluster.available():
        psql = text.split("SELECT name, email, ssn, card FROM customers", 1)[1]
        assert "Ada Lovelace" in psql, text
        assert "123-45-6789" not in psql and "4111111111111111" not in psql, psql
        assert "ada@example.com" not in psql, psql
        assert "portcullis: denied by rule db-no-ddl" in text, text
        assert "DELETE 1" in text, text  # the held psql DELETE ran after the approval
        assert text.count(": approved by alice") >= 2, text  # the HTTP and the SQL hold
    if shutil.which("kubectl"):
        assert "web-1" in text and "Running" in text, text  # kubectl get pods
        assert "etc" in text.split("exec web-1 -- ls", 1)[1], text  # allowed exec ran
        assert "interactive shells are not allowed" in text, text  # kubectl exec -- sh denied
    token = (Path(yaml.safe_load(path.read_text())["state_dir"]) / "demo/sample-api.token")
    assert token.read_text() not in text
