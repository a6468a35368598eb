"""`./mitm.sh approvals [list | approve ID | deny ID] [--reason R] [--grant 30m]`: reviewer
commands against the admin API, with the reviewer's token from $PORTCULLIS_TOKEN."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table


def _call(base: str, method: str, path: str, token: str, body: dict[str, Any] | None = None
          ) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method, headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    # The admin API is never reached through the agent's HTTP(S)_PROXY settings.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=15) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"{}")
        except ValueError:
            return e.code, {"error": "http_error"}
    except (urllib.error.URLError, OSError) as e:
        return 0, {"reason": f"cannot reach the admin API at {base}: "
                             f"{getattr(e, 'reason', e)}"}


def main(args: argparse.Namespace) -> int:
    from addons.cli import UsageError, _load
    from addons.identity import parse_duration

    token = os.environ.get("PORTCULLIS_TOKEN")
    if not token:
        raise UsageError("set PORTCULLIS_TOKEN to the reviewer's token")
    if args.admin:
        base = args.admin.rstrip("/")
    else:
        cfg = _load(args.config)
        if cfg.listen_admin is None:
            raise UsageError("listen.admin is not configured")
        base = "http://{}:{}".format(*cfg.listen_admin)
    action = args.action or "list"
    if action == "list":
        status, doc = _call(base, "GET", "/v1/approvals?state=" + (args.state or "pending"),
                            token)
        if status != 200:
            print(f"portcullis: {status} {doc.get('reason') or doc}", file=sys.stderr)
            return 1
        table = Table(title=f"approvals ({args.state or 'pending'})")
        for col in ("id", "created", "state", "requester", "target", "operation", "rules"):
            table.add_column(col, overflow="fold")
        for a in doc["approvals"]:
            created = datetime.fromtimestamp(a["created"], UTC).strftime("%H:%M:%S")
            table.add_row(a["id"], created, a["state"], a["identity"].get("sub", ""),
                          a["target"], a["operation"].get("summary", ""), ",".join(a["rules"]))
        Console(width=max(120, Console().width)).print(table)
        return 0
    if not args.id:
        raise UsageError(f"approvals {action} needs an approval ID")
    body: dict[str, Any] = {}
    if args.reason:
        body["reason"] = args.reason
    if args.grant:
        if action != "approve":
            raise UsageError("--grant only goes with approve")
        try:
            body["grant_minutes"] = max(1, parse_duration(args.grant) // 60)
        except ValueError as e:
            raise UsageError(str(e)) from e
    status, doc = _call(base, "POST", f"/v1/approvals/{args.id}/{action}", token, body)
    if status != 200:
        print(f"portcullis: {status} {doc.get('reason') or doc}", file=sys.stderr)
        return 1
    print(f"approval {doc['id']}: {doc['state']} by {doc['decided_by']}")
    return 0
