"""Concurrent sessions against one backbone: N sessions at once against the same N
served one at a time.

A Llama-layout model (hidden 256, ``--layers`` decoder layers, 16 by default as in
bench/parallel.py, vocab 8000; with 8 the clients' head and tail are a third of each
step, so overlap alone gives a ratio near 1.6 and the clients cap it near 3.3, see
docs/benchmarks.md). The backbone, in adapter mode "per-client", runs in its own
process (``splitfed serve backbone``) on loopback with mutual TLS. Every session is an
organisation of its own: its own client certificate, channel and session, its own LoRA
adapter (r=16 on q, k, v, o, seed 100 + its index) and its own head and tail (k = m = 1,
so the body holds all layers but two).
The sessions are threads of this process. As two machines would, backbone and clients
each get half of the cores (one each on 2 cores) and as many torch threads; with one
core for all clients, separate client processes would get no more CPU than threads, and
the ``client cores`` column shows how much of its half the client side used.

For each N of ``--sessions`` (the first N sessions) and each kind of work, two modes in
``--blocks`` alternating blocks (serial, concurrent, serial, ...) after a warm-up of every
session:

* generation: each session greedily generates ``--new-tokens`` tokens for its own prompt
  of ``--prompt-tokens`` random tokens (SplitGenerator, the body over the session's
  Generate stream with the backbone's KV cache); aggregate tokens/s.
* training: each session runs ``--steps`` split training steps (forward, backward, norm
  exchange, AdamW on both sides) on its own batch of 1 x ``--tokens`` tokens; aggregate
  samples/s.

*serial*: one session does its work, then the next. *concurrent* (printed as
"batched"): the N sessions' threads start together. Ratio concurrent/serial per N. Even
while the backbone runs one job at a time (services/backbone/compute.py) it exceeds 1
for N >= 2: serial sessions leave the backbone's core idle while a client computes and
the client's while the backbone does; concurrent ones overlap the two, up to the slower
side. What batching adds shows in the other columns, all of the concurrent mode:
``client cores`` and ``backbone cores``, the CPU seconds each side spent per wall second
(the client threads' own time; the backbone process's user + system time from /proc);
``backbone ms/unit``, the backbone's CPU milliseconds per generated token or trained
sample, which batching must lower; ``client limit``, the ratio the clients' own work
allows (their half of the cores busy at their CPU time per unit, over the serial rate),
which bounds the ratio once batching makes the backbone cheap.

    python bench/concurrency.py [--sessions 1,2,4,8,16] [--layers 16] [--new-tokens 32]
                                [--prompt-tokens 16] [--steps 3] [--tokens 32]
                                [--blocks 3] [--quick] [--device cpu]
                                [--client-batch [WINDOW_MS]] [--plot PATH] [--json PATH]

``--client-batch`` turns the backbone's ``client_batch`` on (``batch_window_ms``
WINDOW_MS, 5 by default): concurrent training steps run as multi-adapter passes
(docs/backbone.md, "Client-batch"). Generation is unchanged.

``--quick`` is a smoke run (sessions 1,2,8, 3 layers, 4 new tokens, 1 step, 1 block);
options given explicitly win over it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
from common import report, save_random_llama
from split_step import SERVER_NAME, SplitClient, client_half, pin

from splitfed.cli.launcher import ServiceProcess
from splitfed.clients.backbone import BackboneClient, GenerateStream, RemoteBodyStage
from splitfed.models.adapters import AdapterSettings
from splitfed.models.generation import SamplingOptions, SplitGenerator
from splitfed.models.loading import load_head, load_tail
from splitfed.models.tiny import llama_config
from splitfed.protocol.backbone import SessionRequest
from splitfed.runtime import tune_allocator
from splitfed.security.ca import CertificateAuthority
from splitfed.tls import TLSConfig
from splitfed.transport import create_channel

VOCAB = 8000
MODES = ("serial", "concurrent")
DEFAULTS: dict[str, Any] = {
    "sessions": "1,2,4,8,16",
    "layers": 16,
    "new_tokens": 32,
    "prompt_tokens": 16,
    "steps": 3,
    "blocks": 3,
}
QUICK: dict[str, Any] = {
    "sessions": "1,2,8",
    "layers": 3,
    "new_tokens": 4,
    "prompt_tokens": 8,
    "steps": 1,
    "blocks": 1,
}
# What one unit of work of each kind yields, and its name in the figures.
UNITS = {"generation": "tokens_per_s", "training": "samples_per_s"}


def adapter(index: int) -> AdapterSettings:
    return AdapterSettings(kind="lora", r=16, alpha=32, seed=100 + index)


class Session(Protocol):
    def work(self) -> None: ...

    def close(self) -> None: ...


class Generating:
    """One organisation generating: its own session, Generate stream, head and tail."""

    def __init__(self, path: Path, client: BackboneClient, index: int, args: Any) -> None:
        self.client = client
        request = SessionRequest(k=1, m=1, adapter=adapter(index))
        self.session = client.open_session(request).session_id
        self.stream = GenerateStream(client, self.session, "raw")
        self.generator = SplitGenerator(
            load_head(path), RemoteBodyStage(self.stream), load_tail(path)
        )
        gen = torch.Generator().manual_seed(1000 + index)
        self.prompt = torch.randint(3, VOCAB, (1, args.prompt_tokens), generator=gen)
        self.mask = torch.ones_like(self.prompt)
        self.options = SamplingOptions(max_new_tokens=args.new_tokens)

    def work(self) -> None:
        self.generator.generate(self.prompt, self.mask, self.options)

    def close(self) -> None:
        self.stream.close()
        self.client.close_session(self.session)


class Training:
    """One organisation training: its own session, adapter, Train stream and batch."""

    def __init__(self, path: Path, client: BackboneClient, index: int, args: Any) -> None:
        self.client = client
        self.split = SplitClient(path, client, adapter(index))
        gen = torch.Generator().manual_seed(2000 + index)
        self.ids = torch.randint(3, VOCAB, (1, args.tokens), generator=gen)
        self.mask = torch.ones_like(self.ids)

    def work(self) -> None:
        self.split.step(self.ids, self.mask)

    def close(self) -> None:
        self.split.close()


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (its threads included); 0 without
    /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# What each kind's passes count in the backbone's metrics: (steps in passes, passes).
PASS_METRICS = {
    "generation": (
        "splitfed_backbone_generate_pass_sessions_sum",
        "splitfed_backbone_generate_pass_sessions_count",
    ),
    "training": (None, 'splitfed_backbone_compute_seconds_count{operation="forward"}'),
}


# The time of the backbone's compute jobs, every operation.
DEVICE_SECONDS = "splitfed_backbone_compute_seconds_sum"


def metrics_address(server: ServiceProcess) -> str:
    return next(
        line.removeprefix("metrics on ")
        for line in server.preamble
        if line.startswith("metrics on ")
    )


def scrape(address: str, name: str) -> float:
    """The sum of the series of ``name`` (a name, or a name with labels) on /metrics."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(name) and line[len(name)] in " {"
    )


