"""What ``splitfed demo`` / ``make demo`` runs: the most complete end-to-end path the
project has (the deployment's processes: splitfed/cli/deployment.py).

Today: create a deployment CA in a key manager process; enroll a backbone, an aggregator
and two hospitals with one-time tokens (each party generates its own key); build a tiny
model (the bundled texts and counting); start the backbone and the aggregator as processes on
loopback with mutual TLS; check the link (who the backbone thinks we are, a large tensor
through every wire encoding, strangers refused); run a few federated rounds of split
fine-tuning (activations encrypted, updates masked by secure aggregation, body adapters
averaged) on a task the tiny model learns (splitfed/cli/sample.py), with the loss going
down; score the base model and the global adapter on held-out questions through the split
path, side by side, and show their answers; shut everything down cleanly.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from splitfed.cli.deployment import (
    ADAPTER,
    AGGREGATOR_NAME,
    BACKBONE_NAME,
    BATCH_SIZE,
    FEDERATION,
    MAX_LENGTH,
    OPTIMIZER,
    DemoError,
    Deployment,
    metrics_summary,
)
from splitfed.cli.sample import Sample, write_sample
from splitfed.clients.backbone import (
    BackboneClient,
    GenerateStream,
    RemoteBodyStage,
    client_crypto,
)
from splitfed.clients.diagnostics import DiagnosticsClient
from splitfed.clients.evaluation import EvalSettings, PartsModel, generate_texts
from splitfed.clients.federated import AggregatorClient, FederatedTrainer, RoundReport
from splitfed.clients.keys import KeyManagerClient
from splitfed.clients.trainer import SplitTrainer, TrainSettings
from splitfed.encodings import get_encoding
from splitfed.errors import rpc_status
from splitfed.models.adapters import AdapterSettings
from splitfed.models.generation import SamplingOptions
from splitfed.models.loading import load_head, load_tail
from splitfed.protocol.backbone import SessionRequest
from splitfed.retry import RetryPolicy
from splitfed.security.ca import CertificateAuthority
from splitfed.tls import TLSConfig
from splitfed.transport import create_channel
from splitfed.wire import MiB


def run_demo(
    size_mib: int = 64,
    workdir: Path | None = None,
    steps: int = 90,
    rounds: int = 3,
    plot: Path | None = None,
) -> None:
    """The whole deployment on loopback: key manager, backbone, aggregator, two clients.

    ``steps`` is the total of local training steps per client, spread over ``rounds``;
    the loss curves are drawn into ``plot`` (PNG).
    """
    console = Console(width=max(Console().width, 110))
    with tempfile.TemporaryDirectory(prefix="splitfed-demo-") as tmp:
        root = workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        console.rule("[bold]splitfed demo: split federated fine-tuning over mutual TLS")
        with Deployment(root, console) as deployment:
            deployment.start_keymanager()
            deployment.enroll_parties()
            sample = write_sample(root)
            deployment.start_backbone(sample.model, link_check_bytes=size_mib * MiB)
            deployment.start_aggregator(sample.model, rounds, max(1, steps // rounds))
            stranger = CertificateAuthority.create("some other CA").issue("mallory", "client")
            assert stranger.key_pem is not None
            _link(
                console,
                deployment.backbone_address,
                TLSConfig.from_dir(root / "hospital-a"),
                TLSConfig(stranger.cert_pem, stranger.cert_pem, stranger.key_pem),
                size_mib,
            )
            _federate(console, deployment, sample, steps, plot)
            metrics_summary(console, deployment.metrics)
        console.rule("[bold green]demo finished")


def _link(
    console: Console, address: str, tls: TLSConfig, stranger: TLSConfig, size_mib: int
) -> None:
    console.rule("link check")
    with create_channel(address, tls, server_name=BACKBONE_NAME) as channel:
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
        options=[("grpc.ssl_target_name_override", BACKBONE_NAME)],
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


def _federate(
    console: Console,
    deployment: Deployment,
    sample: Sample,
    steps: int,
    plot: Path | None,
) -> None:
    console.rule("federated split fine-tuning: two hospitals, encrypted activations")
    root = deployment.root
    rows = sample.train.read_text().splitlines()
    shards = {"hospital-a": rows[0::2], "hospital-b": rows[1::2]}
    trainers: dict[str, FederatedTrainer] = {}
    channels: list[grpc.Channel] = []
    keys: list[KeyManagerClient] = []
    for identity, shard in shards.items():
        path = root / f"{identity}.jsonl"
        path.write_text("\n".join(shard) + "\n")
        tls = TLSConfig.from_dir(root / identity)
        backbone = create_channel(deployment.backbone_address, tls, server_name=BACKBONE_NAME)
        aggregator = create_channel(deployment.aggregator_address, tls, server_name=AGGREGATOR_NAME)
        keymanager = KeyManagerClient.connect(
            deployment.keymanager_address, tls, server_name="localhost"
        )
        channels += [backbone, aggregator]
        keys.append(keymanager)
        settings = TrainSettings(
            data=path,
            model_path=sample.model,
            batch_size=BATCH_SIZE,
            max_steps=steps,
            max_length=MAX_LENGTH,
            seed=1,
            encrypted=True,
            federation=FEDERATION,
        )
        optimizer = OPTIMIZER
        trainer = SplitTrainer(
            BackboneClient(backbone), settings, ADAPTER, optimizer, keymanager=keymanager
        )
        trainers[identity] = FederatedTrainer(
            trainer,
            AggregatorClient(aggregator),
            FEDERATION,
            identity=identity,
            backbone=deployment.backbone_address,
        )
    reports: dict[str, list[RoundReport]] = {}
    errors: list[BaseException] = []
    rounds_total = max(1, deployment.rounds)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("round {task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        tasks = {
            identity: progress.add_task(identity, total=rounds_total, loss="-")
            for identity in trainers
        }

        def run(identity: str) -> None:
            def on_round(report: RoundReport) -> None:
                progress.update(tasks[identity], advance=1, loss=f"{report.losses[-1]:.3f}")

            try:
                reports[identity] = trainers[identity].run(on_round=on_round)
            except BaseException as exc:  # reported below, in the main thread
                errors.append(exc)

        # Daemon threads: Ctrl-C in the main thread ends the demo (the services are
        # stopped on the way out) without waiting for a client to finish its round.
        threads = [threading.Thread(target=run, args=(i,), name=i, daemon=True) for i in trainers]
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(timeout=0.2)
    try:
        if errors:
            raise DemoError(f"a client failed: {errors[0]}") from errors[0]
        table = Table(title="rounds (loss: first -> last local step)")
        table.add_column("round", justify="right")
        for identity in trainers:
            table.add_column(identity, justify="right")
        rounds = max(len(r) for r in reports.values())
        for index in range(rounds):
            cells = []
            for identity in trainers:
                got = reports[identity]
                report = got[index] if index < len(got) else None
                cells.append(
                    f"{report.losses[0]:.3f} -> {report.losses[-1]:.3f}" if report else "-"
                )
            table.add_row(str(index + 1), *cells)
        console.print(table)
        first = reports["hospital-a"][0].losses[0]
        last = reports["hospital-a"][-1].losses[-1]
        if not last < first:
            raise DemoError("the loss did not go down")
        if plot is not None:
            plot_losses(plot, reports)
            console.print(f"loss curves written to {plot}")
        version = trainers["hospital-a"].version
        console.print(
            f"global version {version}: every update was masked (secure aggregation); the "
            "backbone's body adapters were averaged too"
        )
        _evaluate(console, trainers["hospital-a"].trainer, keys[0], sample.heldout)
    finally:
        for federated in trainers.values():
            federated.trainer.close()
        for channel in channels:
            channel.close()
        for client in keys:
            client.close()


def plot_losses(path: Path, reports: dict[str, list[RoundReport]]) -> None:
    """Each client's local training loss by step, the rounds marked, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    boundaries: set[int] = set()
    for identity, rounds in reports.items():
        losses = [loss for report in rounds for loss in report.losses]
        axes.plot(range(1, len(losses) + 1), losses, label=identity, linewidth=1.5)
        step = 0
        for report in rounds[:-1]:
            step += len(report.losses)
            boundaries.add(step)
    for step in sorted(boundaries):
        axes.axvline(step + 0.5, color="grey", linewidth=0.8, linestyle=":")
    axes.set_xlabel("local training step (dotted: a round ends, the global adapter is loaded)")
    axes.set_ylabel("training loss")
    axes.set_title("splitfed demo: federated split fine-tuning")
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


