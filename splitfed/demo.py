"""``splitfed demo`` / ``make demo``: the most complete end-to-end path the project has.

Today: mint a deployment CA; build a tiny model and tokenizer from the bundled dataset;
start a backbone in its own process on loopback with mutual TLS; check the link (who the
backbone thinks we are, a large tensor through every wire encoding, strangers refused);
fine-tune split (head and tail here, body there) for a few dozen steps with the loss
going down; generate text from the fine-tuned split model; shut down cleanly.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import grpc
import torch
from rich.console import Console
from rich.table import Table

from splitfed.clients.app import generate
from splitfed.clients.backbone import BackboneClient
from splitfed.clients.diagnostics import DiagnosticsClient
from splitfed.clients.trainer import SplitTrainer, StepReport, TrainSettings
from splitfed.encodings import get_encoding
from splitfed.errors import rpc_status
from splitfed.launcher import ServiceProcess, ServiceStartError
from splitfed.models.adapters import AdapterSettings
from splitfed.models.generation import SamplingOptions
from splitfed.models.optim import OptimizerSettings
from splitfed.retry import RetryPolicy
from splitfed.security.ca import CertificateAuthority
from splitfed.security.tls import TLSConfig
from splitfed.serving import ConnectSettings
from splitfed.tiny import BUNDLED_DATASET, make_tiny_checkpoint
from splitfed.transport import create_channel
from splitfed.wire import MiB

SERVER_NAME = "backbone.splitfed.local"
PROMPTS = ["Add 2 and 3.", "Add 4 and 4.", "What color is the cat?"]


class DemoError(RuntimeError):
    pass


def _mint(workdir: Path) -> tuple[CertificateAuthority, TLSConfig]:
    ca = CertificateAuthority.create("splitfed demo CA")
    ca.issue("backbone-0", "backbone", dns_names=[SERVER_NAME, "localhost"]).write(
        workdir / "backbone-0"
    )
    ca.issue("hospital-a", "client").write(workdir / "hospital-a")
    stranger = CertificateAuthority.create("some other CA").issue("mallory", "client")
    assert stranger.key_pem is not None
    return ca, TLSConfig(ca.cert_pem, stranger.cert_pem, stranger.key_pem)


def _text(row: dict[str, str]) -> str:
    return f"{row['prompt']}\n{row['response']}" if "prompt" in row else row["text"]


def _model_and_data(workdir: Path) -> tuple[Path, Path]:
    """A tiny base model that has read the bundled texts except the arithmetic, and the
    arithmetic questions as the data owner's private fine-tuning set."""
    rows = [json.loads(line) for line in BUNDLED_DATASET.read_text().splitlines()]
    private = [r for r in rows if r.get("prompt", "").startswith("Add")]
    public = [_text(r) for r in rows if r not in private]
    data = workdir / "private.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in private))
    model = make_tiny_checkpoint(
        workdir / "model",
        [_text(r) for r in rows],
        layers=6,
        hidden_size=64,
        pretrain_texts=public,
        pretrain_steps=300,
    )
    return model, data


def run_demo(size_mib: int = 64, workdir: Path | None = None, steps: int = 100) -> None:
    console = Console(width=max(Console().width, 110))
    with tempfile.TemporaryDirectory(prefix="splitfed-demo-") as tmp:
        root = workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        console.rule("[bold]splitfed demo: split fine-tuning over mutual TLS")
        _, stranger_tls = _mint(root)
        model, data = _model_and_data(root)
        config = root / "backbone.yaml"
        config.write_text(
            "backbone:\n"
            f"  model_path: {json.dumps(str(model))}\n"
            f"  state_dir: {json.dumps(str(root / 'state'))}\n"
            "server:\n"
            f"  tls_dir: {json.dumps(str(root / 'backbone-0'))}\n"
        )
        console.print(
            f"minted a deployment CA and certificates; pretrained a tiny base model (in {root})"
        )
        server = ServiceProcess(
            "backbone",
            ["serve", "backbone", "--config", str(config)],
            log_path=root / "backbone.log",
        )
        try:
            address = server.start(timeout_s=120)
        except ServiceStartError as exc:
            raise DemoError(str(exc)) from None
        try:
            console.print(f"backbone process {server.pid} serving on {address}")
            client_tls = TLSConfig.from_dir(root / "hospital-a")
            _link(console, address, client_tls, stranger_tls, size_mib)
            _train_and_generate(console, address, root, model, data, steps)
        finally:
            code = server.stop()
        console.print(f"backbone stopped gracefully (exit code {code})")
        if code != 0:
            raise DemoError(f"backbone exited with code {code}; see {root / 'backbone.log'}")
        console.rule("[bold green]demo finished")


