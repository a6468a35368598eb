"""Helpers for byte-transcript tests of the sans-IO session: build a session with real engines
(policy, audit, classifier), walk it through startup, and decode what it sends."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from addons.audit import AuditLog
from addons.model import Identity
from addons.policy import load_policies
from proxy_db import backend as be
from proxy_db import messages as fe
from proxy_db.framing import MessageFramer
from proxy_db.session import ConnectUpstream, Env, Session, VerifyToken

TARGET_POLICY = """
rules:
  - id: readers-select
    effect: allow
    reason: agents may read
    when: {sql: {statements: [select, show, transaction, set]}}
  - id: writers-insert
    effect: allow
    reason: agents may insert into audit_trail
    when: {sql: {statements: [insert], tables: [public.audit_trail]}}
  - id: never-drop
    effect: deny
    reason: no schema changes by agents
    when: {sql: {statements: [drop, truncate, create, alter]}}
  - id: no-unbounded-delete
    effect: deny
    reason: DELETE needs a WHERE clause
    when: {sql: {statements: [delete], unbounded: true}}
  - id: review-delete
    effect: review
    reason: deletes need a human
    when: {sql: {statements: [delete]}}
"""


@dataclass
class PolicyHolder:
    current: Any


@dataclass
class Target:
    name: str = "orders-db"
    protocol: str = "postgres"
    database: str = "orders"


@dataclass
class Targets:
    targets: dict[str, Target] = field(default_factory=lambda: {"orders": Target()})

    def by_database(self, name: str) -> Target | None:
        return self.targets.get(name)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def make_env(tmp_path: Path, policy_text: str = TARGET_POLICY, **kw: Any) -> Env:
    pdir = tmp_path / "policies"
    pdir.mkdir(exist_ok=True)
    (pdir / "p.yaml").write_text(policy_text)
    audit = AuditLog(tmp_path / "audit.jsonl")
    return Env(policies=PolicyHolder(load_policies(pdir)), audit=audit, targets=Targets(), **kw)


IDENTITY = Identity(sub="agent-7", iss="urn:test", groups=("readers",), exp=4_000_000_000.0)
UPSTREAM_PARAMS = [("client_encoding", "UTF8"), ("standard_conforming_strings", "on"),
                   ("server_version", "15.0")]


def startup(user: str = "agent", database: str = "orders", **params: str) -> bytes:
    return fe.StartupMessage(fe.PROTOCOL_3_0, (("user", user), ("database", database),
                                               *params.items())).encode()


def password(token: str) -> bytes:
    return fe.PasswordMessage(token.encode() + b"\0").encode()


def decode_all(data: bytes) -> list[Any]:
    """Backend messages in `data` (single-byte SSL answers are returned as bytes)."""
    out: list[Any] = []
    if data in (b"S", b"N"):
        return [data]
    framer = MessageFramer(1 << 30)
    for t, raw in framer.feed(data):
        out.append(be.decode_backend(t, raw[5:]))
    assert framer.pending == 0, "trailing partial message"
    return out


def decode_frontend(data: bytes) -> list[Any]:
    framer = MessageFramer(1 << 30)
    out = []
    for t, raw in framer.feed(data):
        out.append(fe.FRONTEND[t].decode(raw[5:]))
    assert framer.pending == 0
    return out


def ready_session(tmp_path: Path, identity: Identity = IDENTITY, **env_kw: Any
                  ) -> tuple[Session, Env]:
    """A session in READY state (upstream login simulated)."""
    policy_text = env_kw.pop("policy_text", TARGET_POLICY)
    env = make_env(tmp_path, policy_text, **env_kw)
    s = Session(env, client="127.0.0.1:5555")
    s.client_data(startup())
    c, u, a = s.take()
    assert isinstance(decode_all(c)[-1], be.AuthenticationCleartextPassword)
    s.client_data(password("tok"))
    _, _, a = s.take()
    assert isinstance(a[0], VerifyToken)
    s.token_verified(identity)
    _, _, a = s.take()
    assert isinstance(a[0], ConnectUpstream)
    s.upstream_connected(UPSTREAM_PARAMS, b"I", (4242, 99))
    c, u, a = s.take()
    msgs = decode_all(c)
    assert isinstance(msgs[0], be.AuthenticationOk) and isinstance(msgs[-1], be.ReadyForQuery)
    return s, env


def audit_lines(env: Env) -> list[dict[str, Any]]:
    import json

    return [json.loads(line) for line in Path(env.audit.path).read_text().splitlines()]


# Upstream answer builders
def rows_answer(*rows: tuple[str, ...], tag: str | None = None, status: bytes = b"I",
                fields: tuple[str, ...] = ("x",)) -> bytes:
    rd = be.RowDescription(tuple(be.FieldDescription(n) for n in fields))
    out = [rd.encode()]
    out += [be.DataRow(tuple(v.encode() for v in r)).encode() for r in rows]
    out.append(be.CommandComplete(tag or f"SELECT {len(rows)}").encode())
    out.append(be.ReadyForQuery(status).encode())
    return b"".join(out)


def upstream_error(sqlstate: str = "42601", message: str = "syntax error") -> bytes:
    return be.ErrorResponse.make("ERROR", sqlstate, message).encode()


def now() -> float:
    return time.time()
