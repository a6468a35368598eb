"""Everything a protocol adapter needs, built once from the config. Plain objects, no I/O loop."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from addons.approvals import ApprovalStore
from addons.audit import AuditLog
from addons.config import GatewayConfig
from addons.identity import DevIssuer, Verifier
from addons.policystore import PolicyStore
from addons.recorder import Recorder
from addons.targets import TargetIndex


@dataclass
class Runtime:
    config: GatewayConfig
    verifier: Verifier
    policies: PolicyStore
    audit: AuditLog
    targets: TargetIndex
    mask_key: bytes
    approvals: ApprovalStore
    recorder: Recorder | None = None  # shared by the HTTP addons and the Postgres gateway

    @property
    def ca_cert_path(self) -> Path:
        return self.config.state_dir / "mitmproxy-ca-cert.pem"

    @property
    def ca_key_path(self) -> Path:
        # mitmproxy keeps the CA key and certificate together in this file.
        return self.config.state_dir / "mitmproxy-ca.pem"

    def server_tls_context(self, hostname: str = "localhost") -> ssl.SSLContext:
        """A TLS server context whose certificate is issued by the gateway's CA (Postgres)."""
        from addons.ca import issue_server_context

        return issue_server_context(self.config.state_dir, hostname)


def build_runtime(config: GatewayConfig) -> Runtime:
    """Raises PolicyError / ValueError / OSError for the CLI to turn into exit 2."""
    from addons import masking

    config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    dev_jwks = DevIssuer(config.state_dir).jwks() if config.identity.dev_issuer else None
    verifier = Verifier(config.identity, dev_jwks=dev_jwks)
    store = PolicyStore(config.policies, [t.name for t in config.targets])
    audit = AuditLog(config.audit_file, fsync=config.audit_fsync)
    key_loader = getattr(masking, "load_hash_key", None)
    mask_key = key_loader(config.state_dir) if key_loader else b""
    return Runtime(config=config, verifier=verifier, policies=store, audit=audit,
                   targets=TargetIndex(config), mask_key=mask_key,
                   approvals=ApprovalStore(config.state_dir / "approvals.json"),
                   recorder=Recorder(config.recordings_dir))
