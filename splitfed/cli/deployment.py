"""The demo's deployment on loopback: a key manager, the parties it enrolls, a backbone
and an aggregator, each a child process (splitfed/cli/launcher.py); and the summary of
their Prometheus figures."""

from __future__ import annotations

import json
import os
import secrets
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from splitfed.cli.launcher import ServiceProcess, ServiceStartError
from splitfed.clients.keys import KeyManagerClient, enroll
from splitfed.models.adapters import AdapterSettings
from splitfed.models.optim import OptimizerSettings
from splitfed.models.schema import adapter_schema, write_schema
from splitfed.services.keymanager.authority import init_authority
from splitfed.tls import TLSConfig
from splitfed.wire import MiB

BACKBONE_NAME = "backbone.splitfed.local"
AGGREGATOR_NAME = "aggregator.splitfed.local"
FEDERATION = "demo"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER = AdapterSettings(kind="lora", r=16, alpha=32, target_modules=PROJECTIONS, seed=1)
# How every hospital of the demo trains (the walkthrough, and the configs that
# `splitfed demo --write-configs` writes for the README session).
OPTIMIZER = OptimizerSettings(learning_rate=3e-3, schedule="constant")
BATCH_SIZE = 16
MAX_LENGTH = 48


class DemoError(RuntimeError):
    pass


class Deployment:
    """The demo's processes; stops every one of them on exit, also on errors and Ctrl-C."""

    def __init__(self, root: Path, console: Console) -> None:
        self.root = root
        self.console = console
        self.kek = secrets.token_urlsafe(32)
        self.env = {**os.environ, "SPLITFED_KEK": self.kek}
        self.processes: list[ServiceProcess] = []
        self.keymanager_address = ""
        self.enroll_address = ""
        self.backbone_address = ""
        self.aggregator_address = ""
        # service name -> host:port of its Prometheus endpoint
        self.metrics: dict[str, str] = {}
        self.rounds = 0

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        failed = []
        for process in reversed(self.processes):
            code = process.stop()
            if code not in (0, None):
                failed.append(f"{process.name} exited with code {code}")
        if failed and exc[0] is None:
            raise DemoError("; ".join(failed) + f"; see the logs in {self.root}")
        self.console.print(f"stopped {len(self.processes)} services")

    def _start(self, name: str, args: list[str]) -> ServiceProcess:
        process = ServiceProcess(name, args, log_path=self.root / f"{name}.log", env=self.env)
        try:
            process.start(timeout_s=120)
        except ServiceStartError as exc:
            raise DemoError(str(exc)) from None
        self.processes.append(process)
        for line in process.preamble:
            if line.startswith("metrics on "):
                self.metrics[name] = line.removeprefix("metrics on ")
        return process

    def start_keymanager(self) -> None:
        init_authority(self.root / "km", self.kek.encode(), admin_dir=self.root / "admin")
        config = self.root / "keymanager.yaml"
        config.write_text(
            f"keymanager:\n  state_dir: {json.dumps(str(self.root / 'km'))}\n"
            "server:\n  metrics_port: 0\n"
        )
        process = self._start("keymanager", ["serve", "keymanager", "--config", str(config)])
        assert process.address is not None
        self.keymanager_address = process.address
        self.enroll_address = next(
            line.split()[-1] for line in process.preamble if line.startswith("enrollment on")
        )
        self.console.print(
            f"key manager {process.pid}: mTLS on {self.keymanager_address}, enrollment on "
            f"{self.enroll_address}; CA key encrypted at rest"
        )

    def enroll_parties(self) -> None:
        admin = KeyManagerClient.connect(
            self.keymanager_address,
            TLSConfig.from_dir(self.root / "admin"),
            server_name="localhost",
        )
        ca_pem = (self.root / "km" / "ca.pem").read_bytes()
        parties = [
            ("backbone-0", "backbone", (BACKBONE_NAME,)),
            ("aggregator-0", "aggregator", (AGGREGATOR_NAME,)),
            ("hospital-a", "client", ()),
            ("hospital-b", "client", ()),
        ]
        with admin.channel:
            for identity, role, names in parties:
                token, _ = admin.create_token(identity, role, ttl_s=600, dns_names=names)
                enroll(
                    self.enroll_address,
                    ca_pem,
                    token,
                    identity,
                    self.root / identity,
                    server_name="localhost",
                )
        self.console.print(
            "enrolled backbone-0, aggregator-0, hospital-a and hospital-b with one-time tokens "
            "(each generated its private key itself)"
        )

    def _serve(self, name: str, identity: str, sections: str) -> tuple[ServiceProcess, str]:
        """``splitfed serve NAME`` with ``sections`` (YAML), a [server] section with the
        TLS material of ``identity`` and metrics, and the key manager in [security]."""
        config = self.root / f"{name}.yaml"
        config.write_text(
            sections + "server:\n"
            f"  tls_dir: {json.dumps(str(self.root / identity))}\n"
            "  metrics_port: 0\n"
            "security:\n"
            f"  keymanager: {json.dumps(self.keymanager_address)}\n"
            "  keymanager_server_name: localhost\n"
        )
        process = self._start(name, ["serve", name, "--config", str(config)])
        assert process.address is not None
        return process, process.address

    def start_backbone(self, model: Path, link_check_bytes: int = 64 * MiB) -> None:
        """The backbone; its diagnostics echo takes the link check's tensor (64 MiB by
        default, as every service's)."""
        echo = max(64 * MiB, link_check_bytes)
        process, self.backbone_address = self._serve(
            "backbone",
            "backbone-0",
            "backbone:\n"
            f"  model_path: {json.dumps(str(model))}\n"
            f"  state_dir: {json.dumps(str(self.root / 'state'))}\n"
            f"  aggregators: [aggregator-0:{FEDERATION}]\n"
            "diagnostics:\n"
            f"  max_tensor_bytes: {echo}\n"
            f"  max_buffered_bytes: {2 * echo}\n",
        )
        self.console.print(f"backbone {process.pid} serving the body on {process.address}")

    def start_aggregator(self, model: Path, rounds: int, local_steps: int) -> None:
        # Who may join, and the tensors every update must hold (the clients' adapter).
        schema = self.root / "federation-schema.json"
        write_schema(schema, adapter_schema(model, ADAPTER))
        federation = {
            "name": FEDERATION,
            "members": ["hospital-a", "hospital-b"],
            "schema_file": str(schema),
            "rounds": rounds,
            "min_clients": 2,
            "local_steps": local_steps,
            "deadline_s": 300,
            "adapter_seed": ADAPTER.seed,
            "secure_aggregation": True,
            "server_adapters": True,
            "backbones": [self.backbone_address],
            "backbone_server_name": BACKBONE_NAME,
        }
        process, self.aggregator_address = self._serve(
            "aggregator",
            "aggregator-0",
            "aggregator:\n"
            f"  state_dir: {json.dumps(str(self.root / 'aggregator-state'))}\n"
            f"  federations: [{json.dumps(federation)}]\n",
        )
        self.rounds = rounds
        self.console.print(
            f"aggregator {process.pid} on {process.address}: federation {FEDERATION!r}, "
            f"{rounds} rounds of {local_steps} local steps, secure aggregation, "
            "server-side adapters averaged"
        )


