"""``splitfed status``: one look at a deployment.

For each service given (backbone, aggregator, key manager): whether it answers its
gRPC health check over mutual TLS, and what it says about itself (the backbone's model
and adapter mode, the federation's round, the certificates the key manager issued when
the caller is an admin); this party's own certificate and its expiry; the privacy
spent by the client's training checkpoint; and, from Prometheus endpoints, the live
figures (sessions, rounds, denials, epsilon, certificates close to expiry).
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitfed.tls import TLSConfig
from splitfed.transport import create_channel


@dataclass
class ServiceStatus:
    service: str
    address: str
    health: str = "UNKNOWN"
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.health == "SERVING"


@dataclass
class Report:
    services: list[ServiceStatus] = field(default_factory=list)
    certificate: dict[str, Any] = field(default_factory=dict)
    privacy: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, dict[str, float | str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.services) and not any(
            "error" in v for v in self.metrics.values()
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"ok": self.ok}


def _rpc_error(exc: grpc.RpcError) -> str:
    return f"{exc.code().name}: {exc.details()}"


def check_service(
    service: str,
    address: str,
    tls: TLSConfig,
    server_name: str | None,
    describe: Callable[[grpc.Channel], dict[str, Any]] | None = None,
    timeout_s: float = 5.0,
) -> ServiceStatus:
    status = ServiceStatus(service, address)
    try:
        channel = create_channel(address, tls, server_name=server_name)
    except (OSError, ValueError) as exc:
        status.health, status.details = "UNREACHABLE", {"error": str(exc)}
        return status
    with channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
            status.health = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
        except grpc.RpcError as exc:
            status.health = "UNREACHABLE"
            status.details = {"error": _rpc_error(exc)}
            return status
        if describe is not None:
            try:
                status.details = describe(channel)
            except grpc.RpcError as exc:
                status.details = {"note": _rpc_error(exc)}
    return status


def describe_backbone(channel: grpc.Channel) -> dict[str, Any]:
    from splitfed.v1 import backbone_pb2, backbone_pb2_grpc

    info = (
        backbone_pb2_grpc.BackboneStub(channel)
        .GetModelInfo(backbone_pb2.GetModelInfoRequest(), timeout=5.0)
        .info
    )
    return {
        "model": info.model_id,
        "family": info.family,
        "layers": info.num_layers,
        "adapter_mode": info.adapter_mode,
        "encryption": info.encryption,
    }


def describe_aggregator(federation: str) -> Callable[[grpc.Channel], dict[str, Any]]:
    def describe(channel: grpc.Channel) -> dict[str, Any]:
        from splitfed.v1 import aggregator_pb2, aggregator_pb2_grpc

        if not federation:
            return {}
        plan = (
            aggregator_pb2_grpc.AggregatorStub(channel)
            .GetRoundPlan(aggregator_pb2.GetRoundPlanRequest(federation=federation), timeout=5.0)
            .plan
        )
        return {
            "federation": federation,
            "round": f"{plan.round}/{plan.rounds or '-'}",
            "phase": aggregator_pb2.RoundPhase.Name(plan.phase).removeprefix("ROUND_PHASE_"),
            "global_version": plan.global_version,
            "attempt": plan.attempt,
        }

    return describe


def describe_keymanager(channel: grpc.Channel) -> dict[str, Any]:
    from splitfed.v1 import keys_pb2, keys_pb2_grpc

    records = (
        keys_pb2_grpc.KeyManagerStub(channel)
        .ListCertificates(keys_pb2.ListCertificatesRequest(), timeout=5.0)
        .certificates
    )
    now = time.time()
    live = [r for r in records if not r.revoked and r.not_after > now]
    soonest = min(live, key=lambda r: r.not_after, default=None)
    details: dict[str, Any] = {
        "certificates": len(live),
        "revoked": sum(1 for r in records if r.revoked),
        "expired": sum(1 for r in records if not r.revoked and r.not_after <= now),
    }
    if soonest is not None:
        details["next_expiry"] = f"{soonest.identity} in {_duration(soonest.not_after - now)}"
    return details


def own_certificate(tls: TLSConfig) -> dict[str, Any]:
    """This party's certificate: identity and time to expiry."""
    if tls.insecure:
        return {"note": "plaintext (no certificate)"}
    assert tls.cert_chain is not None
    cert = x509.load_pem_x509_certificates(tls.cert_chain)[0]
    remaining = cert.not_valid_after_utc.timestamp() - time.time()
    names = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    return {
        "identity": str(names[0].value) if names else "",
        "serial": f"{cert.serial_number:x}",
        "expires_in": _duration(remaining) if remaining > 0 else "EXPIRED",
        "expires_in_s": round(remaining),
    }


