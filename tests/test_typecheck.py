"""mypy over the engines, proxy_db and demo (`[tool.mypy]` in pyproject.toml) reports no error.

Runs mypy as the developer would (`python -m mypy` from the repo root, so the pyproject config
applies) with its incremental cache in `.mypy_cache/`: a warm run takes about a second."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_mypy_reports_no_error() -> None:
    res = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True,
                         text=True, timeout=240)
    output = res.stdout + res.stderr
    assert res.returncode == 0, f"mypy found type errors:\n{output}"
    # Guard against a vacuous pass (a config that checks nothing): every package was read.
    checked = re.search(r"Success: no issues found in (\d+) source files", output)
    assert checked is not None, output
    assert int(checked.group(1)) >= 40, output