def run_block(mode: str, sessions: Sequence[Session], repeats: int) -> tuple[float, float]:
    """(wall seconds, client CPU seconds) for ``repeats`` units of work of every session:
    one session after another (serial) or all at once, one thread each (concurrent)."""
    if mode == "serial":
        cpu, start = time.thread_time(), time.perf_counter()
        for session in sessions:
            for _ in range(repeats):
                session.work()
        return time.perf_counter() - start, time.thread_time() - cpu
    errors: list[BaseException] = []
    cpu_s: list[float] = []
    barrier = threading.Barrier(len(sessions) + 1)

    def worker(session: Session) -> None:
        barrier.wait()
        cpu = time.thread_time()
        try:
            for _ in range(repeats):
                session.work()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        cpu_s.append(time.thread_time() - cpu)

    threads = [threading.Thread(target=worker, args=(session,)) for session in sessions]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    return wall, sum(cpu_s)


def measure(
    kind: str,
    sessions: Sequence[Session],
    counts: list[int],
    args: Any,
    backbone_pid: int,
    metrics: str,
) -> dict[str, dict[str, Any]]:
    """Every figure of ``kind`` for each N of ``counts``, keyed by str(N)."""
    repeats = 1 if kind == "generation" else args.steps
    per_unit = args.new_tokens if kind == "generation" else 1
    for session in sessions:  # warm-up: every session's first stream frames and caches
        session.work()
    figures: dict[str, dict[str, Any]] = {}
    for n in counts:
        group = sessions[:n]
        seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
        client_cpu: dict[str, float] = dict.fromkeys(MODES, 0.0)
        backbone_cpu: dict[str, float] = dict.fromkeys(MODES, 0.0)
        passes: dict[str, float] = dict.fromkeys(MODES, 0.0)
        device: dict[str, float] = dict.fromkeys(MODES, 0.0)
        steps: dict[str, float] = dict.fromkeys(MODES, 0.0)
        steps_name, passes_name = PASS_METRICS[kind]
        # serial, concurrent, serial, ...: drifts of the machine hit both
        for _ in range(args.blocks):
            for mode in MODES:
                before = process_cpu_s(backbone_pid)
                before_passes = scrape(metrics, passes_name)
                before_steps = scrape(metrics, steps_name) if steps_name else 0.0
                before_device = scrape(metrics, DEVICE_SECONDS)
                wall, cpu = run_block(mode, group, repeats)
                backbone_cpu[mode] += process_cpu_s(backbone_pid) - before
                passes[mode] += scrape(metrics, passes_name) - before_passes
                if steps_name:
                    steps[mode] += scrape(metrics, steps_name) - before_steps
                device[mode] += scrape(metrics, DEVICE_SECONDS) - before_device
                client_cpu[mode] += cpu
                seconds[mode].append(wall)
        block_units = n * repeats * per_unit
        total = {mode: sum(seconds[mode]) for mode in MODES}
        figures[str(n)] = {
            UNITS[kind]: {mode: args.blocks * block_units / total[mode] for mode in MODES},
            "blocks": {mode: [block_units / s for s in seconds[mode]] for mode in MODES},
            "seconds": seconds,
            "client_cores": {mode: client_cpu[mode] / total[mode] for mode in MODES},
            "backbone_cores": {mode: backbone_cpu[mode] / total[mode] for mode in MODES},
            # Sessions' steps per pass of the body (training: samples per forward job).
            "steps_per_pass": {
                mode: (steps[mode] if steps_name else args.blocks * n * repeats)
                / max(passes[mode], 1.0)
                for mode in MODES
            },
            # The compute jobs' time per unit (the model's passes; the rest of the
            # backbone's CPU time is gRPC, TLS, framing and threads).
            "device_ms_per_unit": {
                mode: 1000 * device[mode] / (args.blocks * block_units) for mode in MODES
            },
            # What batching must lower: the backbone's CPU time per token or sample.
            "backbone_cpu_ms_per_unit": {
                mode: 1000 * backbone_cpu[mode] / (args.blocks * block_units) for mode in MODES
            },
        }
        # The ratio the clients' own work allows: all client cores busy at the clients'
        # CPU time per unit, over the serial rate (the backbone taken as free).
        client_s_per_unit = client_cpu["concurrent"] / (args.blocks * block_units)
        serial_rate = args.blocks * block_units / total["serial"]
        figures[str(n)]["client_bound_ratio"] = (
            torch.get_num_threads() / client_s_per_unit / serial_rate
            if client_s_per_unit > 0
            else float("inf")
        )
        rate = figures[str(n)][UNITS[kind]]
        print(
            f"{kind} {n:>2} sessions: serial {rate['serial']:.1f}, concurrent "
            f"{rate['concurrent']:.1f} {UNITS[kind].replace('_per_s', '/s')}",
            flush=True,
        )
    return figures