# The held-out questions shown with their answers under the accuracy table.
SHOWN = 5


def _evaluate(
    console: Console, trainer: SplitTrainer, keymanager: KeyManagerClient, heldout: Path
) -> None:
    """Exact-match accuracy on the held-out questions of the base model and of the global
    adapter, side by side, both through the split path (head and tail here, the body in a
    backbone session over its Generate stream); raises DemoError unless the adapter wins."""
    console.rule("held-out questions: the base model and the global adapter, split generation")
    rows = [json.loads(line) for line in heldout.read_text().splitlines()]
    prompts = [str(r["prompt"]) for r in rows]
    answers = [str(r["response"]) for r in rows]
    tokenizer = trainer.tokenizer
    settings = EvalSettings(
        batch_size=len(prompts),
        max_length=trainer.settings.max_length,
        sampling=SamplingOptions(
            max_new_tokens=8,
            stop_token_ids=(int(tokenizer.eos_token_id),),
            pad_token_id=int(tokenizer.pad_token_id),
        ),
    )
    generated = {}
    for name in ("base model", "global adapter"):
        with _split_model(trainer, keymanager, base=name == "base model") as model:
            generated[name] = generate_texts(model, prompts, tokenizer, settings)
    accuracy = {
        name: sum(g == a for g, a in zip(texts, answers, strict=True)) / len(answers)
        for name, texts in generated.items()
    }
    table = Table(title=f"held-out accuracy: {len(answers)} questions never trained on")
    table.add_column("exact match (greedy)")
    for name in generated:
        table.add_column(name, justify="right")
    table.add_row("accuracy", *(f"{value:.0%}" for value in accuracy.values()))
    console.print(table)
    examples = Table(title="a few held-out answers")
    for column in ("question", "expected", *generated):
        examples.add_column(column)
    for index in range(min(SHOWN, len(prompts))):
        cells = [
            f"[green]{texts[index]}[/]"
            if texts[index] == answers[index]
            else escape(texts[index]) or "[dim](nothing)[/]"
            for texts in generated.values()
        ]
        examples.add_row(prompts[index], answers[index], *cells)
    console.print(examples)
    if not accuracy["global adapter"] > accuracy["base model"]:
        raise DemoError(
            f"the global adapter ({accuracy['global adapter']:.0%}) does not beat the base "
            f"model ({accuracy['base model']:.0%}) on the held-out questions"
        )