SUMMARY = [
    ("splitfed_rpcs_total", {}, "RPCs served"),
    ("splitfed_wire_payload_bytes_total", {"direction": "received"}, "tensor bytes received"),
    ("splitfed_wire_payload_bytes_total", {"direction": "sent"}, "tensor bytes sent"),
    ("splitfed_backbone_compute_seconds_count", {}, "backbone compute calls"),
    ("splitfed_aggregator_rounds_total", {"outcome": "closed"}, "rounds closed"),
    ("splitfed_aggregator_updates_total", {}, "updates aggregated"),
    ("splitfed_keymanager_certificates_issued_total", {}, "certificates issued"),
    ("splitfed_authorization_denials_total", {}, "authorization denials"),
]


def metrics_summary(console: Console, endpoints: dict[str, str]) -> None:
    """The services' own Prometheus figures, summed over labels."""
    if not endpoints:
        return
    table = Table(title="metrics (each service's /metrics endpoint)")
    table.add_column("metric")
    for name in endpoints:
        table.add_column(name, justify="right")
    values: dict[str, dict[str, float]] = {}
    for service, address in endpoints.items():
        url = f"http://{address}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                for metric, labels, label in SUMMARY:
                    if sample.name == metric and labels.items() <= sample.labels.items():
                        row = values.setdefault(label, {})
                        row[service] = row.get(service, 0.0) + sample.value
    for _, _, label in SUMMARY:
        row = values.get(label, {})
        table.add_row(label, *(f"{row[s]:,.0f}" if s in row else "-" for s in endpoints))
    console.print(table)
