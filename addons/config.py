"""Gateway configuration (`gateway.yaml`, SPEC §2): parse and validate into frozen plain data.

Every problem raises `ConfigError` naming the key (`targets[1].credentials.token_env`), so the CLI
can stop with exit 2 before anything listens. Secrets are read here from the env vars / files the
config names and are wrapped in `Secret`, whose repr never shows the value.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

PROTOCOLS = ("http", "kubernetes", "postgres")
CREDENTIAL_TYPES = ("bearer", "basic", "header", "none")
DEFAULT_ALGORITHMS = ("RS256", "ES256", "EdDSA")
ALLOWED_ALGORITHMS = {
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
    "HS256", "HS384", "HS512",
}


class ConfigError(ValueError):
    def __init__(self, key: str, message: str, file: str | None = None) -> None:
        self.key = key
        self.message = message
        self.file = file
        super().__init__(f"{file + ': ' if file else ''}{key}: {message}")


class Secret:
    """A secret value that never prints itself."""

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str) -> None:
        self._value = value
        self.source = source

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret(from {self.source})"

    __str__ = __repr__


@dataclass(frozen=True)
class IssuerConfig:
    issuer: str
    audience: str
    jwks_uri: str | None = None
    jwks_file: Path | None = None
    jwks: dict[str, Any] | None = None  # inline key set (the dev issuer)
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    groups_claim: str = "groups"
    leeway_seconds: int = 30
    secret: Secret | None = None  # HS* shared secret (secret_env)


@dataclass(frozen=True)
class IdentityConfig:
    dev_issuer: bool = False
    issuers: tuple[IssuerConfig, ...] = ()
    max_token_bytes: int = 8192


@dataclass(frozen=True)
class Credentials:
    type: str = "none"
    token: Secret | None = None  # bearer
    username: str | None = None  # basic
    password: Secret | None = None  # basic
    header: str | None = None  # header
    value: Secret | None = None  # header

    def secrets(self) -> list[str]:
        return [s.reveal() for s in (self.token, self.password, self.value) if s is not None]


@dataclass(frozen=True)
class TlsSettings:
    verify: bool = True
    ca_file: Path | None = None


@dataclass(frozen=True)
class PostgresUpstream:
    host: str
    port: int
    dbname: str
    user: str
    password: Secret | None = None
    sslmode: str = "prefer"


@dataclass(frozen=True)
class TargetConfig:
    name: str
    protocol: str
    hosts: tuple[tuple[str, int | None], ...] = ()
    listen: tuple[str, int] | None = None
    upstream: Any = None  # str URL for http/kubernetes, PostgresUpstream for postgres
    credentials: Credentials = field(default_factory=Credentials)
    tls: TlsSettings = field(default_factory=TlsSettings)
    database: str | None = None

    @property
    def is_kubernetes(self) -> bool:
        return self.protocol == "kubernetes"


@dataclass(frozen=True)
class ApprovalsConfig:
    timeout_seconds: int = 300
    approver_groups: tuple[str, ...] = ("approvers",)
    webhook_url: str | None = None


@dataclass(frozen=True)
class GatewayConfig:
    path: Path
    state_dir: Path
    listen_proxy: tuple[str, int] | None
    listen_postgres: tuple[str, int] | None
    postgres_tls: str
    listen_admin: tuple[str, int] | None
    identity: IdentityConfig
    policies: Path
    targets: tuple[TargetConfig, ...]
    audit_file: Path
    audit_fsync: bool
    recordings_dir: Path
    approvals: ApprovalsConfig
    max_body_bytes: int = 8 * 1024 * 1024

    def secrets(self) -> list[str]:
        """Every secret value the config resolved (for leak checks in tests and log scrubbing)."""
        out: list[str] = []
        for t in self.targets:
            out += t.credentials.secrets()
            if isinstance(t.upstream, PostgresUpstream) and t.upstream.password:
                out.append(t.upstream.password.reveal())
        return out


TOP_KEYS = {"state_dir", "listen", "identity", "policies", "targets", "audit", "approvals", "limits"}
LISTEN_KEYS = {"proxy", "postgres", "postgres_tls", "admin"}
IDENTITY_KEYS = {"dev_issuer", "issuers", "max_token_bytes"}
ISSUER_KEYS = {"issuer", "audience", "jwks_uri", "jwks_file", "algorithms", "groups_claim",
               "leeway_seconds", "secret_env"}
TARGET_KEYS = {"name", "protocol", "hosts", "listen", "upstream", "credentials", "tls", "database"}
CRED_KEYS = {"type", "token_env", "token_file", "username", "password_env", "password_file",
             "header", "value_env", "value_file"}
TLS_KEYS = {"verify", "ca_file"}
PG_UPSTREAM_KEYS = {"host", "port", "dbname", "user", "password_env", "password_file", "sslmode"}
AUDIT_KEYS = {"file", "recordings", "fsync"}
APPROVAL_KEYS = {"timeout_seconds", "approver_groups", "webhook_url"}
LIMIT_KEYS = {"max_body_bytes"}


class _Ctx:
    def __init__(self, file: str, base: Path, resolve_secrets: bool = True) -> None:
        self.file = file
        self.base = base
        self.resolve_secrets = resolve_secrets

    def err(self, key: str, message: str) -> ConfigError:
        return ConfigError(key, message, self.file)

    def mapping(self, value: Any, key: str, allowed: set[str]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.err(key, "must be a mapping")
        for k in value:
            if k not in allowed:
                raise self.err(f"{key}.{k}" if key else str(k),
                               f"unknown key (allowed: {', '.join(sorted(allowed))})")
        return value

    def path(self, value: Any, key: str) -> Path:
        if not isinstance(value, str) or not value:
            raise self.err(key, "must be a path")
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else self.base / p

    def secret(self, raw: dict[str, Any], key: str, stem: str, required: bool) -> Secret | None:
        env, file = raw.get(f"{stem}_env"), raw.get(f"{stem}_file")
        if env is not None and file is not None:
            raise self.err(f"{key}.{stem}_env", f"give {stem}_env or {stem}_file, not both")
        if not self.resolve_secrets and (env is not None or file is not None):
            # Tools that never talk upstream (token, audit, policy) need not see secrets.
            return Secret("", f"${env}" if env is not None else str(file))
        if env is not None:
            if not isinstance(env, str) or not env:
                raise self.err(f"{key}.{stem}_env", "must be an environment variable name")
            value = os.environ.get(env)
            if not value:
                raise self.err(f"{key}.{stem}_env", f"environment variable {env} is not set")
            return Secret(value, f"${env}")
        if file is not None:
            path = self.path(file, f"{key}.{stem}_file")
            try:
                value = path.read_text(encoding="utf-8").strip()
            except OSError as e:
                raise self.err(f"{key}.{stem}_file", f"cannot read {path}: {e.strerror}") from e
            if not value:
                raise self.err(f"{key}.{stem}_file", f"{path} is empty")
            return Secret(value, str(path))
        if required:
            raise self.err(f"{key}.{stem}_env", f"{stem}_env or {stem}_file is required")
        return None


def parse_address(value: Any, key: str, ctx: _Ctx | None = None) -> tuple[str, int]:
    def fail(msg: str) -> ConfigError:
        return ctx.err(key, msg) if ctx else ConfigError(key, msg)

    if isinstance(value, int) and not isinstance(value, bool):
        value = f"127.0.0.1:{value}"
    if not isinstance(value, str) or ":" not in value:
        raise fail(f"must be host:port, got {value!r}")
    host, _, port_s = value.rpartition(":")
    host = host.strip("[]")
    if not host:
        raise fail(f"missing host in {value!r}")
    try:
        port = int(port_s)
    except ValueError:
        raise fail(f"bad port in {value!r}") from None
    if not 0 <= port <= 65535:
        raise fail(f"port out of range in {value!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not all(_HOST_LABEL.fullmatch(part) for part in host.split(".")):
            raise fail(f"bad host in {value!r}") from None
    return host, port


_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _positive_int(value: Any, key: str, ctx: _Ctx) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ctx.err(key, f"must be a positive integer, got {value!r}")
    return value


def _parse_host(value: Any, key: str, ctx: _Ctx) -> tuple[str, int | None]:
    if not isinstance(value, str) or not value:
        raise ctx.err(key, "must be host or host:port")
    if value.count(":") == 1 or value.startswith("["):
        host, port = parse_address(value, key, ctx)
        return host.lower(), port
    return value.lower(), None


def _parse_issuer(raw: Any, key: str, ctx: _Ctx) -> IssuerConfig:
    raw = ctx.mapping(raw, key, ISSUER_KEYS)
    for req in ("issuer", "audience"):
        if not isinstance(raw.get(req), str) or not raw[req]:
            raise ctx.err(f"{key}.{req}", "is required")
    algs = raw.get("algorithms", list(DEFAULT_ALGORITHMS))
    if not isinstance(algs, list) or not algs:
        raise ctx.err(f"{key}.algorithms", "must be a non-empty list")
    for a in algs:
        if not isinstance(a, str) or a.lower() == "none":
            raise ctx.err(f"{key}.algorithms", "'none' is never accepted")
        if a not in ALLOWED_ALGORITHMS:
            raise ctx.err(f"{key}.algorithms", f"unknown algorithm {a!r}")
    secret = ctx.secret(raw, key, "secret", required=False)
    if any(a.startswith("HS") for a in algs) and secret is None:
        raise ctx.err(f"{key}.algorithms", "HS* algorithms need secret_env")
    jwks_file = ctx.path(raw["jwks_file"], f"{key}.jwks_file") if "jwks_file" in raw else None
    if ctx.resolve_secrets and jwks_file is not None and not jwks_file.is_file():
        raise ctx.err(f"{key}.jwks_file", f"{jwks_file} does not exist")
    jwks_uri = raw.get("jwks_uri")
    if jwks_uri is not None and urlsplit(str(jwks_uri)).scheme not in ("http", "https"):
        raise ctx.err(f"{key}.jwks_uri", "must be an http(s) URL")
    leeway = raw.get("leeway_seconds", 30)
    if not isinstance(leeway, int) or isinstance(leeway, bool) or not 0 <= leeway <= 300:
        raise ctx.err(f"{key}.leeway_seconds", "must be an integer between 0 and 300")
    return IssuerConfig(
        issuer=raw["issuer"], audience=raw["audience"], jwks_uri=jwks_uri, jwks_file=jwks_file,
        algorithms=tuple(algs), groups_claim=str(raw.get("groups_claim", "groups")),
        leeway_seconds=leeway, secret=secret,
    )


def _parse_credentials(raw: Any, key: str, ctx: _Ctx) -> Credentials:
    raw = ctx.mapping(raw, key, CRED_KEYS)
    ctype = raw.get("type", "none")
    if ctype not in CREDENTIAL_TYPES:
        raise ctx.err(f"{key}.type", f"must be one of {', '.join(CREDENTIAL_TYPES)}")
    if ctype == "bearer":
        return Credentials("bearer", token=ctx.secret(raw, key, "token", True))
    if ctype == "basic":
        if not isinstance(raw.get("username"), str):
            raise ctx.err(f"{key}.username", "is required for basic credentials")
        return Credentials("basic", username=raw["username"],
                           password=ctx.secret(raw, key, "password", True))
    if ctype == "header":
        header = raw.get("header")
        if not isinstance(header, str) or not header.replace("-", "").isalnum():
            raise ctx.err(f"{key}.header", "must be a header name")
        return Credentials("header", header=header, value=ctx.secret(raw, key, "value", True))
    return Credentials("none")


def _parse_target(raw: Any, i: int, ctx: _Ctx) -> TargetConfig:
    key = f"targets[{i}]"
    raw = ctx.mapping(raw, key, TARGET_KEYS)
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ctx.err(f"{key}.name", "is required")
    protocol = raw.get("protocol")
    if protocol not in PROTOCOLS:
        raise ctx.err(f"{key}.protocol", f"must be one of {', '.join(PROTOCOLS)}")
    hosts_raw = raw.get("hosts", [])
    if not isinstance(hosts_raw, list):
        raise ctx.err(f"{key}.hosts", "must be a list")
    hosts = tuple(_parse_host(h, f"{key}.hosts[{j}]", ctx) for j, h in enumerate(hosts_raw))
    listen = parse_address(raw["listen"], f"{key}.listen", ctx) if raw.get("listen") else None
    tls_raw = ctx.mapping(raw.get("tls"), f"{key}.tls", TLS_KEYS)
    verify = tls_raw.get("verify", True)
    if not isinstance(verify, bool):
        raise ctx.err(f"{key}.tls.verify", "must be true or false")
    ca_file = None
    if tls_raw.get("ca_file"):
        ca_file = ctx.path(tls_raw["ca_file"], f"{key}.tls.ca_file")
        if ctx.resolve_secrets and not ca_file.is_file():
            raise ctx.err(f"{key}.tls.ca_file", f"{ca_file} does not exist")
    tls = TlsSettings(verify=verify, ca_file=ca_file)
    credentials = _parse_credentials(raw.get("credentials"), f"{key}.credentials", ctx)
    upstream: Any = raw.get("upstream")
    database = raw.get("database")
    if protocol == "postgres":
        up = ctx.mapping(upstream, f"{key}.upstream", PG_UPSTREAM_KEYS)
        if not up:
            raise ctx.err(f"{key}.upstream", "is required for postgres targets")
        for req in ("host", "dbname", "user"):
            if not isinstance(up.get(req), str) or not up[req]:
                raise ctx.err(f"{key}.upstream.{req}", "is required")
        port = up.get("port", 5432)
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ctx.err(f"{key}.upstream.port", "must be a port number")
        sslmode = up.get("sslmode", "prefer")
        if sslmode not in ("disable", "prefer", "require", "verify-ca", "verify-full"):
            raise ctx.err(f"{key}.upstream.sslmode", "must be disable|prefer|require|verify-ca|"
                          "verify-full")
        upstream = PostgresUpstream(
            host=up["host"], port=port, dbname=up["dbname"], user=up["user"],
            password=ctx.secret(up, f"{key}.upstream", "password", required=False),
            sslmode=sslmode)
        if not isinstance(database, str) or not database:
            database = name
    else:
        if database is not None:
            raise ctx.err(f"{key}.database", "only for postgres targets")
        if upstream is not None:
            parts = urlsplit(str(upstream))
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ctx.err(f"{key}.upstream", "must be an http(s) URL")
            upstream = str(upstream).rstrip("/")
        if listen and not upstream:
            raise ctx.err(f"{key}.upstream", "is required with listen")
        if not hosts and not listen:
            raise ctx.err(f"{key}.hosts", "give hosts (forward proxy) or listen + upstream")
    return TargetConfig(name=name, protocol=protocol, hosts=hosts, listen=listen,
                        upstream=upstream, credentials=credentials, tls=tls, database=database)


def parse_config(doc: Any, file: str, base: Path, resolve_secrets: bool = True) -> GatewayConfig:
    ctx = _Ctx(file, base, resolve_secrets)
    doc = ctx.mapping(doc, "", TOP_KEYS)
    state_dir = ctx.path(doc.get("state_dir", ".portcullis"), "state_dir")
    listen = ctx.mapping(doc.get("listen"), "listen", LISTEN_KEYS)
    addr = {}
    for k in ("proxy", "postgres", "admin"):
        addr[k] = parse_address(listen[k], f"listen.{k}", ctx) if listen.get(k) else None
    pg_tls = listen.get("postgres_tls", "prefer")
    if pg_tls not in ("prefer", "require"):
        raise ctx.err("listen.postgres_tls", "must be prefer or require")
    ident = ctx.mapping(doc.get("identity"), "identity", IDENTITY_KEYS)
    dev = ident.get("dev_issuer", False)
    if not isinstance(dev, bool):
        raise ctx.err("identity.dev_issuer", "must be true or false")
    issuers_raw = ident.get("issuers") or []
    if not isinstance(issuers_raw, list):
        raise ctx.err("identity.issuers", "must be a list")
    issuers = tuple(_parse_issuer(r, f"identity.issuers[{i}]", ctx)
                    for i, r in enumerate(issuers_raw))
    for i, iss in enumerate(issuers):
        if any(other.issuer == iss.issuer for other in issuers[:i]):
            raise ctx.err(f"identity.issuers[{i}].issuer", f"duplicate issuer {iss.issuer!r}")
    if not issuers and not dev:
        raise ctx.err("identity.issuers", "no issuer configured and dev_issuer is off: nobody "
                      "could authenticate")
    max_tok = _positive_int(ident.get("max_token_bytes", 8192), "identity.max_token_bytes", ctx)
    identity = IdentityConfig(dev_issuer=dev, issuers=issuers, max_token_bytes=max_tok)
    policies = ctx.path(doc.get("policies", "policies"), "policies")
    if not policies.exists():
        raise ctx.err("policies", f"{policies} does not exist")
    targets_raw = doc.get("targets") or []
    if not isinstance(targets_raw, list):
        raise ctx.err("targets", "must be a list")
    targets = tuple(_parse_target(r, i, ctx) for i, r in enumerate(targets_raw))
    seen: dict[str, int] = {}
    claimed: dict[tuple[str, int | None], str] = {}
    dbs: dict[str, str] = {}
    for i, t in enumerate(targets):
        if t.name in seen:
            raise ctx.err(f"targets[{i}].name", f"duplicate target name {t.name!r}")
        seen[t.name] = i
        for h in t.hosts:
            if h in claimed:
                raise ctx.err(f"targets[{i}].hosts", f"{h[0]}:{h[1]} already belongs to "
                              f"{claimed[h]}")
            claimed[h] = t.name
        if t.database:
            if t.database in dbs:
                raise ctx.err(f"targets[{i}].database", f"database {t.database!r} already "
                              f"belongs to {dbs[t.database]}")
            dbs[t.database] = t.name
    if dbs and addr["postgres"] is None:
        raise ctx.err("listen.postgres", "postgres targets need listen.postgres")
    # Two listeners on one port would fail to bind after others started: refuse up front.
    bound: list[tuple[tuple[str, int], str]] = []
    listeners = [(f"listen.{k}", addr[k]) for k in ("proxy", "postgres", "admin")] + [
        (f"targets[{i}].listen", t.listen) for i, t in enumerate(targets)]
    for key, a in listeners:
        if a is None:
            continue
        for (host, port), other in bound:
            if port == a[1] and (host == a[0] or {host, a[0]} & {"0.0.0.0", "::"}):
                raise ctx.err(key, f"{a[0]}:{a[1]} is already used by {other}")
        bound.append((a, key))
    audit = ctx.mapping(doc.get("audit"), "audit", AUDIT_KEYS)
    for k in ("file", "recordings"):
        if k in audit and (not isinstance(audit[k], str) or not audit[k]):
            raise ctx.err(f"audit.{k}", "must be a path")
    if not isinstance(audit.get("fsync", False), bool):
        raise ctx.err("audit.fsync", "must be true or false")
    audit_file = Path(audit.get("file", "audit.jsonl"))
    audit_file = audit_file if audit_file.is_absolute() else state_dir / audit_file
    rec = Path(audit.get("recordings", "recordings"))
    rec = rec if rec.is_absolute() else state_dir / rec
    appr = ctx.mapping(doc.get("approvals"), "approvals", APPROVAL_KEYS)
    timeout = appr.get("timeout_seconds", 300)
    if not isinstance(timeout, int) or timeout <= 0:
        raise ctx.err("approvals.timeout_seconds", "must be a positive integer")
    groups = appr.get("approver_groups", ["approvers"])
    if not isinstance(groups, list):
        raise ctx.err("approvals.approver_groups", "must be a list")
    limits = ctx.mapping(doc.get("limits"), "limits", LIMIT_KEYS)
    max_body = _positive_int(limits.get("max_body_bytes", 8 * 1024 * 1024),
                             "limits.max_body_bytes", ctx)
    return GatewayConfig(
        path=Path(file), state_dir=state_dir, listen_proxy=addr["proxy"],
        listen_postgres=addr["postgres"], postgres_tls=pg_tls, listen_admin=addr["admin"],
        identity=identity, policies=policies, targets=targets, audit_file=audit_file,
        audit_fsync=bool(audit.get("fsync", False)), recordings_dir=rec,
        approvals=ApprovalsConfig(timeout, tuple(groups), appr.get("webhook_url")),
        max_body_bytes=max_body,
    )


def load_config(path: str | Path, resolve_secrets: bool = True) -> GatewayConfig:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError("config", f"cannot read {p}: {e.strerror}", str(p)) from e
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError("config", f"invalid YAML: {e}", str(p)) from e
    return parse_config(doc, str(p), p.resolve().parent, resolve_secrets)
