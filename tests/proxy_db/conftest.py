"""Fixtures for the Postgres gateway tests: one throwaway PostgreSQL (TLS on, every auth
method in pg_hba) per test session, and an in-process gateway factory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures import pg_cluster
from tests.fixtures.pg_cluster import PgCluster
from tests.proxy_db.harness import InProcessGateway


@pytest.fixture(scope="session")
def pg() -> Iterator[PgCluster]:
    if not pg_cluster.available():
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    cluster = PgCluster(ssl=True).start()
    cluster.create_database("orders")
    cluster.create_database("inventory")
    yield cluster
    cluster.stop()


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Any]:
    started: list[InProcessGateway] = []

    def make(targets: list[dict[str, Any]], policies: dict[str, str],
             postgres_tls: str = "prefer") -> InProcessGateway:
        gw = InProcessGateway(tmp_path / f"gw{len(started)}", targets, policies, postgres_tls)
        started.append(gw)
        return gw.start()

    yield make
    for gw in started:
        gw.stop()
