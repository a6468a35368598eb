"""Portcullis mitmproxy addons, in the order they must run.

targets → identity → policy → approvals → credentials → masking → audit → recorder

Targets runs first so that every refusal, including an authentication failure, is rendered in
the target's own language (a Kubernetes `Status` for Kubernetes targets).
"""

from __future__ import annotations

from typing import Any


def make_addons(runtime: Any) -> list[Any]:
    from addons.approvals import ApprovalsAddon
    from addons.audit import AuditAddon
    from addons.credentials import CredentialsAddon
    from addons.exec_masking import ExecOutputMasking
    from addons.identity import IdentityAddon
    from addons.masking_http import Masking
    from addons.policy import PolicyAddon
    from addons.recorder import Recorder
    from addons.targets import Targets

    chain: list[Any] = [
        Targets(runtime.targets),
        IdentityAddon(runtime.verifier),
        PolicyAddon(runtime.policies),
        ApprovalsAddon(runtime.approvals, runtime.config.approvals.timeout_seconds,
                       runtime.config.approvals.webhook_url),
        CredentialsAddon(runtime.targets),
    ]
    chain.append(Masking(runtime))
    chain.append(ExecOutputMasking(runtime))
    chain.append(AuditAddon(runtime.audit))
    chain.append(getattr(runtime, "recorder", None) or Recorder(runtime.config.recordings_dir))
    return chain
