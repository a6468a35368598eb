"""`./mitm.sh` commands (SPEC §1). Exit codes: 0 ok, 1 check failed, 2 usage/config error."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    pass


def default_config() -> str:
    return os.environ.get("PORTCULLIS_CONFIG", "gateway.yaml")


def _load(path: str, resolve_secrets: bool = False) -> Any:
    """Config for tools that never talk upstream: secrets are not read."""
    from addons.config import load_config

    return load_config(path, resolve_secrets=resolve_secrets)


def cmd_run(args: argparse.Namespace, web: bool = False) -> int:
    from addons.config import ConfigError
    from addons.gateway import run, setup_logging
    from addons.policy import PolicyError
    from addons.runtime import build_runtime

    try:
        config = _load(args.config, resolve_secrets=True)
        runtime = build_runtime(config)
    except (ConfigError, PolicyError) as e:
        print(f"portcullis: configuration error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, ValueError) as e:
        print(f"portcullis: cannot start: {e}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging()
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(run(config, runtime, web=web))
    except KeyboardInterrupt:
        return EXIT_OK
    except OSError as e:
        print(f"portcullis: cannot listen: {e}", file=sys.stderr)
        return EXIT_USAGE


def _loop_factory() -> Any:
    """uvloop's event loop when it is installed (a project dependency on Linux and macOS),
    asyncio's own otherwise. libuv's loop and transports cost less CPU per socket event: a
    do-nothing Postgres forwarder needs ~36 µs per pgbench transaction on it against ~57 µs on
    asyncio's (docs/postgres.md, "Throughput")."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def cmd_token(args: argparse.Namespace) -> int:
    from addons.identity import DEV_AUDIENCE, DevIssuer, parse_duration

    state_dir = Path(".portcullis")
    try:
        config = _load(args.config)
        state_dir = config.state_dir
        if not config.identity.dev_issuer:
            print("portcullis: warning: identity.dev_issuer is false in "
                  f"{args.config}; the gateway will not trust this token", file=sys.stderr)
    except Exception as e:  # noqa: BLE001 - a token can be minted without a valid config
        if Path(args.config).exists():
            print(f"portcullis: warning: {e}; using {state_dir}", file=sys.stderr)
    try:
        ttl = parse_duration(args.ttl)
    except ValueError as e:
        raise UsageError(str(e)) from e
    groups = [g for g in (args.groups or "").split(",") if g]
    print(DevIssuer(state_dir).token(args.sub, groups, ttl, args.aud or DEV_AUDIENCE))
    return EXIT_OK


def _audit_path(args: argparse.Namespace) -> Path:
    if getattr(args, "file", None):
        return Path(args.file)
    return _load(args.config).audit_file


def cmd_audit(args: argparse.Namespace) -> int:
    from addons import auditcli

    if args.audit_cmd == "verify":
        return auditcli.verify(_audit_path(args))
    return auditcli.show(_audit_path(args), since=args.since, target=args.target,
                         decision=args.decision)


def cmd_policy(args: argparse.Namespace) -> int:
    try:
        from addons import policytools
    except ImportError as e:
        raise UsageError(f"policy tooling unavailable: {e}") from e
    return policytools.main(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from addons import demo

    return demo.main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mitm.sh", description="Portcullis zero-trust gateway")
    sub = p.add_subparsers(dest="cmd", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", default=default_config(),
                        help="gateway config (default ./gateway.yaml or $PORTCULLIS_CONFIG)")
        return sp

    with_config(sub.add_parser("run", help="start every listener in the config"))
    with_config(sub.add_parser("web", help="run with mitmweb's UI"))
    with_config(sub.add_parser("demo", help="gateway + sample upstreams + copy-paste commands"))
    tok = with_config(sub.add_parser("token", help="print a JWT from the dev issuer"))
    tok.add_argument("--sub", required=True)
    tok.add_argument("--groups", default="")
    tok.add_argument("--ttl", default="15m")
    tok.add_argument("--aud", default=None)

    pol = sub.add_parser("policy", help="check, test or explain policies")
    psub = pol.add_subparsers(dest="policy_cmd", required=True)
    for name in ("check", "test"):
        sp = with_config(psub.add_parser(name))
        sp.add_argument("dir", nargs="?", default=None)
    ex = with_config(psub.add_parser("explain"))
    ex.add_argument("--sub", required=True)
    ex.add_argument("--groups", default="")
    ex.add_argument("--target", required=True)
    kind = ex.add_mutually_exclusive_group(required=True)
    kind.add_argument("--http")
    kind.add_argument("--k8s")
    kind.add_argument("--sql")

    aud = sub.add_parser("audit", help="verify or show the audit log")
    asub = aud.add_subparsers(dest="audit_cmd", required=True)
    v = with_config(asub.add_parser("verify"))
    v.add_argument("file", nargs="?", default=None)
    s = with_config(asub.add_parser("show"))
    s.add_argument("--file", default=None)
    s.add_argument("--since", default=None, help="ISO time or a duration such as 15m")
    s.add_argument("--target", default=None)
    s.add_argument("--decision", default=None, choices=["allow", "deny", "review"])

    ap = with_config(sub.add_parser("approvals", help="list, approve or deny held requests"))
    ap.add_argument("action", nargs="?", choices=["list", "approve", "deny"], default="list")
    ap.add_argument("id", nargs="?", default=None)
    ap.add_argument("--reason", default=None)
    ap.add_argument("--grant", default=None, help="with approve: let the same identity repeat "
                    "the same operation without review for this long (e.g. 30m)")
    ap.add_argument("--state", default=None, choices=["pending", "approved", "denied", "expired"])
    ap.add_argument("--admin", default=None, help="admin API URL (default: listen.admin)")

    rep = sub.add_parser("replay", help="open recorded flows in mitmweb")
    with_config(rep)
    rep.add_argument("file", nargs="?", default=None)
    rep.add_argument("--web-port", type=int, default=8082, help="mitmweb UI port (8082)")
    return p


def main(argv: list[str] | None = None) -> int:
    from addons.config import ConfigError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code not in (0, None) else EXIT_OK
    try:
        if args.cmd in ("run", "web"):
            return cmd_run(args, web=args.cmd == "web")
        if args.cmd == "token":
            return cmd_token(args)
        if args.cmd == "audit":
            return cmd_audit(args)
        if args.cmd == "policy":
            return cmd_policy(args)
        if args.cmd == "demo":
            return cmd_demo(args)
        if args.cmd == "approvals":
            from addons import approvalscli

            return approvalscli.main(args)
        if args.cmd == "replay":
            from addons import auditcli

            return auditcli.replay(args)
    except ConfigError as e:
        print(f"portcullis: configuration error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as e:
        print(f"portcullis: {e}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
