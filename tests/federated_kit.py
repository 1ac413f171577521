"""A federation on 127.0.0.1: a backbone and an aggregator process, clients as
`splitfed train` processes with a [federated] section."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from backbone_kit import SERVER_NAME as BACKBONE_NAME
from backbone_kit import Deployment, deployment
from helpers import fresh_log
from safetensors.torch import load_file

from splitfed.cli.launcher import ServiceProcess
from splitfed.models.adapters import AdapterSettings
from splitfed.models.schema import adapter_schema
from splitfed.models.tiny import BUNDLED_DATASET
from splitfed.security.ca import CertificateAuthority

AGGREGATOR_NAME = "aggregator.splitfed.local"
# The clients' adapter in the kit's configs (client_config), and the federation's schema.
ADAPTER = AdapterSettings(kind="lora", r=4, alpha=8, seed=7)
MEMBERS = ["hospital-a", "hospital-b", "bank-c", "a", "b", "c"]


def federation_schema(model_path: Path, adapter: AdapterSettings = ADAPTER) -> dict[str, Any]:
    """The schema of the kit's client adapter on ``model_path`` (k = m = 1), inline."""
    return {name: list(shape) for name, shape in adapter_schema(model_path, adapter).items()}


def _toml(value: Any) -> str:
    return json.dumps(str(value) if isinstance(value, Path) else value)


def write_toml(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml(v)}" for k, v in values.items() if v is not None]
    path.write_text("\n".join(lines) + "\n")
    return path


def split_dataset(root: Path, sizes: list[int]) -> list[Path]:
    """Disjoint pieces of the bundled dataset, of the given sizes (non-IID by position)."""
    rows = BUNDLED_DATASET.read_text().splitlines()
    paths, start = [], 0
    for index, size in enumerate(sizes):
        path = root / f"data-{index}.jsonl"
        path.write_text("\n".join(rows[start : start + size]) + "\n")
        paths.append(path)
        start += size
    return paths


@dataclass
class Federation:
    root: Path
    backbone: Deployment
    config: Path
    replicas: list[Deployment] = field(default_factory=list)
    aggregator: ServiceProcess | None = None
    clients: list[subprocess.Popen[str]] = field(default_factory=list)

    def start_aggregator(self) -> str:
        args = ["serve", "aggregator", "--config", str(self.config)]
        if self.aggregator is not None and self.aggregator.address:
            args += ["--listen", self.aggregator.address]  # same port after a restart
        log = fresh_log(self.root / "aggregator.log")
        process = ServiceProcess("aggregator", args, log_path=log)
        address = process.start(timeout_s=60)  # if it fails, the next try keeps the port
        self.aggregator = process
        return address

    def client_config(
        self,
        name: str,
        data: Path,
        federation: str = "fed",
        replica: int = 0,
        security: dict[str, Any] | None = None,
        **training: Any,
    ) -> Path:
        """``security``: a [security] section (e.g. the key manager, for encryption)."""
        backbone = ([self.backbone, *self.replicas])[replica]
        tls = self.root / "clients" / name
        if not (tls / "cert.pem").exists():
            self.backbone.ca.issue(name, "client").write(tls)
        assert self.aggregator is not None
        return write_toml(
            self.root / f"{name}.toml",
            {
                "backbone": {
                    "address": backbone.address,
                    "server_name": BACKBONE_NAME,
                    "tls_dir": tls,
                },
                "training": {
                    "data": data,
                    "model_path": self.backbone.model_path,
                    "batch_size": 2,
                    "max_length": 32,
                    "max_steps": 1000,
                    "seed": 1,
                    **training,
                },
                "adapter": {"kind": "lora", "r": ADAPTER.r, "alpha": ADAPTER.alpha, "seed": 7},
                "optimizer": {"learning_rate": 0.005},
                "federated": {
                    "aggregator": self.aggregator.address,
                    "federation": federation,
                    "server_name": AGGREGATOR_NAME,
                    "record_updates": self.root / "updates" / name,
                    "max_wait_s": 300,
                },
                **({"security": security} if security else {}),
            },
        )

    def run_client(self, config: Path, name: str) -> subprocess.Popen[str]:
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        process = subprocess.Popen(
            [sys.executable, "-m", "splitfed", "train", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        self.clients.append(process)
        return process

    def version(self, version: int, federation: str = "fed") -> dict[str, torch.Tensor]:
        path = self.root / "aggregator-state" / federation / "versions" / f"v{version}.safetensors"
        return load_file(str(path))

    def updates(self, name: str) -> dict[str, tuple[dict[str, torch.Tensor], int]]:
        out = {}
        for path in sorted((self.root / "updates" / name).glob("*.safetensors")):
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                samples = int(handle.metadata()["samples"])
            out[path.stem] = (load_file(str(path)), samples)
        return out

    def stop(self) -> None:
        for process in self.clients:
            if process.poll() is None:
                process.kill()
                process.wait()
        if self.aggregator is not None:
            self.aggregator.stop()
        for replica in self.replicas:
            replica.stop()
        self.backbone.stop()


def federation(
    root: Path,
    *,
    replicas: int = 1,
    ca: CertificateAuthority | None = None,
    backbone_options: dict[str, Any] | None = None,
    **federation_settings: Any,
) -> Federation:
    """``replicas`` backbones (sharing one CA and model) for server-side adapters; ``ca``
    (e.g. the key manager's), ``backbone_options``: more :func:`deployment` arguments
    for the first backbone (e.g. its [security] section)."""
    backbone = deployment(
        root / "backbone",
        ca=ca,
        idle_timeout_s=600.0,
        aggregators=["aggregator-0"],
        **(backbone_options or {}),
    )
    backbone.start()
    others = []
    for index in range(1, replicas):
        other = deployment(
            root / f"backbone-{index}",
            ca=backbone.ca,
            idle_timeout_s=600.0,
            aggregators=["aggregator-0"],
        )
        other.start()
        others.append(other)
    if federation_settings.get("server_adapters"):
        federation_settings.setdefault(
            "backbones", [backbone.address, *(o.address for o in others)]
        )
        federation_settings.setdefault("backbone_server_name", BACKBONE_NAME)
    backbone.ca.issue("aggregator-0", "aggregator", dns_names=[AGGREGATOR_NAME]).write(
        root / "aggregator-tls"
    )
    settings = {
        "name": "fed",
        "rounds": 3,
        "min_clients": 3,
        "local_steps": 2,
        "deadline_s": 120.0,
        "adapter_seed": 7,
        "members": MEMBERS,
        "schema": federation_schema(backbone.model_path),
        **federation_settings,
    }
    config = root / "aggregator.yaml"
    config.write_text(
        "aggregator:\n"
        f"  state_dir: {json.dumps(str(root / 'aggregator-state'))}\n"
        f"  federations: [{json.dumps(settings)}]\n"
        "server:\n"
        f"  tls_dir: {json.dumps(str(root / 'aggregator-tls'))}\n"
    )
    fed = Federation(root, backbone, config, others)
    fed.start_aggregator()
    return fed
