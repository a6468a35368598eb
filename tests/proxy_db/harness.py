"""An in-process Postgres gateway for tests: the real `proxy_db.server.serve` on an event loop in
a background thread, built from a real config file and policy directory (dev issuer tokens).

Sync clients (psql, psycopg) and async ones (asyncpg, in their own loop) talk to it over
127.0.0.1. Every log record of the `portcullis` loggers is captured in `logs` for leak greps.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import yaml

from addons.config import load_config
from addons.identity import DevIssuer
from addons.runtime import build_runtime
from tests.fixtures.pg_cluster import PASSWORDS, PgCluster, free_port


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # noqa: BLE001
            self.lines.append(record.getMessage())


def pg_target(pg: PgCluster, name: str = "orders-db", database: str = "orders",
              user: str = "gw_scram", dbname: str = "orders", sslmode: str = "prefer",
              **extra: Any) -> dict[str, Any]:
    up: dict[str, Any] = {"host": "127.0.0.1", "port": pg.port, "dbname": dbname, "user": user,
                          "sslmode": sslmode}
    if PASSWORDS.get(user):
        up["password_env"] = f"PGPW_{user.upper()}"
    t = {"name": name, "protocol": "postgres", "database": database, "upstream": up}
    t.update(extra)
    return t


class InProcessGateway:
    def __init__(self, workdir: Path, targets: list[dict[str, Any]], policies: dict[str, str],
                 postgres_tls: str = "prefer") -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        pol = workdir / "policies"
        pol.mkdir(exist_ok=True)
        for name, text in policies.items():
            (pol / name).write_text(text)
        self.port = free_port()
        cfg = {"state_dir": str(workdir / "state"), "policies": str(pol),
               "listen": {"postgres": f"127.0.0.1:{self.port}", "postgres_tls": postgres_tls},
               "identity": {"dev_issuer": True}, "targets": targets}
        path = workdir / "gateway.yaml"
        path.write_text(yaml.safe_dump(cfg))
        for user, pw in PASSWORDS.items():
            if pw:
                os.environ[f"PGPW_{user.upper()}"] = pw
        self.config = load_config(path)
        self.runtime = build_runtime(self.config)
        self.issuer = DevIssuer(self.config.state_dir)
        self.loop = asyncio.new_event_loop()
        self.server: Any = None
        self.capture = _Capture()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> InProcessGateway:
        from proxy_db.server import serve

        root = logging.getLogger("portcullis")
        root.addHandler(self.capture)
        root.setLevel(logging.DEBUG)
        self._thread.start()
        self.server = asyncio.run_coroutine_threadsafe(serve(self.runtime), self.loop).result(30)
        return self

    def stop(self) -> None:
        logging.getLogger("portcullis").removeHandler(self.capture)
        if self.server is not None:
            async def _close() -> None:
                self.server.close()
                self.server.portcullis_gateway.close()
                await asyncio.sleep(0.05)

            asyncio.run_coroutine_threadsafe(_close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.runtime.audit.close()

    @property
    def gateway(self) -> Any:
        return self.server.portcullis_gateway

    def token(self, sub: str = "agent-1", groups: list[str] | None = None,
              ttl: int = 900) -> str:
        return self.issuer.token(sub, groups or [], ttl)

    @property
    def audit_path(self) -> Path:
        return self.config.audit_file

    def audit_text(self) -> str:
        return self.audit_path.read_text() if self.audit_path.exists() else ""

    def logs(self) -> str:
        return "\n".join(self.capture.lines)

    def dsn(self, token: str, db: str = "orders", sslmode: str = "disable", **kw: str) -> str:
        extra = "".join(f" {k}={v}" for k, v in kw.items())
        return (f"host=127.0.0.1 port={self.port} user=agent dbname={db} password={token} "
                f"sslmode={sslmode}{extra}")

    def psql(self, token: str, sql: str, db: str = "orders", sslmode: str = "disable",
             extra_env: dict[str, str] | None = None, timeout: float = 30,
             args: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "PGOPTIONS"}
        env.update({"PGPASSWORD": token, "PGSSLMODE": sslmode, "PGCONNECT_TIMEOUT": "10"})
        env.update(extra_env or {})
        cmd = ["psql", "-X", "-h", "127.0.0.1", "-p", str(self.port), "-U", "agent", "-d", db,
               *args, "-c", sql]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
