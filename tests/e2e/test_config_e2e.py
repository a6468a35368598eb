"""`./mitm.sh run` with a bad gateway.yaml (SPEC §2): exit 2, a message naming the key, and
nothing listening on any configured address."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.gateway import ROOT, Gateway, free_port

pytestmark = pytest.mark.e2e

POLICY = """
rules:
  - id: nothing
    effect: deny
    reason: config tests never send traffic
    when: {groups: [nobody]}
"""


def base_config() -> dict[str, Any]:
    return {
        "listen": {"proxy": f"127.0.0.1:{free_port()}", "admin": f"127.0.0.1:{free_port()}"},
        "identity": {"dev_issuer": True},
        "targets": [
            {"name": "api", "protocol": "http", "hosts": ["api.example:443"]},
            {"name": "rev", "protocol": "http", "listen": f"127.0.0.1:{free_port()}",
             "upstream": "https://api.example:8443"},
        ],
    }


def listening(addr: str) -> bool:
    host, _, port = addr.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=0.2):
            return True
    except OSError:
        return False


def _valid(addr: Any) -> bool:
    return (isinstance(addr, str) and addr.count(":") == 1 and addr.split(":")[1].isdigit()
            and int(addr.split(":")[1]) < 65536)


def run_bad(tmp_path: Path, cfg: dict[str, Any], env: dict[str, str] | None = None
            ) -> tuple[int, str]:
    """Run the gateway to its exit while probing every configured address the whole time."""
    addrs = [a for a in (cfg["listen"]["proxy"], cfg["listen"]["admin"],
                         cfg["targets"][1]["listen"]) if _valid(a)]
    gw = Gateway(tmp_path / "gw", cfg, env=env, policies={"p.yaml": POLICY})
    proc = subprocess.Popen(
        [sys.executable, "-m", "addons.cli", "run", "--config", str(gw.config_path)],
        cwd=ROOT, env=gw.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        seen += [a for a in addrs if listening(a)]
        time.sleep(0.01)
    if proc.poll() is None:
        proc.kill()
    out = proc.communicate(timeout=10)[0]
    seen += [a for a in addrs if listening(a)]
    assert not seen, f"listening after a config error: {seen}"
    assert "Portcullis ready" not in out
    assert "Traceback" not in out
    return proc.returncode, out


def test_unknown_key(tmp_path: Path) -> None:
    cfg = base_config()
    cfg["targets"][0]["credentails"] = {"type": "none"}
    code, out = run_bad(tmp_path, cfg)
    assert code == 2, out
    assert "configuration error" in out and "targets[0].credentails" in out
    assert "unknown key" in out


def test_missing_secret_env_var(tmp_path: Path) -> None:
    cfg = base_config()
    cfg["targets"][0]["credentials"] = {"type": "bearer", "token_env": "PORTCULLIS_TEST_UNSET"}
    env = {k: v for k, v in os.environ.items() if k != "PORTCULLIS_TEST_UNSET"}
    code, out = run_bad(tmp_path, cfg, env=env)
    assert code == 2, out
    assert "targets[0].credentials.token_env" in out and "PORTCULLIS_TEST_UNSET" in out


def test_bad_address(tmp_path: Path) -> None:
    cfg = base_config()
    cfg["listen"]["admin"] = "127.0.0.1:99999"
    code, out = run_bad(tmp_path, cfg)
    assert code == 2, out
    assert "listen.admin" in out and "99999" in out


def test_bad_target_listen_address(tmp_path: Path) -> None:
    cfg = base_config()
    cfg["targets"][1]["listen"] = "127.0.0.1"
    code, out = run_bad(tmp_path, cfg)
    assert code == 2, out
    assert "targets[1].listen" in out


def test_duplicate_target_name(tmp_path: Path) -> None:
    cfg = base_config()
    cfg["targets"][1]["name"] = "api"
    code, out = run_bad(tmp_path, cfg)
    assert code == 2, out
    assert "targets[1].name" in out and "duplicate" in out


def test_port_clash_between_listeners(tmp_path: Path) -> None:
    cfg = base_config()
    cfg["listen"]["admin"] = cfg["listen"]["proxy"]
    code, out = run_bad(tmp_path, cfg)
    assert code == 2, out
    assert "listen.admin" in out


def test_good_config_listens_everywhere(tmp_path: Path) -> None:
    """The control: the same base config starts and listens on every address it names."""
    cfg = base_config()
    gw = Gateway(tmp_path / "gw", cfg, policies={"p.yaml": POLICY}).start()
    try:
        for addr in (cfg["listen"]["proxy"], cfg["listen"]["admin"],
                     cfg["targets"][1]["listen"]):
            assert listening(addr), addr
        out = gw.stdout
        assert f"export HTTPS_PROXY=http://agent:$TOKEN@{cfg['listen']['proxy']}" in out
        assert f"export SSL_CERT_FILE={gw.ca}" in out and gw.ca.exists()
    finally:
        gw.stop()
