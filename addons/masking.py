"""Masking engine (placeholder until the masking issue lands): validates mask rules only."""

from __future__ import annotations

from typing import Any

STRATEGIES = ("redact", "partial", "hash", "null")
DETECTORS = ("credit_card", "email", "ssn", "iban", "phone", "aws_access_key", "jwt",
             "private_key", "ip_address")


def compile_mask(rule: Any) -> Any:
    if rule.strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}")
    for d in rule.detectors:
        if d not in DETECTORS:
            raise ValueError(f"unknown detector {d!r}")
    return rule


def scrub(text: str) -> str:
    return text
