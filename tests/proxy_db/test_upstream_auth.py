"""Upstream login against a real PostgreSQL: SCRAM-SHA-256 (plain and over TLS with channel
binding), md5, trust; wrong passwords and TLS requirements fail cleanly."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest

from addons.config import PostgresUpstream, Secret, TargetConfig, TlsSettings
from proxy_db.messages import Query
from proxy_db.server import open_upstream
from proxy_db.upstream_auth import UpstreamLogin, UpstreamLoginError, md5_password, ssl_plan
from tests.fixtures.pg_cluster import PASSWORDS, PgCluster

pytestmark = pytest.mark.postgres


def target(pg: PgCluster, user: str, sslmode: str = "disable", password: str | None = "",
           ca: Any = None) -> TargetConfig:
    pw = PASSWORDS.get(user) if password == "" else password
    up = PostgresUpstream(host="127.0.0.1", port=pg.port, dbname="orders", user=user,
                          password=Secret(pw, "test") if pw else None, sslmode=sslmode)
    return TargetConfig(name="t", protocol="postgres", upstream=up, database="orders",
                        tls=TlsSettings(verify=True, ca_file=ca))


async def _login(t: TargetConfig) -> UpstreamLogin:
    reader, writer, login = await open_upstream(t, (("client_encoding", "UTF8"),))
    # prove the connection works: a simple query round trip
    writer.write(Query("SELECT current_user::text").encode())
    data = b""
    while not data.endswith(b"Z\x00\x00\x00\x05I"):
        chunk = await asyncio.wait_for(reader.read(65536), 10)
        assert chunk
        data += chunk
    assert t.upstream.user.encode() in data
    writer.close()
    return login


def login(t: TargetConfig) -> UpstreamLogin:
    return asyncio.run(asyncio.wait_for(_login(t), 30))


def test_scram_sha_256_plaintext(pg: PgCluster) -> None:
    lg = login(target(pg, "gw_scram", "disable"))
    assert lg.method == "scram-done" and lg.mechanism == "SCRAM-SHA-256" and not lg.tls
    assert lg.key is not None and dict(lg.params)["client_encoding"] == "UTF8"


def test_scram_sha_256_plus_with_channel_binding_over_tls(pg: PgCluster) -> None:
    lg = login(target(pg, "gw_tls", "require"))
    assert lg.tls and lg.mechanism == "SCRAM-SHA-256-PLUS"


def test_scram_over_verified_tls(pg: PgCluster) -> None:
    lg = login(target(pg, "gw_scram", "verify-full", ca=pg.cert_path))
    assert lg.tls and lg.mechanism == "SCRAM-SHA-256-PLUS"


def test_verify_full_with_the_wrong_ca_fails(pg: PgCluster, tmp_path: Any) -> None:
    from tests.fixtures.tlsutil import make_ca

    other = make_ca(tmp_path / "other")
    import ssl

    with pytest.raises(ssl.SSLError):
        login(target(pg, "gw_scram", "verify-full", ca=other.cert_path))


def test_md5(pg: PgCluster) -> None:
    lg = login(target(pg, "gw_md5", "disable"))
    assert lg.method == "md5"


def test_trust(pg: PgCluster) -> None:
    lg = login(target(pg, "gw_trust", "disable", password=None))
    assert lg.method == "trust"


def test_wrong_password_is_a_login_error_without_the_password(pg: PgCluster) -> None:
    with pytest.raises(UpstreamLoginError) as e:
        login(target(pg, "gw_scram", "disable", password="wrong-pw-123"))
    assert e.value.sqlstate == "28P01"
    assert "wrong-pw-123" not in str(e.value)


def test_missing_password_is_a_login_error(pg: PgCluster) -> None:
    with pytest.raises(UpstreamLoginError, match="requires a password"):
        login(target(pg, "gw_md5", "disable", password=None))


def test_hostssl_only_role_needs_tls(pg: PgCluster) -> None:
    with pytest.raises(UpstreamLoginError) as e:
        login(target(pg, "gw_tls", "disable"))
    assert e.value.sqlstate == "28000"  # no pg_hba entry without TLS


def test_sslmode_require_fails_against_a_server_without_tls() -> None:
    with PgCluster(ssl=False) as plain:
        plain.create_database("orders", sample=False)
        with pytest.raises(UpstreamLoginError, match="does not offer TLS"):
            login(target(plain, "gw_scram", "require"))
        assert not login(target(plain, "gw_scram", "prefer")).tls


def test_md5_hash_matches_the_protocol() -> None:
    # md5(md5(password + user) + salt), documented in the PostgreSQL protocol
    inner = hashlib.md5(b"pu").hexdigest().encode()
    assert md5_password("u", "p", b"abcd") == b"md5" + hashlib.md5(inner + b"abcd").hexdigest(
    ).encode()


def test_cleartext_upstream_request_refused_over_plaintext_to_a_remote_host() -> None:
    from proxy_db.backend import AuthenticationCleartextPassword

    lg = UpstreamLogin("u", "d", "secret", host="10.1.2.3")
    lg.startup()
    with pytest.raises(UpstreamLoginError, match="cleartext"):
        lg.receive(AuthenticationCleartextPassword().encode())


def test_ssl_plans_follow_libpq() -> None:
    assert not ssl_plan("disable").request
    assert ssl_plan("prefer").request and not ssl_plan("prefer").required
    assert ssl_plan("require").required and not ssl_plan("require").verify
    assert ssl_plan("verify-full").check_hostname