def _link(
    console: Console, address: str, tls: TLSConfig, stranger: TLSConfig, size_mib: int
) -> None:
    console.rule("link check")
    with create_channel(address, tls, server_name=SERVER_NAME) as channel:
        client = DiagnosticsClient(channel)
        peer = client.who_am_i()
        console.print(
            f"health: {client.health()}; the backbone sees us as "
            f"[bold]{peer.role}/{peer.identity}[/] (server {peer.server_version})"
        )
        table = Table(title="a tensor client -> backbone -> client, verified by CRC-32C")
        for column in ("encoding", "MiB", "wire MiB", "MB/s", "max |error|"):
            table.add_column(column, justify="right" if column != "encoding" else "left")
        tensor = torch.randn(
            size_mib * MiB // (4 * 4096), 4096, generator=torch.Generator().manual_seed(0)
        )
        for encoding in ("raw", "bf16", "int8"):
            start = time.perf_counter()
            (back,) = client.echo([("h1", tensor)], encoding=encoding)
            seconds = time.perf_counter() - start
            error = (back.tensor - tensor).abs().max().item()
            if encoding == "raw" and not torch.equal(back.tensor, tensor):
                raise DemoError("raw echo is not bit-exact")
            wire = get_encoding(encoding).encoded_nbytes(tensor.dtype, tensor.shape)
            table.add_row(
                encoding,
                f"{size_mib}",
                f"{wire / MiB:.1f}",
                f"{2 * tensor.numel() * 4 / seconds / 1e6:.0f}",
                "bit-exact" if encoding == "raw" else f"{error:.2e}",
            )
        console.print(table)
    plain = grpc.secure_channel(
        address,
        stranger.channel_credentials(),
        options=[("grpc.ssl_target_name_override", SERVER_NAME)],
    )
    for what, channel in [
        ("a client whose certificate comes from another CA", plain),
        (
            "our client expecting a different server name",
            create_channel(address, tls, server_name="aggregator.splitfed.local"),
        ),
    ]:
        with channel:
            try:
                DiagnosticsClient(
                    channel, retry=RetryPolicy(max_attempts=1), timeout_s=10
                ).who_am_i()
            except grpc.RpcError as err:
                code = rpc_status(err)[0]
                console.print(f"refused, as it should be: {what} ({code.name if code else '?'})")
            else:
                raise DemoError(f"{what} was let in")


def _train_and_generate(
    console: Console, address: str, root: Path, model: Path, data: Path, steps: int
) -> None:
    console.rule("split fine-tuning: tokens and labels stay here, the body trains there")
    connect = ConnectSettings(address=address, server_name=SERVER_NAME, tls_dir=root / "hospital-a")
    settings = TrainSettings(
        data=data,
        model_path=model,
        k=1,
        m=1,
        batch_size=4,
        max_steps=steps,
        max_length=48,
        max_grad_norm=1.0,
        checkpoint_dir=root / "client",
        seed=1,
    )
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    adapter = AdapterSettings(kind="lora", r=16, alpha=32, target_modules=projections, seed=1)
    optimizer = OptimizerSettings(
        learning_rate=1e-2, schedule="cosine", warmup_steps=5, total_steps=steps
    )
    with create_channel(connect.address, connect.tls(), server_name=SERVER_NAME) as channel:
        client = BackboneClient(channel)
        trainer = SplitTrainer(client, settings, adapter, optimizer)
        session = trainer.start()
        body = session.info.num_layers - 2
        console.print(f"session {session.session_id}: 1 block here, {body} on the backbone, 1 here")
        table = Table(title="training")
        for column in ("step", "loss", "learning rate", "grad norm", "ms/step"):
            table.add_column(column, justify="right")

        def on_step(report: StepReport) -> None:
            if report.step == 1 or report.step % 10 == 0:
                table.add_row(
                    str(report.step),
                    f"{report.loss:.4f}",
                    f"{report.learning_rate:.2e}",
                    f"{report.grad_norm:.3f}",
                    f"{report.seconds * 1000:.0f}",
                )

        reports = trainer.run(on_step)
        trainer.close()
        console.print(table)
        first, last = reports[0].loss, sum(r.loss for r in reports[-5:]) / 5
        console.print(f"loss {first:.3f} -> {last:.3f} (mean of the last 5 steps)")
        if not last < first:
            raise DemoError("the loss did not go down")
        console.rule("split generation: one position per step against the backbone's KV cache")
        from splitfed.clients.app import ClientConfig

        config = ClientConfig(
            backbone=connect,
            training=settings,
            adapter=adapter,
            optimizer=optimizer,
            generation=SamplingOptions(max_new_tokens=16),
        )
        for prompt, output in zip(PROMPTS, generate(client, config, PROMPTS), strict=True):
            console.print(f"[bold]> {prompt}[/]\n{output}")
