"""The key manager's Prometheus metrics (docs/observability.md): its counters, and its
certificates read from its database when scraped."""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

from prometheus_client import REGISTRY, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from splitfed.metrics import Live

logger = logging.getLogger(__name__)

CERTIFICATES_ISSUED = Counter(
    "splitfed_keymanager_certificates_issued",
    "Certificates the key manager signed, by role and kind (enroll, renew).",
    ["role", "kind"],
)
CERTIFICATES_REVOKED = Counter(
    "splitfed_keymanager_certificates_revoked",
    "Certificates the key manager revoked.",
)


class CertificateRecord(Protocol):
    identity: str
    role: str
    not_after: float
    revoked_at: float | None


class CertificateSource(Protocol):
    def certificates(self, identity: str = "") -> list[Any]: ...


# The key managers' stores in this process (services/keymanager/authority.py).
CERTIFICATE_SOURCES: Live[CertificateSource] = Live()


class _CertificateGauges(Collector):
    """The key manager's certificates, read from its database when scraped."""

    COUNT = "splitfed_keymanager_certificates"
    COUNT_HELP = "Certificates not yet expired, by role and state (valid, revoked)."
    EXPIRY = "splitfed_keymanager_certificate_expiry_seconds"
    EXPIRY_HELP = (
        "Seconds until the first identity of a role runs out of valid certificates (the "
        "latest unrevoked certificate of each identity counts; renewals push it out)."
    )

    def describe(self) -> list[Metric]:
        return [
            GaugeMetricFamily(self.COUNT, self.COUNT_HELP, labels=["role", "state"]),
            GaugeMetricFamily(self.EXPIRY, self.EXPIRY_HELP, labels=["role"]),
        ]

    def collect(self) -> list[Metric]:
        count, expiry = self.describe()
        counts: dict[tuple[str, str], int] = {}
        latest: dict[tuple[str, str], float] = {}
        now = time.time()
        for source in CERTIFICATE_SOURCES:
            try:
                rows: list[CertificateRecord] = source.certificates()
            except Exception:  # a store closing meanwhile: skip it this time
                logger.debug("[metrics] cannot read certificates", exc_info=True)
                continue
            for row in rows:
                if row.not_after <= now:
                    continue
                state = "valid" if row.revoked_at is None else "revoked"
                counts[row.role, state] = counts.get((row.role, state), 0) + 1
                if state == "valid":
                    key = (row.role, row.identity)
                    latest[key] = max(latest.get(key, row.not_after), row.not_after)
        first: dict[str, float] = {}
        for (role, _), not_after in latest.items():
            first[role] = min(first.get(role, not_after), not_after)
        for (role, state), value in sorted(counts.items()):
            assert isinstance(count, GaugeMetricFamily)
            count.add_metric([role, state], value)
        for role, not_after in sorted(first.items()):
            assert isinstance(expiry, GaugeMetricFamily)
            expiry.add_metric([role], not_after - now)
        return [count, expiry]


REGISTRY.register(_CertificateGauges())
