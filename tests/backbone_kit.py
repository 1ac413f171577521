"""A backbone in its own process on 127.0.0.1 with mTLS, and clients for it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from splitfed.clients.backbone import BackboneClient
from splitfed.launcher import ServiceProcess
from splitfed.security.ca import CertificateAuthority
from splitfed.security.tls import TLSConfig
from splitfed.tiny import BUNDLED_DATASET, make_tiny_checkpoint
from splitfed.transport import create_channel

SERVER_NAME = "backbone.splitfed.local"


def tiny_checkpoint(directory: Path, *, layers: int = 6, seed: int = 0) -> Path:
    texts = []
    for line in BUNDLED_DATASET.read_text().splitlines():
        row = json.loads(line)
        texts.append(" ".join(str(v) for v in row.values()))
    return make_tiny_checkpoint(directory, texts, layers=layers, seed=seed)


@dataclass
class Deployment:
    root: Path
    ca: CertificateAuthority
    model_path: Path
    config_path: Path
    process: ServiceProcess | None = None

    def start(self) -> str:
        args = ["serve", "backbone", "--config", str(self.config_path)]
        if self.process is not None and self.process.address:
            args += ["--listen", self.process.address]  # same port after a restart
        self.process = ServiceProcess("backbone", args, log_path=self.root / "backbone.log")
        return self.process.start(timeout_s=120)

    @property
    def address(self) -> str:
        assert self.process is not None and self.process.address
        return self.process.address

    def client_tls(self, identity: str) -> TLSConfig:
        issued = self.ca.issue(identity, "client")
        assert issued.key_pem is not None
        return TLSConfig(self.ca.cert_pem, issued.cert_pem, issued.key_pem)

    def connect(self, identity: str = "hospital-a") -> tuple[grpc.Channel, BackboneClient]:
        channel = create_channel(self.address, self.client_tls(identity), server_name=SERVER_NAME)
        return channel, BackboneClient(channel)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


def deployment(root: Path, **backbone: Any) -> Deployment:
    ca = CertificateAuthority.create("test CA")
    model = tiny_checkpoint(root / "model")
    ca.issue("backbone-0", "backbone", dns_names=[SERVER_NAME]).write(root / "backbone-tls")
    settings = {"model_path": str(model), "state_dir": str(root / "state"), **backbone}
    config = root / "backbone.yaml"
    lines = ["backbone:"] + [f"  {k}: {json.dumps(v)}" for k, v in settings.items()]
    lines += ["server:", f"  tls_dir: {json.dumps(str(root / 'backbone-tls'))}"]
    config.write_text("\n".join(lines) + "\n")
    return Deployment(root, ca, model, config)
