"""Start every listener of a config on one event loop: mitmproxy (forward proxy + reverse
listeners), the Postgres gateway, the admin API, and the policy reloader."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

from addons import decisionlog
from addons.config import GatewayConfig
from addons.decisionlog import DecisionLogHandler, flush_logs  # noqa: F401 - re-exported
from addons.runtime import Runtime

log = logging.getLogger("portcullis")
RELOAD_INTERVAL = 0.5
LOG_FLUSH_INTERVAL = 0.1


def setup_logging() -> None:
    decisionlog.setup_logging(sys.stdout)


async def _log_flush_loop() -> None:
    while True:
        await asyncio.sleep(LOG_FLUSH_INTERVAL)
        try:
            flush_logs()
        except Exception:  # noqa: BLE001 - stdout gone: nothing better to do
            pass


def proxy_modes(config: GatewayConfig) -> list[str]:
    modes = []
    if config.listen_proxy:
        host, port = config.listen_proxy
        modes.append(f"regular@{host}:{port}")
    for t in config.targets:
        if t.listen and t.protocol != "postgres":
            host, port = t.listen
            modes.append(f"reverse:{t.upstream}@{host}:{port}")
    return modes


def agent_exports(config: GatewayConfig, runtime: Runtime) -> list[str]:
    ca = runtime.ca_cert_path
    lines = []
    if config.listen_proxy:
        host, port = config.listen_proxy
        lines += [f"export HTTPS_PROXY=http://agent:$TOKEN@{host}:{port}",
                  f"export HTTP_PROXY=http://agent:$TOKEN@{host}:{port}"]
    lines += [f"export SSL_CERT_FILE={ca}", f"export REQUESTS_CA_BUNDLE={ca}"]
    return lines


class Ready:
    """Prints the banner once every listener is up."""

    after_banner = ""  # extra text (the demo's copy-paste commands)

    def __init__(self, config: GatewayConfig, runtime: Runtime) -> None:
        self.config = config
        self.runtime = runtime
        self.printed = False

    def running(self) -> None:
        if self.printed:
            return
        self.printed = True
        print_banner(self.config, self.runtime)
        if self.after_banner:
            print(self.after_banner, flush=True)


def print_banner(config: GatewayConfig, runtime: Runtime) -> None:
    out = [f"Portcullis: CA certificate for agents: {runtime.ca_cert_path}"]
    if config.listen_proxy:
        out.append("Portcullis: forward proxy on {}:{}".format(*config.listen_proxy))
    for t in config.targets:
        if t.listen and t.protocol != "postgres":
            out.append(f"Portcullis: reverse listener for {t.name} on {t.listen[0]}:{t.listen[1]}")
    if config.listen_postgres:
        out.append("Portcullis: postgres gateway on {}:{}".format(*config.listen_postgres))
    if config.listen_admin:
        out.append("Portcullis: admin API on {}:{}".format(*config.listen_admin))
    out.append("Portcullis: agent environment:")
    out += ["  " + line for line in agent_exports(config, runtime)]
    loop = type(asyncio.get_running_loop())
    out.append(f"Portcullis: event loop: {loop.__module__.split('.')[0]}.{loop.__name__}")
    out.append(f"Portcullis ready (audit log: {config.audit_file})")
    print("\n".join(out), flush=True)


async def _reload_loop(runtime: Runtime) -> None:
    from addons.metrics import POLICY_RELOADS

    while True:
        await asyncio.sleep(RELOAD_INTERVAL)
        try:
            before = runtime.policies.last_error
            if runtime.policies.check():
                POLICY_RELOADS.labels("ok").inc()
            elif runtime.policies.last_error and runtime.policies.last_error != before:
                POLICY_RELOADS.labels("rejected").inc()
        except Exception:  # noqa: BLE001 - keep the last good policy and keep watching
            log.exception("policy reload check failed")


async def run(config: GatewayConfig, runtime: Runtime, web: bool = False) -> int:
    from mitmproxy import options

    from addons import make_addons, wire_errors
    from addons.ca import ensure_ca

    ensure_ca(config.state_dir)
    wire_errors.install()
    servers: list[Any] = []
    if config.listen_postgres:
        from proxy_db import server as pg_server

        servers.append(await pg_server.serve(runtime))
    if config.listen_admin:
        from addons import admin

        servers.append(await admin.serve(runtime))
    reloader = asyncio.create_task(_reload_loop(runtime))
    flusher = asyncio.create_task(_log_flush_loop())
    modes = proxy_modes(config)
    stop = asyncio.Event()
    master: Any = None

    def on_signal() -> None:
        # SIGTERM/SIGINT end the gateway cleanly: deferred audit lines and buffered log lines
        # are written before the process exits.
        log.info("stopping")
        stop.set()
        if master is not None:
            master.shutdown()

    _install_signals(on_signal)
    try:
        if not modes:
            print_banner(config, runtime)
            await stop.wait()
            return 0
        opts = options.Options()
        if web:
            from mitmproxy.tools.web.master import WebMaster

            master = WebMaster(opts, with_termlog=True)
        else:
            from mitmproxy.tools.dump import DumpMaster

            master = DumpMaster(opts, with_termlog=True, with_dumper=False)
        master.addons.add(*make_addons(runtime), Ready(config, runtime))
        settings: dict[str, Any] = dict(
            mode=modes, confdir=str(config.state_dir), connection_strategy="lazy",
            ssl_insecure=False, termlog_verbosity="warn",
        )
        if web:
            settings["web_open_browser"] = False
        opts.update(**settings)
        await master.run()
        return 0
    finally:
        reloader.cancel()
        flusher.cancel()
        for s in servers:
            s.close()
            pg = getattr(s, "portcullis_gateway", None)
            if pg is not None:
                try:  # ends open Postgres sessions: their last recording segments are written
                    pg.close()
                except Exception:  # noqa: BLE001 - keep stopping
                    log.exception("postgres gateway did not close cleanly")
        try:
            runtime.audit.flush()
        except Exception:  # noqa: BLE001 - AuditLog.close() reports what it cannot write
            log.error("audit: deferred lines could not be written at shutdown")
        flush_logs()


def _install_signals(handler: Any) -> None:
    import signal

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, handler)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            pass