@contextmanager
def backbone(root: Path, device: str, window_ms: float | None) -> Iterator[ServiceProcess]:
    """The per-client backbone on the second half of the cores (``window_ms``, not None:
    client_batch on with that window, concurrent training passes merged into
    multi-adapter passes)."""
    config = root / "backbone.yaml"
    config.write_text(
        "backbone:\n"
        f"  model_path: {json.dumps(str(root / 'model'))}\n"
        f"  device: {json.dumps(device)}\n"
        "  adapter_mode: per-client\n"
        f"  client_batch: {json.dumps(window_ms is not None)}\n"
        + (f"  batch_window_ms: {window_ms}\n" if window_ms is not None else "")
        + "server:\n"
        f"  tls_dir: {json.dumps(str(root / 'tls'))}\n"
        "  metrics_port: 0\n"
    )
    threads = pin(os.getpid(), second_half=True)  # the child inherits these cores
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    server = ServiceProcess(
        "backbone",
        ["serve", "backbone", "--config", str(config)],
        log_path=root / "backbone.log",
        env=env,
    )
    try:
        server.start(timeout_s=300)
    finally:
        pin(os.getpid(), second_half=False)
    try:
        yield server
    finally:
        server.stop()


def run(root: Path, counts: list[int], args: Any) -> dict[str, Any]:
    path = root / "model"
    ca = CertificateAuthority.create("bench CA")
    ca.issue("backbone-0", "backbone", dns_names=[SERVER_NAME]).write(root / "tls")
    figures: dict[str, Any] = {}
    window = args.client_batch_window_ms
    with backbone(root, args.device, window) as server, ExitStack() as stack:
        assert server.address is not None
        clients = []
        for index in range(max(counts)):
            me = ca.issue(f"org-{index}", "client")  # one identity per organisation
            assert me.key_pem is not None
            tls = TLSConfig(ca.cert_pem, me.cert_pem, me.key_pem)
            channel = stack.enter_context(
                create_channel(server.address, tls, server_name=SERVER_NAME)
            )
            clients.append(BackboneClient(channel))
        kinds: dict[str, type[Generating] | type[Training]] = {
            "generation": Generating,
            "training": Training,
        }
        for kind, session_type in kinds.items():
            sessions = [session_type(path, c, i, args) for i, c in enumerate(clients)]
            try:
                figures[kind] = measure(
                    kind, sessions, counts, args, server.pid, metrics_address(server)
                )
            finally:  # the streams of one kind are closed before the next opens its own
                for session in sessions:
                    session.close()
    return figures


