"""Every service's /metrics after a short federated run: counters moved, promtool accepts
the exposition, and JSON logs carry the federation and round.

A key manager, a backbone and an aggregator run as processes (each with its own metrics
endpoint on a free port, JSON logs); the client enrolls with the key manager and trains
one round of two local steps in this process, exposing its own metrics too.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from backbone_kit import SERVER_NAME as BACKBONE_NAME
from backbone_kit import Deployment, deployment
from federated_kit import AGGREGATOR_NAME, federation_schema, split_dataset, write_toml
from helpers import SERVER_NAME, Pki, wait_until
from prometheus_client.parser import text_string_to_metric_families
from security_kit import KEK
from security_kit import SERVER_NAME as KEYMANAGER_NAME

from splitfed.cli.launcher import ServiceProcess
from splitfed.clients.app import ClientConfig, backbone_client, federated_trainer
from splitfed.clients.diagnostics import DiagnosticsClient
from splitfed.clients.keys import KeyManagerClient, enroll
from splitfed.metrics import MetricsServer, serve_metrics
from splitfed.security.ca import CertificateAuthority
from splitfed.services.keymanager.authority import CA_CERT, init_authority
from splitfed.tls import TLSConfig
from splitfed.transport import create_channel

PROMTOOL = shutil.which("promtool")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        return str(response.read().decode())


def samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name, frozenset(sample.labels.items())] = sample.value
    return out


def value(parsed: Samples, name: str, **labels: str) -> float:
    """The sum of the series of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in parsed.items() if n == name and wanted <= ls)


def promtool_check(text: str) -> None:
    if PROMTOOL is None:
        return
    result = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def metrics_address(process: ServiceProcess) -> str:
    lines = [line for line in process.preamble if line.startswith("metrics on ")]
    assert lines, process.preamble
    return lines[0].removeprefix("metrics on ")


class Deployed:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = CertificateAuthority.create("test CA")
        self.processes: list[ServiceProcess] = []
        self.backbone: Deployment | None = None

    def start(self, name: str, args: list[str]) -> ServiceProcess:
        process = ServiceProcess(name, args, log_path=self.root / f"{name}.log")
        self.processes.append(process)
        process.start(timeout_s=120)
        return process

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()


@pytest.fixture
def deployed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Deployed]:
    monkeypatch.setenv("SPLITFED_KEK", KEK)
    monkeypatch.setenv("SPLITFED_LOG_FORMAT", "json")  # the services' logs
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    deployed = Deployed(tmp_path)
    yield deployed
    deployed.stop()