def privacy_spent(checkpoint: Path | None, settings: Any) -> dict[str, Any]:
    """(epsilon, delta) spent by the training checkpoint's releases, if it perturbs."""
    if checkpoint is None or not (checkpoint / "privacy.json").is_file():
        return {}
    from splitfed.security.perturbation import PrivacyAccountant

    history = json.loads((checkpoint / "privacy.json").read_text())["history"]
    accountant = PrivacyAccountant.for_settings(settings, 1.0)
    accountant.load_history([tuple(entry) for entry in history])
    spent = accountant.spent()
    return {"epsilon": spent.epsilon, "delta": spent.delta, "steps": spent.steps}


# Samples worth a line in the status: metric sample name -> what the status calls it.
WATCHED = {
    "splitfed_backbone_sessions": "sessions",
    "splitfed_aggregator_round": "round",
    "splitfed_aggregator_joined_clients": "joined clients",
    "splitfed_authorization_denials_total": "authorization denials",
    "splitfed_privacy_epsilon": "epsilon",
    "splitfed_keymanager_certificate_expiry_seconds": "certificate expiry (s)",
    "splitfed_rpcs_total": "RPCs",
}


def scrape(url: str, timeout_s: float = 5.0) -> dict[str, float | str]:
    """The watched figures of one Prometheus endpoint (sums over labels; epsilon and
    expiry: the largest and smallest value)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            text = response.read().decode()
    except (OSError, ValueError) as exc:
        return {"error": str(exc)}
    figures: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            label = WATCHED.get(sample.name)
            if label is None:
                continue
            if sample.name.endswith("expiry_seconds"):
                figures[label] = min(figures.get(label, sample.value), sample.value)
            elif sample.name == "splitfed_privacy_epsilon":
                figures[label] = max(figures.get(label, sample.value), sample.value)
            else:
                figures[label] = figures.get(label, 0.0) + sample.value
    return dict(figures)


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds >= 86_400:
        return f"{seconds / 86_400:.1f} d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds // 60} min"
    return f"{seconds} s"


def target(value: str) -> tuple[str, str | None]:
    """``host:port`` or ``name@host:port`` (the name the service's certificate holds)."""
    name, sep, address = value.rpartition("@")
    return (address, name) if sep else (value, None)


def collect(
    tls: TLSConfig,
    *,
    backbones: list[tuple[str, str | None]],
    aggregators: list[tuple[str, str | None]],
    keymanagers: list[tuple[str, str | None]],
    federation: str = "",
    metrics: Sequence[str] = (),
    checkpoint: Path | None = None,
    perturbation: Any = None,
) -> Report:
    report = Report(certificate=own_certificate(tls))
    for address, name in backbones:
        report.services.append(check_service("backbone", address, tls, name, describe_backbone))
    for address, name in aggregators:
        report.services.append(
            check_service("aggregator", address, tls, name, describe_aggregator(federation))
        )
    for address, name in keymanagers:
        report.services.append(check_service("keymanager", address, tls, name, describe_keymanager))
    if perturbation is not None and getattr(perturbation, "enabled", False):
        report.privacy = privacy_spent(checkpoint, perturbation)
    for url in metrics:
        report.metrics[url] = scrape(url)
    return report
