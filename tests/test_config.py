"""Config parsing (`addons.config`): every mistake is a ConfigError naming its key; defaults and
path resolution match docs/configuration.md; secrets are read once and never print."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from addons.config import (
    DEFAULT_ALGORITHMS,
    ConfigError,
    GatewayConfig,
    PostgresUpstream,
    Secret,
    load_config,
    parse_address,
    parse_config,
)

SECRET = "s3cret-config-value-91"


@pytest.fixture
def base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "policies").mkdir()
    monkeypatch.setenv("CFG_TOKEN", SECRET)
    monkeypatch.delenv("CFG_MISSING", raising=False)
    monkeypatch.setenv("CFG_EMPTY", "")
    return tmp_path


def target(**kw: Any) -> dict[str, Any]:
    t: dict[str, Any] = {"name": "api", "protocol": "http", "hosts": ["api.example:443"]}
    t.update(kw)
    return t


def doc(**kw: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"listen": {"proxy": "127.0.0.1:8080"},
                         "identity": {"dev_issuer": True}, "targets": [target()]}
    d.update(kw)
    return d


def parse(base: Path, d: dict[str, Any]) -> GatewayConfig:
    return parse_config(d, str(base / "gateway.yaml"), base)


def error_key(base: Path, d: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as exc:
        parse(base, d)
    assert str(base / "gateway.yaml") in str(exc.value)
    assert exc.value.key in str(exc.value)
    return exc.value.key


# --- unknown keys, at every level ------------------------------------------------------------


@pytest.mark.parametrize("mutate, key", [
    (lambda d: d.update(listn={}), "listn"),
    (lambda d: d["listen"].update(proxi="127.0.0.1:1"), "listen.proxi"),
    (lambda d: d["identity"].update(dev_issuers=True), "identity.dev_issuers"),
    (lambda d: d["identity"].update(issuers=[{"issuer": "https://i", "audience": "a",
                                              "jwks_url": "https://i/k"}]),
     "identity.issuers[0].jwks_url"),
    (lambda d: d["targets"][0].update(credential={}), "targets[0].credential"),
    (lambda d: d["targets"][0].update(credentials={"type": "bearer", "tokn_env": "X"}),
     "targets[0].credentials.tokn_env"),
    (lambda d: d["targets"][0].update(tls={"verfy": False}), "targets[0].tls.verfy"),
    (lambda d: d.update(audit={"fil": "a.jsonl"}), "audit.fil"),
    (lambda d: d.update(approvals={"timeout": 5}), "approvals.timeout"),
    (lambda d: d.update(limits={"max_body": 5}), "limits.max_body"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_unknown_key_named(base: Path, mutate: Any, key: str) -> None:
    d = doc()
    mutate(d)
    assert error_key(base, d) == key


def test_unknown_key_message_lists_allowed(base: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        parse(base, doc(listn={}))
    assert "unknown key" in exc.value.message and "listen" in exc.value.message


def test_top_level_must_be_mapping(base: Path) -> None:
    with pytest.raises(ConfigError):
        parse(base, ["not", "a", "mapping"])  # type: ignore[arg-type]


# --- secrets -------------------------------------------------------------------------------------


def test_missing_secret_env_var_named(base: Path) -> None:
    d = doc(targets=[target(credentials={"type": "bearer", "token_env": "CFG_MISSING"})])
    with pytest.raises(ConfigError) as exc:
        parse(base, d)
    assert exc.value.key == "targets[0].credentials.token_env"
    assert "CFG_MISSING" in exc.value.message


def test_empty_secret_env_var_refused(base: Path) -> None:
    d = doc(targets=[target(credentials={"type": "header", "header": "X-Api-Key",
                                         "value_env": "CFG_EMPTY"})])
    assert error_key(base, d) == "targets[0].credentials.value_env"


def test_secret_file_missing_or_empty(base: Path) -> None:
    d = doc(targets=[target(credentials={"type": "basic", "username": "u",
                                         "password_file": "nope.txt"})])
    assert error_key(base, d) == "targets[0].credentials.password_file"
    (base / "empty.txt").write_text("\n")
    d["targets"][0]["credentials"]["password_file"] = "empty.txt"
    assert error_key(base, d) == "targets[0].credentials.password_file"


def test_secret_env_and_file_both_refused(base: Path) -> None:
    (base / "tok").write_text(SECRET)
    d = doc(targets=[target(credentials={"type": "bearer", "token_env": "CFG_TOKEN",
                                         "token_file": "tok"})])
    assert error_key(base, d) == "targets[0].credentials.token_env"


def test_secret_required_for_type(base: Path) -> None:
    d = doc(targets=[target(credentials={"type": "bearer"})])
    assert error_key(base, d) == "targets[0].credentials.token_env"
    d = doc(targets=[target(credentials={"type": "basic", "password_env": "CFG_TOKEN"})])
    assert error_key(base, d) == "targets[0].credentials.username"
    d = doc(targets=[target(credentials={"type": "header", "header": "bad header!",
                                         "value_env": "CFG_TOKEN"})])
    assert error_key(base, d) == "targets[0].credentials.header"
    d = doc(targets=[target(credentials={"type": "oauth"})])
    assert error_key(base, d) == "targets[0].credentials.type"


def test_secrets_resolved_and_never_printed(base: Path) -> None:
    (base / "pw.txt").write_text(SECRET + "-file\n")
    d = doc(targets=[
        target(credentials={"type": "bearer", "token_env": "CFG_TOKEN"}),
        target(name="b", hosts=["b.example"],
               credentials={"type": "basic", "username": "svc", "password_file": "pw.txt"}),
    ])
    cfg = parse(base, d)
    creds = cfg.targets[0].credentials
    assert creds.token is not None and creds.token.reveal() == SECRET
    assert cfg.targets[1].credentials.password.reveal() == SECRET + "-file"  # stripped
    assert sorted(cfg.secrets()) == sorted([SECRET, SECRET + "-file"])
    for text in (repr(cfg), str(cfg), repr(creds), str(creds.token), f"{creds.token}"):
        assert SECRET not in text
    assert repr(Secret("x" * 10, "$V")) == "Secret(from $V)"


# --- addresses -----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [
    "127.0.0.1", "127.0.0.1:99999", "127.0.0.1:-1", "127.0.0.1:http", ":8080", "bad host:80",
    "bad_host:80", "bad!host-x:80", "a..b:80", True, ["127.0.0.1", 80], "",
])
def test_bad_listen_address_named(base: Path, value: Any) -> None:
    d = doc()
    d["listen"]["proxy"] = value
    if value == "":
        # An empty value means "off": a config without a listener is refused elsewhere
        assert parse(base, d).listen_proxy is None
        return
    assert error_key(base, d) == "listen.proxy"


def test_bad_address_in_other_places(base: Path) -> None:
    d = doc()
    d["listen"]["admin"] = "localhost:port"
    assert error_key(base, d) == "listen.admin"
    d = doc(targets=[target(listen="127.0.0.1:70000", upstream="https://api.example")])
    assert error_key(base, d) == "targets[0].listen"
    d = doc(targets=[target(hosts=["api.example:0x50"])])
    assert error_key(base, d) == "targets[0].hosts[0]"


def test_two_listeners_on_one_address_refused(base: Path) -> None:
    d = doc(targets=[target(listen="127.0.0.1:8080", upstream="https://api.example")])
    assert error_key(base, d) == "targets[0].listen"
    d = doc()
    d["listen"]["admin"] = "127.0.0.1:8080"
    assert error_key(base, d) == "listen.admin"
    d["listen"]["admin"] = "0.0.0.0:8080"
    assert error_key(base, d) == "listen.admin"
    d["listen"]["admin"] = "127.0.0.2:8080"  # same port, another address: fine
    assert parse(base, d).listen_admin == ("127.0.0.2", 8080)


def test_good_addresses() -> None:
    assert parse_address("127.0.0.1:8080", "k") == ("127.0.0.1", 8080)
    assert parse_address("localhost:1", "k") == ("localhost", 1)
    assert parse_address("[::1]:443", "k") == ("::1", 443)
    assert parse_address("gw-1.internal.example:9000", "k") == ("gw-1.internal.example", 9000)
    assert parse_address(8080, "k") == ("127.0.0.1", 8080)


def test_hosts_parsed_and_lowercased(base: Path) -> None:
    cfg = parse(base, doc(targets=[target(hosts=["API.Example.com", "api.example.com:8443",
                                                  "[::1]:443"])]))
    assert cfg.targets[0].hosts == (("api.example.com", None), ("api.example.com", 8443),
                                    ("::1", 443))


# --- targets -------------------------------------------------------------------------------------


def test_duplicate_target_name_named(base: Path) -> None:
    d = doc(targets=[target(), target(hosts=["other.example"])])
    with pytest.raises(ConfigError) as exc:
        parse(base, d)
    assert exc.value.key == "targets[1].name" and "'api'" in exc.value.message


def test_duplicate_host_named(base: Path) -> None:
    d = doc(targets=[target(), target(name="b", hosts=["API.example:443"])])
    assert error_key(base, d) == "targets[1].hosts"


def test_target_shape_errors(base: Path) -> None:
    assert error_key(base, doc(targets=[target(name="")])) == "targets[0].name"
    assert error_key(base, doc(targets=[target(protocol="ftp")])) == "targets[0].protocol"
    assert error_key(base, doc(targets=[target(hosts="api.example")])) == "targets[0].hosts"
    assert error_key(base, doc(targets=[target(hosts=[])])) == "targets[0].hosts"
    assert error_key(base, doc(targets=[target(listen="127.0.0.1:9443")])) == (
        "targets[0].upstream")
    assert error_key(base, doc(targets=[target(upstream="ftp://x")])) == "targets[0].upstream"
    assert error_key(base, doc(targets=[target(database="x")])) == "targets[0].database"
    assert error_key(base, doc(targets=[target(tls={"verify": "no"})])) == (
        "targets[0].tls.verify")
    assert error_key(base, doc(targets=[target(tls={"ca_file": "nope.pem"})])) == (
        "targets[0].tls.ca_file")
    assert error_key(base, doc(targets="api")) == "targets"


def test_reverse_target(base: Path) -> None:
    cfg = parse(base, doc(targets=[target(hosts=[], listen="127.0.0.1:9443",
                                          upstream="https://api.example:8443/")]))
    t = cfg.targets[0]
    assert t.listen == ("127.0.0.1", 9443) and t.upstream == "https://api.example:8443"


def test_postgres_targets(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pg = {"name": "orders", "protocol": "postgres",
          "upstream": {"host": "127.0.0.1", "dbname": "orders", "user": "gw",
                       "password_env": "CFG_TOKEN"}}
    assert error_key(base, doc(targets=[pg])) == "listen.postgres"
    d = doc(targets=[pg])
    d["listen"]["postgres"] = "127.0.0.1:5433"
    cfg = parse(base, d)
    t = cfg.targets[0]
    assert t.database == "orders"
    assert isinstance(t.upstream, PostgresUpstream) and t.upstream.port == 5432
    assert t.upstream.sslmode == "prefer" and cfg.postgres_tls == "prefer"
    assert SECRET in cfg.secrets()
    d["targets"] = [{**pg, "upstream": {**pg["upstream"], "sslmode": "sometimes"}}]
    assert error_key(base, d) == "targets[0].upstream.sslmode"
    d["targets"] = [{**pg, "upstream": {"host": "127.0.0.1", "dbname": "orders"}}]
    assert error_key(base, d) == "targets[0].upstream.user"
    d["targets"] = [pg, {**pg, "name": "orders2", "database": "orders"}]
    assert error_key(base, d) == "targets[1].database"
    d["targets"] = [pg]
    d["listen"]["postgres_tls"] = "always"
    assert error_key(base, d) == "listen.postgres_tls"


# --- identity ------------------------------------------------------------------------------------


def issuer(**kw: Any) -> dict[str, Any]:
    i: dict[str, Any] = {"issuer": "https://login.example/", "audience": "portcullis"}
    i.update(kw)
    return i


def test_issuer_errors(base: Path) -> None:
    def key_for(**kw: Any) -> str:
        return error_key(base, doc(identity={"issuers": [issuer(**kw)]}))

    assert key_for(issuer=None) == "identity.issuers[0].issuer"
    assert key_for(audience="") == "identity.issuers[0].audience"
    assert key_for(algorithms=["none"]) == "identity.issuers[0].algorithms"
    assert key_for(algorithms=["RS256", "NONE"]) == "identity.issuers[0].algorithms"
    assert key_for(algorithms=["RS1"]) == "identity.issuers[0].algorithms"
    assert key_for(algorithms=[]) == "identity.issuers[0].algorithms"
    assert key_for(algorithms=["HS256"]) == "identity.issuers[0].algorithms"
    assert key_for(jwks_uri="file:///etc/passwd") == "identity.issuers[0].jwks_uri"
    assert key_for(jwks_file="missing.json") == "identity.issuers[0].jwks_file"
    assert key_for(leeway_seconds=-1) == "identity.issuers[0].leeway_seconds"
    assert key_for(leeway_seconds=True) == "identity.issuers[0].leeway_seconds"
    assert key_for(secret_env="CFG_MISSING") == "identity.issuers[0].secret_env"


def test_nobody_could_authenticate(base: Path) -> None:
    assert error_key(base, doc(identity={})) == "identity.issuers"
    assert error_key(base, doc(identity={"dev_issuer": "yes"})) == "identity.dev_issuer"
    assert error_key(base, doc(identity={"issuers": {"issuer": "x"}})) == "identity.issuers"


def test_duplicate_issuer_refused(base: Path) -> None:
    d = doc(identity={"issuers": [issuer(), issuer(audience="other")]})
    assert error_key(base, d) == "identity.issuers[1].issuer"


def test_issuer_defaults_and_options(base: Path) -> None:
    (base / "jwks.json").write_text('{"keys": []}')
    cfg = parse(base, doc(identity={"issuers": [
        issuer(),
        issuer(issuer="https://other.example", jwks_file="jwks.json", algorithms=["HS256"],
               secret_env="CFG_TOKEN", groups_claim="roles", leeway_seconds=0),
    ]}))
    first, second = cfg.identity.issuers
    assert first.algorithms == DEFAULT_ALGORITHMS == ("RS256", "ES256", "EdDSA")
    assert (first.groups_claim, first.leeway_seconds, first.jwks_uri) == ("groups", 30, None)
    assert first.issuer == "https://login.example/"  # exact, trailing slash kept
    assert second.jwks_file == base / "jwks.json"
    assert second.secret is not None and second.secret.reveal() == SECRET
    assert (second.groups_claim, second.leeway_seconds) == ("roles", 0)
    assert cfg.identity.dev_issuer is False and cfg.identity.max_token_bytes == 8192


def test_identity_limits_validated(base: Path) -> None:
    assert error_key(base, doc(identity={"dev_issuer": True, "max_token_bytes": "big"})) == (
        "identity.max_token_bytes")
    assert error_key(base, doc(identity={"dev_issuer": True, "max_token_bytes": 0})) == (
        "identity.max_token_bytes")
    cfg = parse(base, doc(identity={"dev_issuer": True, "max_token_bytes": 4096}))
    assert cfg.identity.max_token_bytes == 4096


# --- everything else ---------------------------------------------------------------------------


def test_defaults(base: Path) -> None:
    cfg = parse(base, {"identity": {"dev_issuer": True}})
    assert cfg.state_dir == base / ".portcullis"
    assert cfg.policies == base / "policies"
    assert (cfg.listen_proxy, cfg.listen_postgres, cfg.listen_admin) == (None, None, None)
    assert cfg.audit_file == base / ".portcullis" / "audit.jsonl"
    assert cfg.recordings_dir == base / ".portcullis" / "recordings"
    assert cfg.audit_fsync is False
    assert cfg.approvals.timeout_seconds == 300
    assert cfg.approvals.approver_groups == ("approvers",)
    assert cfg.approvals.webhook_url is None
    assert cfg.max_body_bytes == 8 * 1024 * 1024
    assert cfg.targets == ()


def test_paths_resolve_against_config_dir(base: Path, tmp_path: Path) -> None:
    (base / "ca.pem").write_text("x")
    cfg = parse(base, doc(state_dir="state", policies="policies",
                          audit={"file": "logs/a.jsonl", "recordings": "/abs/rec", "fsync": True},
                          targets=[target(tls={"ca_file": "ca.pem"})]))
    assert cfg.state_dir == base / "state"
    assert cfg.audit_file == base / "state" / "logs" / "a.jsonl"
    assert cfg.recordings_dir == Path("/abs/rec")
    assert cfg.audit_fsync is True
    assert cfg.targets[0].tls.ca_file == base / "ca.pem"
    assert cfg.targets[0].tls.verify is True


def test_other_sections_validated(base: Path) -> None:
    assert error_key(base, doc(policies="no-such-dir")) == "policies"
    assert error_key(base, doc(approvals={"timeout_seconds": 0})) == "approvals.timeout_seconds"
    assert error_key(base, doc(approvals={"approver_groups": "ops"})) == (
        "approvals.approver_groups")
    assert error_key(base, doc(audit={"fsync": "no"})) == "audit.fsync"
    assert error_key(base, doc(audit={"file": 7})) == "audit.file"
    assert error_key(base, doc(limits={"max_body_bytes": "lots"})) == "limits.max_body_bytes"
    assert error_key(base, doc(listen="127.0.0.1:8080")) == "listen"


def test_load_config_file(base: Path) -> None:
    path = base / "gateway.yaml"
    path.write_text(yaml.safe_dump(doc()))
    cfg = load_config(path)
    assert cfg.listen_proxy == ("127.0.0.1", 8080) and cfg.path == path
    path.write_text("listen: [unclosed\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert exc.value.key == "config" and "invalid YAML" in exc.value.message
    with pytest.raises(ConfigError) as exc:
        load_config(base / "absent.yaml")
    assert exc.value.key == "config"
