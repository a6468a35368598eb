"""Targets and egress: which configured target a host:port, listener or database is.

Engine: `TargetIndex` (plain lookups). Adapter: `Targets` refuses CONNECTs and requests to hosts
that belong to no target (403 unknown_target) before any upstream connection is opened, and kills
raw TCP/UDP/DNS flows, which no target describes (egress allow-list, default deny).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from addons.config import GatewayConfig, TargetConfig
from addons.model import UnknownTarget

DEFAULT_PORTS = {"http": 80, "https": 443}


class TargetIndex:
    def __init__(self, config: GatewayConfig) -> None:
        self.by_name_map = {t.name: t for t in config.targets}
        self.hosts: dict[tuple[str, int | None], TargetConfig] = {}
        self.listeners: dict[int, TargetConfig] = {}
        self.upstreams: dict[tuple[str, int], TargetConfig] = {}
        self.databases: dict[str, TargetConfig] = {}
        for t in config.targets:
            for host, port in t.hosts:
                self.hosts[(host.lower(), port)] = t
            if t.listen:
                self.listeners[t.listen[1]] = t
            if isinstance(t.upstream, str):
                u = urlsplit(t.upstream)
                port = u.port or DEFAULT_PORTS[u.scheme]
                self.upstreams[((u.hostname or "").lower(), port)] = t
            if t.database:
                self.databases[t.database] = t

    def by_name(self, name: str) -> TargetConfig | None:
        return self.by_name_map.get(name)

    def by_host(self, host: str, port: int) -> TargetConfig | None:
        """A target's `hosts` entry: host:port exactly, or a bare host (ports 80 and 443)."""
        host = host.lower().rstrip(".")
        found = self.hosts.get((host, port))
        if found is None and port in (80, 443):
            found = self.hosts.get((host, None))
        return found if found is not None and found.protocol != "postgres" else None

    def by_listener(self, port: int) -> TargetConfig | None:
        return self.listeners.get(port)

    def by_server_address(self, host: str, port: int) -> TargetConfig | None:
        """The target an upstream connection belongs to (for per-target TLS settings)."""
        return self.by_host(host, port) or self.upstreams.get((host.lower(), port))

    def by_database(self, dbname: str) -> TargetConfig | None:
        return self.databases.get(dbname)

    def require_host(self, host: str, port: int) -> TargetConfig:
        t = self.by_host(host, port)
        if t is None:
            raise UnknownTarget(f"{host}:{port} is not a configured target")
        return t


class Targets:
    """mitmproxy adapter: egress allow-list."""

    def __init__(self, index: TargetIndex) -> None:
        self.index = index

    def _resolve(self, flow) -> TargetConfig:  # noqa: ANN001 - mitmproxy flow
        from addons import flows

        if flows.is_reverse(flow):
            t = self.index.by_listener(flow.client_conn.sockname[1])
            if t is None:
                raise UnknownTarget("no target for this listener")
            return t
        return self.index.require_host(flow.request.host, flow.request.port)

    def http_connect(self, flow) -> None:  # noqa: ANN001
        from addons import flows

        with flows.guard(flow, proxy=True):
            if flow.response is not None:
                return
            flow.metadata[flows.TARGET] = self._resolve(flow)

    def request(self, flow) -> None:  # noqa: ANN001
        from addons import flows

        with flows.guard(flow):
            if flow.response is not None:
                return
            target = self._resolve(flow)
            flow.metadata[flows.TARGET] = target
            if not flows.is_reverse(flow):
                # What goes upstream is what was decided on: the Host header names the target.
                default = DEFAULT_PORTS.get(flow.request.scheme)
                hp = flow.request.host if flow.request.port == default else (
                    f"{flow.request.host}:{flow.request.port}")
                flow.request.host_header = hp

    # Nothing but HTTP(S) to configured targets leaves the gateway.
    def tcp_start(self, flow) -> None:  # noqa: ANN001
        flow.kill()

    def udp_start(self, flow) -> None:  # noqa: ANN001
        flow.kill()

    def dns_request(self, flow) -> None:  # noqa: ANN001
        flow.kill()
