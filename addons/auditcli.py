"""`audit verify`, `audit show` and `replay` commands (rich tables)."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from addons.audit import iter_records, verify_file


def verify(path: Path) -> int:
    result = verify_file(path)
    if result.ok:
        print(f"audit log {path}: OK ({result.records} records, hash chain intact)")
        return 0
    where = f"line {result.bad_line}" if result.bad_line else str(path)
    print(f"audit log {path}: BROKEN at {where}: {result.message} "
          f"({result.records} records verified before it)")
    return 1


def _since(value: str | None) -> float | None:
    if not value:
        return None
    m = re.fullmatch(r"(\d+)([smhd])", value.strip())
    if m:
        mult = {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        return time.time() - int(m.group(1)) * mult
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise SystemExit(f"portcullis: bad --since {value!r} (ISO time or e.g. 15m)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


_STYLES: dict[str | None, str] = {"allow": "green", "deny": "red", "review": "yellow"}


def show(path: Path, since: str | None = None, target: str | None = None,
         decision: str | None = None) -> int:
    if not path.exists():
        print(f"portcullis: no audit log at {path}", file=sys.stderr)
        return 2
    cutoff = _since(since)
    outcomes: dict[str | None, dict] = {}  # by decision_id, as the records carry it
    decisions = []
    for _, rec in iter_records(path):
        if rec.get("type") == "outcome":
            outcomes[rec.get("decision_id")] = rec
        else:
            decisions.append(rec)
    table = Table(title=f"audit log {path}")
    for col in ("time", "decision", "protocol", "target", "identity", "operation", "rules",
                "outcome", "masked"):
        table.add_column(col, overflow="fold")
    rows = 0
    for rec in decisions:
        ts = datetime.fromisoformat(rec["time"].replace("Z", "+00:00")).timestamp()
        if cutoff is not None and ts < cutoff:
            continue
        if target and rec.get("target") != target:
            continue
        if decision and rec.get("decision") != decision:
            continue
        out = outcomes.get(rec["id"], {})
        oc = out.get("outcome") or {}
        masked = (out.get("masked") or {}).get("count", 0)
        ident = rec.get("identity") or {}
        style = _STYLES.get(rec.get("decision"), "")
        table.add_row(rec["time"], f"[{style}]{rec.get('decision')}[/{style}]",
                      rec.get("protocol") or "", rec.get("target") or "-", ident.get("sub", "-"),
                      (rec.get("operation") or {}).get("summary", ""),
                      ",".join(rec.get("rules") or []),
                      str(oc.get("status", oc.get("error", ""))), str(masked or ""))
        rows += 1
    Console(width=max(120, shutil.get_terminal_size().columns)).print(table)
    print(f"{rows} decisions")
    return 0


def replay(args: argparse.Namespace) -> int:
    """Open recordings in mitmweb (UI only: no proxy server is started)."""
    import tempfile

    from addons.cli import _load

    if args.file:
        files = [Path(args.file)]
        if not files[0].exists():
            print(f"portcullis: no such recording {files[0]}", file=sys.stderr)
            return 2
    else:
        rec_dir = _load(args.config).recordings_dir
        files = sorted(rec_dir.glob("*.mitm")) if rec_dir.exists() else []
    if not files:
        print("portcullis: no recordings found", file=sys.stderr)
        return 2
    # mitmweb reads one file; flow files are concatenable streams, so join them.
    with tempfile.NamedTemporaryFile(prefix="portcullis-replay-", suffix=".mitm",
                                     delete=False) as joined:
        for f in files:
            joined.write(f.read_bytes())
    mitmweb = Path(sys.executable).with_name("mitmweb")
    cmd = [str(mitmweb), "--rfile", joined.name, "--set", "server=false",
           "--set", "web_open_browser=false", "--set", "web_host=127.0.0.1",
           "--set", f"web_port={args.web_port}"]
    print(f"opening {len(files)} recording(s) in mitmweb at http://127.0.0.1:{args.web_port}/",
          flush=True)
    try:
        return subprocess.call(cmd, env=os.environ.copy())
    finally:
        os.unlink(joined.name)