@pytest.mark.timeout(180)
def test_services_expose_metrics_that_move_and_pass_promtool(deployed: Deployed) -> None:
    root, ca = deployed.root, deployed.ca
    init_authority(root / "km", KEK.encode(), ca=ca, admin_dir=root / "admin")
    km_config = write_toml(
        root / "keymanager.toml",
        {"keymanager": {"state_dir": root / "km"}, "server": {"metrics_port": 0}},
    )
    keymanager = deployed.start("keymanager", ["serve", "keymanager", "--config", str(km_config)])
    enroll_address = next(
        line.removeprefix("enrollment on ")
        for line in keymanager.preamble
        if line.startswith("enrollment on ")
    )

    # Backbone (polling the key manager's revocations) and aggregator, started together.
    backbone = deployment(
        root / "backbone",
        ca=ca,
        aggregators=["aggregator-0"],
        security={
            "keymanager": keymanager.address,
            "keymanager_server_name": KEYMANAGER_NAME,
            "revocation_poll_s": 0.5,
        },
        server={"metrics_port": 0},
    )
    ca.issue("aggregator-0", "aggregator", dns_names=[AGGREGATOR_NAME]).write(root / "agg-tls")
    federation = {
        "name": "fed",
        "rounds": 1,
        "min_clients": 1,
        "local_steps": 2,
        "deadline_s": 60.0,
        "adapter_seed": 7,
        "members": ["hospital-a"],
        "schema": federation_schema(backbone.model_path),
    }
    agg_config = root / "aggregator.yaml"
    agg_config.write_text(
        f"aggregator:\n  state_dir: {json.dumps(str(root / 'agg-state'))}\n"
        f"  federations: [{json.dumps(federation)}]\n"
        f"server:\n  tls_dir: {json.dumps(str(root / 'agg-tls'))}\n  metrics_port: 0\n"
    )
    backbone_args = ["serve", "backbone", "--config", str(backbone.config_path)]
    starting: dict[str, ServiceProcess] = {}
    thread = threading.Thread(
        target=lambda: starting.update(backbone=deployed.start("backbone", backbone_args))
    )
    thread.start()
    aggregator = deployed.start("aggregator", ["serve", "aggregator", "--config", str(agg_config)])
    thread.join()
    backbone_process = starting["backbone"]

    # The client: enrolled through the key manager, training in this process.
    admin = KeyManagerClient.connect(
        keymanager.address, TLSConfig.from_dir(root / "admin"), server_name=KEYMANAGER_NAME
    )
    try:
        token, _ = admin.create_token("hospital-a", "client")
    finally:
        admin.close()
    ca_pem = (root / "km" / CA_CERT).read_bytes()
    tls = root / "clients" / "hospital-a"
    enroll(enroll_address, ca_pem, token, "hospital-a", tls, server_name=KEYMANAGER_NAME)
    (data,) = split_dataset(root, [8])
    client_config = write_toml(
        root / "client.toml",
        {
            "backbone": {
                "address": backbone_process.address,
                "server_name": BACKBONE_NAME,
                "tls_dir": tls,
            },
            "training": {
                "data": data,
                "model_path": backbone.model_path,
                "batch_size": 2,
                "max_length": 32,
                "max_steps": 100,
                "seed": 1,
            },
            "adapter": {"kind": "lora", "r": 4, "alpha": 8, "seed": 7},
            "federated": {
                "aggregator": aggregator.address,
                "federation": "fed",
                "server_name": AGGREGATOR_NAME,
                "max_wait_s": 60,
            },
            "metrics": {"port": 0},
        },
    )
    config = ClientConfig.load(client_config)
    assert config.metrics.port == 0
    client_metrics: MetricsServer = serve_metrics(config.metrics.host, config.metrics.port)
    during: list[Samples] = []
    try:
        with (
            backbone_client(config.backbone) as client,
            federated_trainer(client, config, None) as federated,
        ):

            def on_round(_: object) -> None:  # the session is still open
                during.append(samples(scrape(metrics_address(backbone_process))))

            reports = federated.run(on_round=on_round, max_wait_s=60)
            federated.trainer.close(delete_session=True)
        client_text = scrape(client_metrics.address)
    finally:
        client_metrics.close()
    assert len(reports) == 1

    # The backbone sees the cancelled training stream end a moment later.
    backbone_metrics = metrics_address(backbone_process)
    assert wait_until(
        lambda: (
            value(samples(scrape(backbone_metrics)), "splitfed_rpcs_in_flight", method="Train") == 0
        )
    )
    texts = {
        name: scrape(metrics_address(process))
        for name, process in [
            ("keymanager", keymanager),
            ("backbone", backbone_process),
            ("aggregator", aggregator),
        ]
    }
    texts["client"] = client_text
    parsed = {name: samples(text) for name, text in texts.items()}

    # Backbone: calls, tensors both ways, a session while training, compute.
    bb = parsed["backbone"]
    rpcs = "splitfed_rpcs_total"
    svc = "splitfed.v1.Backbone"
    assert value(bb, rpcs, service=svc, method="OpenSession", code="OK") == 1
    # The SDK ends its training stream by cancelling it; the server counts it CANCELLED,
    # or OK when its side of the stream had already finished.
    train_ends = (value(bb, rpcs, service=svc, method="Train", code=c) for c in ("OK", "CANCELLED"))
    assert sum(train_ends) >= 1
    server_errors = {"INTERNAL", "UNKNOWN", "DATA_LOSS", "UNAVAILABLE"}
    for name, parsed_samples in [("backbone", bb)]:
        failed = [k for k in parsed_samples if k[0] == rpcs and dict(k[1])["code"] in server_errors]
        assert not failed, (name, failed)
    assert value(bb, rpcs, service=svc, method="CloseSession", code="OK") == 1
    assert value(bb, "splitfed_rpc_duration_seconds_count", service=svc, method="Train") >= 1
    assert value(bb, "splitfed_wire_payload_bytes_total", direction="received") > 0
    assert value(bb, "splitfed_wire_payload_bytes_total", direction="sent") > 0
    assert value(bb, "splitfed_wire_chunks_total", direction="received") > 0
    assert value(during[0], "splitfed_backbone_sessions") == 1
    assert value(bb, "splitfed_backbone_sessions") == 0  # closed at the end
    assert value(bb, "splitfed_backbone_compute_seconds_count", operation="forward") >= 2
    assert value(bb, "splitfed_backbone_compute_seconds_count", operation="step") == 2
    assert value(bb, "splitfed_backbone_compute_wait_seconds_count") >= 4
    assert value(bb, "splitfed_rpcs_in_flight", method="Train") == 0

    # Aggregator: one closed round with one participant.
    agg = parsed["aggregator"]
    fed = {"federation": "fed"}
    assert value(agg, "splitfed_aggregator_rounds_total", outcome="closed", **fed) == 1
    assert value(agg, "splitfed_aggregator_updates_total", **fed) == 1
    assert value(agg, "splitfed_aggregator_round_participants", **fed) == 1
    assert value(agg, "splitfed_aggregator_global_version", **fed) == 1
    assert value(agg, "splitfed_aggregator_aggregation_seconds_count", **fed) == 1
    assert value(agg, rpcs, method="UploadUpdate", code="OK") == 1
    assert value(agg, "splitfed_wire_payload_bytes_total", direction="received") > 0

    # Key manager: the enrollment, the backbone's revocation polls, the certificates.
    km = parsed["keymanager"]
    keys = "splitfed.v1.KeyManager"
    assert value(km, rpcs, service=keys, method="Enroll", code="OK") == 1
    assert value(km, rpcs, service=keys, method="CreateToken", code="OK") == 1
    assert value(km, rpcs, service=keys, method="GetRevocations", code="OK") >= 1
    assert value(km, "splitfed_keymanager_certificates_issued_total", role="client") == 1
    assert value(km, "splitfed_keymanager_certificates", role="client", state="valid") == 1
    assert value(km, "splitfed_keymanager_certificate_expiry_seconds", role="client") > 0

    # The client's own endpoint: what it sent, and the privacy gauge's family.
    cl = parsed["client"]
    assert value(cl, "splitfed_wire_payload_bytes_total", direction="sent") > 0

    # Logs: JSON lines; the aggregator's carry the federation and round.
    log = (root / "aggregator.log").read_text().splitlines()
    # (The log file also holds what the process printed: its addresses.)
    lines = [json.loads(line) for line in log if not line.startswith(("listening", "metrics"))]
    assert any(r.get("federation") == "fed" and r.get("round") == 1 for r in lines), lines

    check_status(deployed, client_config, keymanager, backbone_process)

    if PROMTOOL is None:
        pytest.skip("promtool not found (Debian: apt-get install prometheus); counters checked")
    for name, text in texts.items():
        try:
            promtool_check(text)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None


