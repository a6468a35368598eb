"""Shared fixtures: a test CA, an echoing HTTPS upstream, a test OIDC issuer, and a factory
that starts real gateway processes with temporary configs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.gateway import Gateway, free_port
from tests.fixtures.oidc import OIDCIssuer
from tests.fixtures.tlsutil import TestCA, make_ca
from tests.fixtures.upstream import EchoServer

UPSTREAM_TOKEN = "upstream-secret-t0ken-4f9a"


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return make_ca(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="session")
def echo_upstream(test_ca: TestCA, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[EchoServer]:
    d = tmp_path_factory.mktemp("upstream")
    cert, key = test_ca.issue(d, ["localhost", "127.0.0.1"])
    srv = EchoServer(cert, key)
    yield srv
    srv.close()


@pytest.fixture(scope="session")
def oidc() -> Iterator[OIDCIssuer]:
    issuer = OIDCIssuer()
    yield issuer
    issuer.close()


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[Gateway] = []

    def make(config: dict[str, Any], policies: dict[str, str] | None = None,
             env: dict[str, str] | None = None, start: bool = True) -> Gateway:
        gw = Gateway(tmp_path / f"gw{len(started)}", config, env=env, policies=policies)
        started.append(gw)
        return gw.start() if start else gw

    yield make
    for gw in started:
        gw.stop()


def http_target(name: str, upstream: EchoServer, test_ca: TestCA, **extra: Any) -> dict[str, Any]:
    t = {"name": name, "protocol": "http", "hosts": [f"localhost:{upstream.port}"],
         "credentials": {"type": "bearer", "token_env": "UPSTREAM_TOKEN"},
         "tls": {"verify": True, "ca_file": str(test_ca.cert_path)}}
    t.update(extra)
    return t


__all__ = ["UPSTREAM_TOKEN", "free_port", "http_target"]
