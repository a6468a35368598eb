"""Prometheus metrics shared by both protocol adapters (prometheus-client)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

REGISTRY = CollectorRegistry()
DECISIONS = Counter("portcullis_decisions_total", "Decisions made", ["protocol", "decision"],
                    registry=REGISTRY)
RECORDING_FAILURES = Counter("portcullis_recording_failures_total",
                             "Flows (HTTP, Kubernetes, Postgres segments) that could not be recorded",
                             registry=REGISTRY)
AUDIT_FAILURES = Counter("portcullis_audit_failures_total", "Audit writes that failed",
                         registry=REGISTRY)
POLICY_RELOADS = Counter("portcullis_policy_reloads_total", "Policy reload attempts", ["result"],
                         registry=REGISTRY)
MASKED_VALUES = Counter("portcullis_masked_values_total", "Values masked", ["protocol"],
                        registry=REGISTRY)
DECISION_SECONDS = Histogram("portcullis_decision_seconds", "Time to decide a request",
                             ["protocol"], registry=REGISTRY)
