"""Plain-data types shared by every engine and every protocol adapter.

Nothing here imports mitmproxy or asyncio: the HTTP addons and the Postgres gateway
(`proxy_db`) build these values from their own wire formats and hand them to the same
engines (identity, policy, masking, audit).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

EFFECTS = ("allow", "deny", "review")
# Strictness order used to combine operations into one request decision.
STRICTNESS = {"allow": 0, "review": 1, "deny": 2}


class PortcullisError(Exception):
    """An error that carries its wire translation.

    `status` is the HTTP status, `sqlstate` the PostgreSQL SQLSTATE, `error` the short
    machine-readable code that goes into the JSON body (`{"error": ...}`).
    """

    status = 500
    sqlstate = "XX000"
    error = "internal_error"

    def __init__(self, reason: str, **extra: Any) -> None:
        super().__init__(reason)
        self.reason = reason
        self.extra = extra

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.error, "reason": self.reason}
        body.update(self.extra)
        return body


class AuthError(PortcullisError):
    status = 401
    sqlstate = "28P01"
    error = "unauthenticated"


class UnknownTarget(PortcullisError):
    status = 403
    sqlstate = "3D000"
    error = "unknown_target"


class Denied(PortcullisError):
    status = 403
    sqlstate = "42501"
    error = "denied"


class BadRequest(PortcullisError):
    status = 400
    sqlstate = "08P01"
    error = "bad_request"


class ApprovalRequired(PortcullisError):
    status = 403
    sqlstate = "42501"
    error = "approval_required"


class AuditUnavailable(PortcullisError):
    status = 503
    sqlstate = "58030"
    error = "audit_unavailable"


class UpstreamFailure(PortcullisError):
    status = 502
    sqlstate = "08006"
    error = "upstream_failure"


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified caller. `exp` is the token's expiry (epoch seconds) for continuous checks."""

    sub: str
    iss: str
    groups: tuple[str, ...] = ()
    exp: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"sub": self.sub, "iss": self.iss, "groups": list(self.groups)}


@dataclass(frozen=True, slots=True)
class Operation:
    """One thing a request does, as the policy engine sees it.

    protocol: "http" | "kubernetes" | "postgres".
    http: {"method": "GET", "path": "/normalised/path"} (also set for Kubernetes requests).
    kubernetes: {"verb", "group", "version", "resource", "subresource", "namespace", "name",
                 "command"} where command is the exec/attach argv joined by spaces (or None).
                 `resource` is "pods" for the core group, "deployments.apps" style matching is
                 done by the policy engine from group + resource.
    sql: {"kind": "select", "table": "public.users" | None, "columns": [...],
          "functions": [...], "unbounded": bool}
    summary: a short human-readable description; must never contain secrets.
    """

    protocol: str
    target: str
    summary: str
    http: dict[str, Any] | None = None
    kubernetes: dict[str, Any] | None = None
    sql: dict[str, Any] | None = None
    fingerprint: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"protocol": self.protocol, "summary": self.summary}
        for key in ("http", "kubernetes", "sql"):
            val = getattr(self, key)
            if val is not None:
                out[key] = val
        return out


@dataclass(frozen=True, slots=True)
class RuleMatch:
    id: str
    effect: str
    reason: str


@dataclass(frozen=True, slots=True)
class OperationDecision:
    operation: Operation
    effect: str
    matches: tuple[RuleMatch, ...]


@dataclass(frozen=True, slots=True)
class Decision:
    """The decision for a whole request (strictest of its operations)."""

    effect: str
    rule: str  # the rule that produced the effect ("default-deny" when none matched)
    reason: str
    rules: tuple[str, ...]  # every rule that contributed to the effect
    operations: tuple[OperationDecision, ...] = field(default=())

    @property
    def allowed(self) -> bool:
        return self.effect == "allow"