@contextmanager
def _split_model(
    trainer: SplitTrainer, keymanager: KeyManagerClient, *, base: bool
) -> Iterator[PartsModel]:
    """The trainer's split model (its head, tail and backbone session: the global adapter
    after the rounds), or with ``base`` the base model: fresh head and tail and a new
    encrypted session whose LoRA adapter is a no-op, closed afterwards."""
    assert trainer.session is not None
    client, settings = trainer.client, trainer.settings
    head, tail, session_id = trainer.head, trainer.tail, trainer.session.session_id
    if base:
        # The base model's parts as the trainer's are loaded (quantized alike).
        quantization = settings.quantization
        head = load_head(settings.model_path, settings.k, settings.m, quantization=quantization)
        tail = load_tail(settings.model_path, settings.k, settings.m, quantization=quantization)
        request = SessionRequest(
            k=settings.k, m=settings.m, adapter=AdapterSettings(), encrypted=True
        )
        session_id = client.open_session(request).session_id
    head.eval()
    tail.eval()
    crypto = client_crypto(keymanager, session_id)
    stream = GenerateStream(client, session_id, "raw", crypto)
    try:
        yield PartsModel(head, RemoteBodyStage(stream), tail)
    finally:
        stream.close()
        if base:
            client.close_session(session_id)
