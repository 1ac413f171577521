"""Four clients against one backbone: client-batch against serial sessions.

A Llama-layout model (hidden 256, ``--layers`` decoder layers, vocab 8000) with LoRA
r=16 on q, k, v, o; the backbone, in adapter mode "shared", runs in its own process
(``splitfed serve backbone``) on loopback with mutual TLS; the four clients (head and
tail, k = m = 1, so the body holds all layers but two) are threads of this process,
each with its own channel, session and Train stream, each stepping on its own fixed
batch of ``--batch`` x ``--tokens`` tokens. As two machines would, backbone and clients
each get half of the cores (one each on 2 cores) and as many torch threads;
``--device`` puts the backbone's model on a GPU instead.

* client-batch: a backbone with ``client_batch`` on (window ``--window-ms``); the four
  clients step concurrently, and each round of their steps runs as one merged forward,
  one merged backward and one optimizer step on the backbone.
* serial: a backbone with ``client_batch`` off; the clients take turns, one whole step
  at a time (in shared mode without client-batch, concurrent steps would interleave a
  session's forward and backward with another session's optimizer step).

Both do the same work: ``--rounds`` steps per client, in ``--blocks`` alternating blocks
per mode (serial, client-batch, serial, ...) after a warm-up round of each; samples/s = samples
of all clients / wall seconds. Ratio client-batch/serial samples/s (target >= 1.3 on 2
cores). The client-batch backbone's debug log gives how many sessions each merged job
held and how long it took.

    python bench/parallel.py [--rounds 16] [--blocks 4] [--layers 16] [--batch 1]
                             [--tokens 32] [--window-ms 50] [--device cpu] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from common import report, save_random_llama
from split_step import SERVER_NAME, SplitClient, client_half, pin

from splitfed.cli.launcher import ServiceProcess
from splitfed.clients.backbone import BackboneClient
from splitfed.models.tiny import llama_config
from splitfed.runtime import tune_allocator
from splitfed.security.ca import CertificateAuthority
from splitfed.tls import TLSConfig
from splitfed.transport import create_channel

CLIENTS = 4
VOCAB = 8000
MODES = ("serial", "client-batch")


@contextmanager
def backbone(root: Path, mode: str, window_ms: float, device: str) -> Iterator[str]:
    """A backbone for ``mode`` on the second half of the cores; yields its address."""
    config = root / f"{mode}.yaml"
    config.write_text(
        "backbone:\n"
        f"  model_path: {json.dumps(str(root / 'model'))}\n"
        f"  device: {json.dumps(device)}\n"
        "  adapter_mode: shared\n"
        f"  client_batch: {json.dumps(mode == 'client-batch')}\n"
        f"  batch_window_ms: {window_ms}\n"
        f"server:\n  tls_dir: {json.dumps(str(root / 'tls'))}\n"
    )
    threads = pin(os.getpid(), second_half=True)  # the child inherits these cores
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    # Debug logs (both modes alike) name the sessions of every merged pass.
    server = ServiceProcess(
        f"backbone-{mode}",
        ["--log-level", "debug", "serve", "backbone", "--config", str(config)],
        log_path=root / f"{mode}.log",
        env=env,
    )
    try:
        address = server.start(timeout_s=300)
    finally:
        pin(os.getpid(), second_half=False)
    try:
        yield address
    finally:
        server.stop()


def merged_jobs(log: Path) -> dict[str, list[tuple[int, float]]]:
    """(sessions, milliseconds) of every merged job, from the client-batch backbone's
    debug log, by kind: forward, backward, step."""
    pattern = r"\[Backbone\.Train\] merged step \d+ (\w+)[^:]*: (\d+) sessions, ([\d.]+) ms"
    jobs: dict[str, list[tuple[int, float]]] = {"forward": [], "backward": [], "optimizer": []}
    for kind, sessions, ms in re.findall(pattern, log.read_text()):
        jobs[kind].append((int(sessions), float(ms)))
    return jobs


def inputs(index: int, batch: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(index)
    ids = torch.randint(3, VOCAB, (batch, tokens), generator=gen)
    return ids, torch.ones_like(ids)


def run_rounds(
    mode: str, clients: list[SplitClient], data: list[tuple[torch.Tensor, torch.Tensor]], n: int
) -> float:
    """Seconds for ``n`` steps of every client: concurrently (client-batch) or in turns."""
    start = time.perf_counter()
    if mode == "serial":
        for _ in range(n):
            for client, (ids, mask) in zip(clients, data, strict=True):
                client.step(ids, mask)
        return time.perf_counter() - start
    errors: list[BaseException] = []

    def worker(client: SplitClient, ids: torch.Tensor, mask: torch.Tensor) -> None:
        try:
            for _ in range(n):
                client.step(ids, mask)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [
        threading.Thread(target=worker, args=(client, *batch))
        for client, batch in zip(clients, data, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=16, help="steps per client and mode")
    parser.add_argument("--batch", type=int, default=1, help="sequences per client step")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per sequence")
    parser.add_argument("--layers", type=int, default=16, help="decoder layers (body: all but 2)")
    parser.add_argument("--blocks", type=int, default=4, help="alternating blocks per mode")
    parser.add_argument("--window-ms", type=float, default=50.0)
    parser.add_argument("--device", default="cpu", help="the backbone's device (cuda:0, ...)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.blocks < 1 or args.rounds < args.blocks or args.rounds % args.blocks:
        parser.error("--rounds must be a positive multiple of --blocks")
    if args.batch < 1 or args.tokens < 2 or args.window_ms < 0:
        parser.error("--batch >= 1, --tokens >= 2, --window-ms >= 0")
    if args.layers < 3:
        parser.error("--layers must be >= 3 (head and tail keep one each)")
    _, described = client_half(**{"backbone device": args.device})
    tune_allocator()
    with tempfile.TemporaryDirectory(prefix="splitfed-bench-") as tmp:
        root = Path(tmp)
        model = llama_config(
            VOCAB, 256, args.layers, intermediate_size=688, heads=4, kv_heads=4, max_positions=1024
        )
        save_random_llama(root / "model", model)
        ca = CertificateAuthority.create("bench CA")
        ca.issue("backbone-0", "backbone", dns_names=[SERVER_NAME]).write(root / "tls")
        me = ca.issue("bench", "client")
        assert me.key_pem is not None
        tls = TLSConfig(ca.cert_pem, me.cert_pem, me.key_pem)
        with (
            backbone(root, "serial", args.window_ms, args.device) as serial_address,
            backbone(root, "client-batch", args.window_ms, args.device) as batch_address,
        ):
            addresses = {"serial": serial_address, "client-batch": batch_address}
            figures = run(root / "model", addresses, tls, args)
        figures["merged_jobs"] = merged_jobs(root / "client-batch.log")
    samples = figures["samples_per_s"]
    ratio = samples["client-batch"] / samples["serial"]
    print(
        f"\n{CLIENTS} clients x {args.batch} x {args.tokens} tokens, {args.rounds} steps "
        f"each per mode (window {args.window_ms:g} ms)"
    )
    print(f"{'':16} {'samples/s':>10} {'blocks (samples/s)':>24}")
    for mode in MODES:
        blocks = ", ".join(f"{value:.1f}" for value in figures["blocks"][mode])
        print(f"{mode:16} {samples[mode]:>10.1f} {blocks:>24}")
    for kind, jobs in figures["merged_jobs"].items():
        if jobs:
            sessions = sum(n for n, _ in jobs) / len(jobs)
            ms = sorted(t for _, t in jobs)[len(jobs) // 2]
            print(
                f"client-batch {kind}: {len(jobs)} merged jobs, {sessions:.2f} sessions and "
                f"{ms:.1f} ms each (median; warm-up included)"
            )
    print()
    report(
        args.json,
        "parallel",
        {"parallel client-batch/serial samples/s": ratio},
        machine=described,
        settings={
            "clients": CLIENTS,
            "rounds": args.rounds,
            "blocks": args.blocks,
            "batch": args.batch,
            "tokens": args.tokens,
            "layers": args.layers,
            "window_ms": args.window_ms,
        },
        figures=figures,
    )
    return 0


def run(
    path: Path, addresses: dict[str, str], tls: TLSConfig, args: argparse.Namespace
) -> dict[str, Any]:
    data = [inputs(index, args.batch, args.tokens) for index in range(CLIENTS)]
    channels = []
    clients: dict[str, list[SplitClient]] = {}
    try:
        for mode in MODES:
            clients[mode] = []
            for _ in range(CLIENTS):
                channel = create_channel(addresses[mode], tls, server_name=SERVER_NAME)
                channels.append(channel)
                clients[mode].append(SplitClient(path, BackboneClient(channel)))
        for mode in MODES:  # warm-up
            run_rounds(mode, clients[mode], data, 1)
        # serial, client-batch, serial, client-batch, ...: drifts of the machine hit both
        blocks = args.blocks
        per_block = args.rounds // blocks
        seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
        for _ in range(blocks):
            for mode in MODES:
                seconds[mode].append(run_rounds(mode, clients[mode], data, per_block))
        for mode in MODES:
            for client in clients[mode]:
                client.stream.close()
    finally:
        for channel in channels:
            channel.close()
    block_samples = CLIENTS * per_block * args.batch
    return {
        "samples_per_s": {mode: blocks * block_samples / sum(seconds[mode]) for mode in MODES},
        "blocks": {mode: [block_samples / s for s in seconds[mode]] for mode in MODES},
        "seconds": seconds,
    }


if __name__ == "__main__":
    sys.exit(main())