def check_status(
    deployed: Deployed,
    client_config: Path,
    keymanager: ServiceProcess,
    backbone: ServiceProcess,
) -> None:
    """``splitfed status`` over the same deployment: as the client (from its config),
    as an admin (the key manager's certificates), and with a service that is down."""
    from click.testing import CliRunner

    from splitfed.cli import cli

    km = f"{KEYMANAGER_NAME}@{keymanager.address}"
    report_path = deployed.root / "status.json"
    metrics = f"http://{metrics_address(backbone)}/metrics"
    args = ["--config", str(client_config), "--keymanager", km, "--metrics", metrics]
    result = CliRunner().invoke(cli, ["status", *args, "--json", str(report_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    by_service = {s["service"]: s for s in report["services"]}
    assert {s["health"] for s in report["services"]} == {"SERVING"}
    assert by_service["backbone"]["details"]["adapter_mode"] == "per-client"
    assert by_service["aggregator"]["details"]["phase"] == "FINISHED"
    assert by_service["aggregator"]["details"]["global_version"] == 1
    # Not an admin: only whether its own certificate is revoked (no ListCertificates).
    assert by_service["keymanager"]["details"] == {"this certificate": "not revoked"}
    assert report["certificate"]["role"] == "client"
    assert report["certificate"]["identity"] == "hospital-a"
    assert report["certificate"]["expires_in_s"] > 3600
    (figures,) = report["metrics"].values()
    assert figures["sessions"] == 0 and figures["RPCs"] > 0
    # An admin sees the certificates; a service that is down makes it exit 1.
    admin = ["--tls-dir", str(deployed.root / "admin"), "--keymanager", km]
    result = CliRunner().invoke(cli, ["status", *admin, "--json", str(report_path)])
    assert result.exit_code == 0, result.output
    (service,) = json.loads(report_path.read_text())["services"]
    assert service["details"]["certificates"] >= 2 and "next_expiry" in service["details"]
    result = CliRunner().invoke(cli, ["status", *admin, "--backbone", "127.0.0.1:9"])
    assert result.exit_code == 1
    assert "UNREACHABLE" in result.output
    result = CliRunner().invoke(cli, ["status", "--backbone", "127.0.0.1:9"])
    assert result.exit_code == 2 and "give --config, or the TLS material" in result.output


def test_diagnostics_metrics_port_and_json_logs(pki: Pki, tmp_path: Path) -> None:
    pki.ca.issue("backbone-0", "backbone", dns_names=[SERVER_NAME]).write(tmp_path / "srv")
    args = ["--log-format", "json", "serve", "diagnostics", "--tls-dir", str(tmp_path / "srv")]
    server = ServiceProcess(
        "diagnostics", [*args, "--metrics-port", "0"], log_path=tmp_path / "log"
    )
    address = server.start()
    try:
        with create_channel(address, pki.client, server_name=SERVER_NAME) as channel:
            assert DiagnosticsClient(channel).who_am_i().identity == "hospital-a"
        parsed = samples(scrape(metrics_address(server)))
    finally:
        assert server.stop() == 0
    labels = {"service": "splitfed.v1.Diagnostics", "method": "WhoAmI", "code": "OK"}
    assert value(parsed, "splitfed_rpcs_total", **labels) == 1
    log = (tmp_path / "log").read_text().splitlines()
    entries = [json.loads(line) for line in log if line.startswith("{")]
    assert any("shutting down" in entry["message"] for entry in entries)
    assert all(line.startswith(("{", "listening", "metrics")) for line in log), log