def plot(path: Path, figures: dict[str, Any], counts: list[int]) -> None:
    """Aggregate tokens/s and samples/s against N, concurrent and serial, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (kind, unit) in zip(axes, UNITS.items(), strict=True):
        for mode, style in (("concurrent", "o-"), ("serial", "s--")):
            values = [figures[kind][str(n)][unit][mode] for n in counts]
            ax.plot(counts, values, style, label=mode)
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts, [str(n) for n in counts])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("sessions (N)")
        ax.set_ylabel(unit.replace("_per_s", "/s") + " (all sessions)")
        ax.set_title(kind)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("One per-client backbone, N sessions: concurrent vs one at a time")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sessions", help="session counts N, comma-separated (1,2,4,8,16)")
    parser.add_argument("--layers", type=int, help="decoder layers (body: all but 2; 16)")
    parser.add_argument("--new-tokens", type=int, help="tokens each session generates (32)")
    parser.add_argument("--prompt-tokens", type=int, help="tokens of each prompt (16)")
    parser.add_argument("--steps", type=int, help="training steps per session and block (3)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per training sample")
    parser.add_argument("--blocks", type=int, help="alternating blocks per mode (3)")
    parser.add_argument("--quick", action="store_true", help="a smoke run (about 30 s)")
    parser.add_argument("--device", default="cpu", help="the backbone's device (cuda:0, ...)")
    parser.add_argument(
        "--client-batch",
        dest="client_batch_window_ms",
        type=float,
        nargs="?",
        const=5.0,
        help="the backbone merges concurrent training passes (client_batch: true), "
        "with this batch_window_ms (5)",
    )
    parser.add_argument("--plot", type=Path, help="the scaling curve, as a PNG")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    for name, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    try:
        counts = sorted({int(n) for n in args.sessions.split(",")})
    except ValueError:
        parser.error(f"--sessions must be comma-separated integers, got {args.sessions!r}")
    if counts[0] < 1:
        parser.error("--sessions must be >= 1")
    if min(args.new_tokens, args.prompt_tokens, args.steps, args.blocks) < 1:
        parser.error("--new-tokens, --prompt-tokens, --steps and --blocks must be >= 1")
    if args.tokens < 2 or args.layers < 3:
        parser.error("--tokens must be >= 2 and --layers >= 3 (head and tail keep one each)")
    _, described = client_half(**{"backbone device": args.device})
    tune_allocator()
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="splitfed-bench-") as tmp:
        root = Path(tmp)
        model = llama_config(
            VOCAB, 256, args.layers, intermediate_size=688, heads=4, kv_heads=4, max_positions=1024
        )
        save_random_llama(root / "model", model)
        figures = run(root, counts, args)
    wall_s = time.perf_counter() - began
    ratios: dict[str, float] = {}
    print(
        f"\n{args.layers} layers; generation {args.new_tokens} tokens per session "
        f"(prompt {args.prompt_tokens}); training {args.steps} steps of 1 x {args.tokens} "
        f"tokens per session; {args.blocks} blocks per mode"
    )
    for kind, unit in UNITS.items():
        shown = unit.replace("_per_s", "/s")
        print(
            f"{kind + ' (' + shown + ')':24} {'serial':>8} {'concurrent':>11} {'ratio':>6} "
            f"{'client cores':>13} {'backbone cores':>15} {'backbone ms/unit':>17} "
            f"{'client limit':>13} {'steps/pass':>11} {'compute ms/unit':>16}"
        )
        for n in counts:
            entry = figures[kind][str(n)]
            rate = entry[unit]
            ratio = rate["concurrent"] / rate["serial"]
            ratios[f"{kind} {n} sessions batched/serial"] = ratio
            print(
                f"{str(n) + ' sessions':24} {rate['serial']:>8.1f} {rate['concurrent']:>11.1f} "
                f"{ratio:>6.2f} {entry['client_cores']['concurrent']:>13.2f} "
                f"{entry['backbone_cores']['concurrent']:>15.2f} "
                f"{entry['backbone_cpu_ms_per_unit']['concurrent']:>17.1f} "
                f"{entry['client_bound_ratio']:>13.2f} "
                f"{entry['steps_per_pass']['concurrent']:>11.2f} "
                f"{entry['device_ms_per_unit']['concurrent']:>16.1f}"
            )
    print(f"\nwall time {wall_s:.0f} s\n")
    if args.plot is not None:
        plot(args.plot, figures, counts)
    report(
        args.json,
        "concurrency",
        ratios,
        machine=described,
        settings={
            "sessions": counts,
            "layers": args.layers,
            "new_tokens": args.new_tokens,
            "prompt_tokens": args.prompt_tokens,
            "steps": args.steps,
            "tokens": args.tokens,
            "blocks": args.blocks,
            "device": args.device,
            "client_batch_window_ms": args.client_batch_window_ms,
        },
        figures=figures,
        wall_s=wall_s,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
