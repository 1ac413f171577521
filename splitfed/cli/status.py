"""``splitfed status``: one look at a deployment.

For each service given (backbone, aggregator, key manager): whether it answers its
gRPC health check over mutual TLS, and what it says about itself (the backbone's model
and adapter mode, the federation's round, the certificates the key manager issued when
the caller is an admin, else whether the caller's certificate is revoked); this party's
own certificate and its expiry; the privacy spent by the client's training checkpoint;
and, from Prometheus endpoints, the live figures (sessions, rounds, denials, epsilon,
certificates close to expiry).

Status asks a service only what the caller's role (in its certificate) may ask, by the
service's own authorization table (its servicer's ``POLICY``): a refused call would be
logged and counted as an authorization denial, which feeds the deployment's alert. A
service that does not answer shows why in one line (:mod:`splitfed.failures`).

``splitfed health``, the probe a pod runs on itself, lives here too. The transport and
the privacy accountant import torch: they are imported where used (see
splitfed/cli/__init__.py), and the probe never needs them.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import grpc
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from splitfed.cli.options import (
    config_option,
    config_overrides,
    fail,
    file_option,
    tls_dir_option,
    tls_from_options,
    tls_options,
)
from splitfed.security.identity import Identity, identity_from_uri
from splitfed.tls import TLSConfig
from splitfed.v1 import (
    aggregator_pb2,
    aggregator_pb2_grpc,
    backbone_pb2,
    backbone_pb2_grpc,
    keys_pb2,
    keys_pb2_grpc,
)


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


# What status asks a service beyond its health (where the caller's role may).
Describe = Callable[[grpc.Channel], dict[str, Any]]


def _policies() -> dict[str, Any]:
    """The authorization table of each service, by the name status gives the service."""
    from splitfed.services.aggregator.servicer import POLICY as AGGREGATOR
    from splitfed.services.backbone.servicer import POLICY as BACKBONE
    from splitfed.services.keymanager.servicer import POLICY as KEYMANAGER

    return {"backbone": BACKBONE, "aggregator": AGGREGATOR, "keymanager": KEYMANAGER}


def may_call(service: str, method: str, role: str | None) -> bool:
    """Whether a caller in ``role`` may call ``method`` of ``service`` (no role: plaintext,
    where nothing is checked)."""
    if role is None:
        return True
    return role in _policies()[service].get(method, frozenset())


def _health_of(failure: Exception | None) -> str:
    """What the health column says of a service whose health check failed."""
    from splitfed.errors import UnauthenticatedError
    from splitfed.failures import ConnectionFailedError

    if isinstance(failure, UnauthenticatedError):
        return "REVOKED"
    if isinstance(failure, ConnectionFailedError) and not failure.cause.retryable:
        return "TLS FAILED"
    return "UNREACHABLE"


def check_service(
    service: str,
    address: str,
    tls: TLSConfig,
    server_name: str | None,
    describe: Describe | None = None,
    timeout_s: float = 5.0,
) -> ServiceStatus:
    from splitfed.failures import Endpoint, call_failure
    from splitfed.transport import create_channel

    status = ServiceStatus(service, address)
    what = "key manager" if service == "keymanager" else service
    endpoint = Endpoint(what, address, server_name, tls.source_dir)
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
            failure = call_failure(exc, endpoint)
            status.health = _health_of(failure)
            status.details = {"error": str(failure) if failure else _rpc_error(exc)}
            return status
        if describe is not None:
            try:
                status.details = describe(channel)
            except grpc.RpcError as exc:
                status.details = {"note": _rpc_error(exc)}
    return status


def describe_backbone(channel: grpc.Channel) -> dict[str, Any]:
    info = (
        backbone_pb2_grpc.BackboneStub(channel)
        .GetModelInfo(backbone_pb2.GetModelInfoRequest(), timeout=5.0)
        .info
    )
    return {
        "model": info.model_id,
        "family": info.family,
        "layers": info.num_layers,
        # A backbone older than the field says nothing: its body is not quantized.
        "quantization": info.quantization or "none",
        "adapter_mode": info.adapter_mode,
        "encryption": info.encryption,
    }


def describe_aggregator(federation: str) -> Callable[[grpc.Channel], dict[str, Any]]:
    def describe(channel: grpc.Channel) -> dict[str, Any]:
        if not federation:
            return {}
        plan = (
            aggregator_pb2_grpc.AggregatorStub(channel)
            .GetRoundPlan(aggregator_pb2.GetRoundPlanRequest(federation=federation), timeout=5.0)
            .plan
        )
        return {
            "federation": federation,
            "round": round_text(plan),
            "phase": aggregator_pb2.RoundPhase.Name(plan.phase).removeprefix("ROUND_PHASE_"),
            "global_version": plan.global_version,
            "attempt": plan.attempt,
            "privacy": federation_privacy(plan),
        }

    return describe


def round_text(plan: aggregator_pb2.RoundPlan) -> str:
    """The round column: "2/5" while a federation runs, "finished: 5/5 rounds" once it
    is done (its round number is then one past the last)."""
    if plan.phase == aggregator_pb2.ROUND_PHASE_FINISHED and plan.rounds:
        return f"finished: {plan.rounds}/{plan.rounds} rounds"
    return f"{plan.round}/{plan.rounds or '-'}"


def federation_privacy(plan: aggregator_pb2.RoundPlan) -> str:
    """What a federation's closed rounds have spent of client-level differential privacy
    (DP-FedAvg), or "not private" when it does not use it."""
    if plan.dp_clip_norm <= 0:
        return "not private"
    return (
        f"dp_fedavg epsilon {plan.dp_epsilon:.4g} at delta {plan.dp_delta:g} "
        f"(sigma {plan.dp_noise_multiplier:g}, clip {plan.dp_clip_norm:g})"
    )


def describe_keymanager(channel: grpc.Channel) -> dict[str, Any]:
    """What the key manager tells an admin: the certificates it issued."""
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


def describe_own_revocation(serial: str) -> Describe:
    """What the key manager tells any party: whether its own certificate is revoked."""

    def describe(channel: grpc.Channel) -> dict[str, Any]:
        revoked = (
            keys_pb2_grpc.KeyManagerStub(channel)
            .GetRevocations(keys_pb2.GetRevocationsRequest(), timeout=5.0)
            .revoked
        )
        mine = any(r.serial == serial for r in revoked)
        return {"this certificate": "REVOKED" if mine else "not revoked"}

    return describe


def own_identity(tls: TLSConfig) -> Identity | None:
    """The identity and role in this party's certificate (``None``: plaintext, or a
    certificate without a splitfed identity)."""
    if tls.insecure or tls.cert_chain is None:
        return None
    cert = x509.load_pem_x509_certificates(tls.cert_chain)[0]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        identity = identity_from_uri(uri)
        if identity is not None:
            return identity
    return None


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
    """(epsilon, delta) spent by the client's releases (its checkpoint's privacy ledger),
    with the releases by kind: covered (noised, accounted) and sent in the clear."""
    if checkpoint is None:
        return {}
    from splitfed.security.releases import load_summary

    return load_summary(checkpoint, settings)


# What calls of each kind are called in the status line (one, several).
CALLS = {
    "training": ("step", "steps"),
    "evaluation": ("pass", "passes"),
    "generation": ("call", "calls"),
}


def _calls(kind: str, count: int) -> str:
    one, several = CALLS[kind]
    return f"{count} {one if count == 1 else several}"


def privacy_line(privacy: dict[str, Any]) -> str:
    """The status line of a privacy summary: epsilon, the releases it covers by kind, and
    the kinds sent without noise, which it does not cover."""
    line = (
        f"privacy spent: epsilon {privacy['epsilon']:.4g} at delta {privacy['delta']} "
        f"over {privacy['steps']} releases"
    )
    releases: dict[str, dict[str, int]] = privacy.get("releases", {})
    covered = []
    for kind, counts in releases.items():
        if counts.get("protected"):
            part = f"{kind} {counts['protected']}"
            if counts["protected"] != counts.get("protected_calls", counts["protected"]):
                part += f" in {_calls(kind, counts['protected_calls'])}"
            covered.append(part)
    if covered:
        line += " (" + ", ".join(covered) + ")"
    for kind, counts in releases.items():
        if counts.get("clear"):
            calls = counts.get("clear_calls", counts["clear"])
            line += f"; {kind}: {_calls(kind, calls)} sent without noise (not covered)"
    return line


# Samples worth a line in the status: metric sample name -> what the status calls it.
WATCHED = {
    "splitfed_backbone_sessions": "sessions",
    "splitfed_aggregator_round": "round",
    "splitfed_aggregator_joined_clients": "joined clients",
    "splitfed_authorization_denials_total": "authorization denials",
    "splitfed_privacy_epsilon": "epsilon",
    "splitfed_federation_epsilon": "federation epsilon",
    "splitfed_keymanager_certificate_expiry_seconds": "certificate expiry (s)",
    "splitfed_rpcs_total": "RPCs",
}


def scrape(url: str, timeout_s: float = 5.0) -> dict[str, float | str]:
    """The watched figures of one Prometheus endpoint (sums over labels; epsilon and
    expiry: the largest and smallest value)."""
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
            elif sample.name in ("splitfed_privacy_epsilon", "splitfed_federation_epsilon"):
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
    identity = own_identity(tls)
    role = identity.role if identity is not None else None
    if identity is None and not tls.insecure:
        role = ""  # a certificate without a splitfed identity may call nothing
    if role is not None:
        report.certificate["role"] = role or "none"

    def asked(service: str, method: str, describe: Describe) -> Describe | None:
        return describe if may_call(service, method, role) else None

    for address, name in backbones:
        describe = asked("backbone", "GetModelInfo", describe_backbone)
        report.services.append(check_service("backbone", address, tls, name, describe))
    for address, name in aggregators:
        describe = asked("aggregator", "GetRoundPlan", describe_aggregator(federation))
        report.services.append(check_service("aggregator", address, tls, name, describe))
    serial = report.certificate.get("serial", "")
    for address, name in keymanagers:
        describe = asked("keymanager", "ListCertificates", describe_keymanager) or asked(
            "keymanager", "GetRevocations", describe_own_revocation(serial)
        )
        report.services.append(check_service("keymanager", address, tls, name, describe))
    if perturbation is not None and getattr(perturbation, "enabled", False):
        report.privacy = privacy_spent(checkpoint, perturbation)
    for url in metrics:
        report.metrics[url] = scrape(url)
    return report


@click.command("status")
@config_option(
    "A client config: its backbone, [federated] aggregator, [security] key manager, "
    "TLS material and checkpoint.",
    required=False,
)
@click.option("--backbone", "backbones", multiple=True, help="[NAME@]HOST:PORT; repeatable.")
@click.option("--aggregator", "aggregators", multiple=True, help="[NAME@]HOST:PORT.")
@click.option("--keymanager", "keymanagers", multiple=True, help="[NAME@]HOST:PORT.")
@click.option("--federation", default="", help="The federation whose round to show.")
@click.option("--metrics", "metrics", multiple=True, help="A Prometheus endpoint URL; repeatable.")
@tls_options
@file_option("--json", "json_path", help="Also as JSON.")
@config_overrides
@click.pass_context
def status_command(
    ctx: click.Context,
    config_path: Path | None,
    backbones: tuple[str, ...],
    aggregators: tuple[str, ...],
    keymanagers: tuple[str, ...],
    federation: str,
    metrics: tuple[str, ...],
    tls_dir: Path | None,
    ca_path: Path | None,
    cert_path: Path | None,
    key_path: Path | None,
    insecure: bool,
    json_path: Path | None,
) -> None:
    """Health, model, rounds, certificates and privacy across a deployment's services.
    Exit 0 when everything answers SERVING, 1 when something does not."""
    try:
        found = {
            "backbone": [target(v) for v in backbones],
            "aggregator": [target(v) for v in aggregators],
            "keymanager": [target(v) for v in keymanagers],
        }
        checkpoint = perturbation = None
        tls = None
        if tls_dir or ca_path or cert_path or key_path or insecure:
            tls = tls_from_options(tls_dir, ca_path, cert_path, key_path, insecure)
        if config_path is not None:
            from splitfed.clients.app import ClientConfig

            config = ClientConfig.load(config_path)
            tls = tls or config.backbone.tls()
            found["backbone"].append((config.backbone.address, config.backbone.server_name))
            if config.federated is not None:
                found["aggregator"].append(
                    (config.federated.aggregator, config.federated.server_name)
                )
                federation = federation or config.federated.federation
            if config.security.keymanager:
                found["keymanager"].append(
                    (config.security.keymanager, config.security.keymanager_server_name)
                )
            checkpoint = config.training.checkpoint_dir
            perturbation = config.training.perturbation
        if tls is None:
            raise ValueError("give --config, or the TLS material (--tls-dir or --ca/--cert/--key)")
        if not any(found.values()) and not metrics:
            raise ValueError("nothing to look at: give --config or a service address")
    except ValueError as exc:
        fail(ctx, exc, usage=True)
        return
    report = collect(
        tls,
        backbones=found["backbone"],
        aggregators=found["aggregator"],
        keymanagers=found["keymanager"],
        federation=federation,
        metrics=list(metrics),
        checkpoint=checkpoint,
        perturbation=perturbation,
    )
    console = Console()
    table = Table("service", "address", "health", "details")
    for service in report.services:
        colour = "green" if service.ok else "red"
        details = ", ".join(f"{k} {v}" for k, v in service.details.items())
        table.add_row(service.service, service.address, f"[{colour}]{service.health}[/]", details)
    console.print(table)
    cert = report.certificate
    if cert:
        console.print(
            "this party: "
            + ", ".join(
                f"{k.replace('_', ' ')} {v}" for k, v in cert.items() if k != "expires_in_s"
            )
        )
    if report.privacy:
        console.print(privacy_line(report.privacy), markup=False)
    for url, figures in report.metrics.items():
        console.print(
            f"{url}: "
            + ", ".join(
                f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()
            )
        )
    if json_path is not None:
        json_path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    if not report.ok:
        ctx.exit(1)


@click.command()
@click.argument("address")
@tls_dir_option
@click.option(
    "--server-name",
    envvar="SPLITFED_HEALTH_SERVER_NAME",
    default=None,
    help="Name the server's certificate carries (default: the host of ADDRESS). "
    "Env: SPLITFED_HEALTH_SERVER_NAME.",
)
@click.option("--service", default="", help="Ask about this service (default: the server).")
@click.option("--timeout", "timeout_s", type=float, default=5.0, show_default=True)
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(min=0),
    default=0.0,
    help="Keep asking for up to this many seconds until the answer is SERVING (for a "
    "service just started in the background).",
)
@click.pass_context
def health(
    ctx: click.Context,
    address: str,
    tls_dir: Path,
    server_name: str | None,
    service: str,
    timeout_s: float,
    wait_s: float,
) -> None:
    """Exit 0 if ADDRESS answers its gRPC health check SERVING over mutual TLS, else 1.

    A probe for Kubernetes (an exec probe: the pod checks itself with its own
    certificate, which the kubelet's grpc probe cannot present). It imports neither
    torch nor the transport module, so it costs a fraction of a second."""
    try:
        tls = TLSConfig.from_dir(tls_dir)
        tls.verify_own_certificate()
    except (OSError, ValueError) as exc:
        fail(ctx, exc, usage=False)
        return
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    deadline = time.monotonic() + wait_s
    with grpc.secure_channel(address, tls.channel_credentials(), options=options) as channel:
        while True:
            try:
                answer = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
                )
            except grpc.RpcError as exc:
                from splitfed.failures import ConnectionFailedError, Endpoint, call_failure

                failure = call_failure(exc, Endpoint("server", address, server_name, tls_dir))
                waiting_helps = failure is None or (
                    isinstance(failure, ConnectionFailedError) and failure.cause.retryable
                )
                if waiting_helps and time.monotonic() < deadline:
                    time.sleep(0.5)
                    continue
                message = str(failure) if failure else f"{exc.code().name}: {exc.details()}"
                fail(ctx, RuntimeError(f"{address}: {message}"), usage=False)
                return
            if answer.status == health_pb2.HealthCheckResponse.SERVING:
                break
            if time.monotonic() >= deadline:
                break
            time.sleep(0.5)
    state = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    click.echo(f"{address}: {state}")
    if answer.status != health_pb2.HealthCheckResponse.SERVING:
        ctx.exit(1)
