"""Peak memory of the aggregator while it aggregates many uploads of one adapter.

The aggregator runs in its own process (``splitfed serve aggregator``, mutual TLS on
loopback) with one federation: one round, fedavg, that waits for ``--clients`` clients
(50). This process plays the clients, each with its own client certificate and channel:
all join, then each uploads a seeded random delta of a LoRA-shaped adapter of
``--adapter-mib`` MiB (20, float32, in ``--tensors`` tensors) with its own sample count,
``--concurrency`` uploads at a time (4). The round closes on the last upload and writes
version 1.

* memory: the aggregator's resident set (``/proc/<pid>/status``) once it has started and
  every client has joined (*baseline*), then its peak through the uploads and the close:
  ``VmHWM`` (reset to the baseline through ``/proc/<pid>/clear_refs`` where the kernel
  allows it, else the peak since start) and the highest ``VmRSS`` sampled every
  ``--sample-ms`` ms. Ratio (peak - baseline) / adapter bytes (target < 3).
* correctness: version 1 (``versions/v1.safetensors`` in the aggregator's state) must be
  the sample-weighted average of the uploaded deltas within 1e-5, its contributors those
  of the uploads; this process sums the deltas in float64 as they go out, one adapter at a
  time. A wrong result exits with status 1; a missed ratio does not (a benchmark reports).

    python bench/aggregator_memory.py [--clients 50] [--adapter-mib 20] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from common import machine, report
from safetensors import safe_open
from safetensors.numpy import load_file

from splitfed.cli.launcher import ServiceProcess
from splitfed.clients.federated import AggregatorClient
from splitfed.runtime import tune_allocator
from splitfed.security.ca import CertificateAuthority
from splitfed.tls import TLSConfig
from splitfed.transport import create_channel
from splitfed.v1 import aggregator_pb2

SERVER_NAME = "aggregator.bench.local"
FEDERATION = "bench"
RANK = 16
TOLERANCE = 1e-5
MiB = 1 << 20


def adapter_shapes(adapter_bytes: float, tensors: int) -> dict[str, tuple[int, int]]:
    """LoRA-like tensors (A: r x in, B: out x r on q/v of successive layers), as equal in
    size as the rank allows, together at most ``adapter_bytes`` of float32."""
    if tensors < 2 or tensors % 2:
        raise ValueError(f"--tensors must be an even number >= 2, got {tensors}")
    width = int(adapter_bytes) // 4 // tensors // RANK
    if width < 1:
        raise ValueError(f"an adapter of {adapter_bytes} bytes is too small for {tensors} tensors")
    shapes: dict[str, tuple[int, int]] = {}
    for index in range(tensors // 2):
        layer, proj = divmod(index, 2)
        prefix = f"model.layers.{layer}.self_attn.{'qv'[proj]}_proj"
        shapes[f"{prefix}.lora_A.weight"] = (RANK, width)
        shapes[f"{prefix}.lora_B.weight"] = (width, RANK)
    return shapes


def client_delta(
    seed: int, index: int, shapes: dict[str, tuple[int, int]]
) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return {
        name: torch.randn(shape, generator=generator, dtype=torch.float32) * 0.01
        for name, shape in shapes.items()
    }


def client_samples(seed: int, index: int) -> int:
    return int(np.random.default_rng([seed, index]).integers(8, 513))


def proc_status(pid: int) -> dict[str, int]:
    """The kB figures (and thread count) of ``/proc/<pid>/status``."""
    out = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in {"VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"}:
                out[key] = int(value.split()[0])
    return out


def reset_peak(pid: int) -> bool:
    """Reset ``pid``'s VmHWM to its current VmRSS (Linux >= 4.0); False if not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


class RssSampler:
    """Samples a process's VmRSS every ``period_s`` in a thread; keeps the peak."""

    def __init__(self, pid: int, period_s: float) -> None:
        self.pid = pid
        self.period_s = period_s
        self.peak_kb = 0
        self.peak_threads = 0
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._start = 0.0

    def __enter__(self) -> RssSampler:
        self._start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            status = proc_status(self.pid)
            self.peak_kb = max(self.peak_kb, status["VmRSS"])
            self.peak_threads = max(self.peak_threads, status["Threads"])
            self.samples.append((round(time.perf_counter() - self._start, 3), status["VmRSS"]))
            if self._stop.wait(self.period_s):
                return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--adapter-mib", type=float, default=20.0)
    parser.add_argument("--tensors", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--sample-ms", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-lean-memory",
        action="store_true",
        help="run the aggregator with lean_memory = false (its throughput settings)",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.clients < 1 or args.concurrency < 1 or args.sample_ms <= 0:
        parser.error("--clients and --concurrency must be >= 1, --sample-ms positive")
    try:
        shapes = adapter_shapes(args.adapter_mib * MiB, args.tensors)
    except ValueError as exc:
        parser.error(str(exc))
    adapter_bytes = sum(4 * r * c for r, c in shapes.values())
    described = machine(grpc=grpc.__version__)
    print(
        f"{args.clients} clients, adapter {adapter_bytes / MiB:.2f} MiB in {len(shapes)} "
        f"float32 tensors, {args.concurrency} uploads at a time"
    )
    tune_allocator()
    with tempfile.TemporaryDirectory(prefix="splitfed-bench-") as tmp:
        figures = run(Path(tmp), shapes, adapter_bytes, args)
    growth_kb = figures["peak_kb"] - figures["baseline_kb"]
    ratio = growth_kb * 1024 / adapter_bytes
    ratios = {"aggregator peak rss growth/adapter": ratio}
    figures.update(adapter_bytes=adapter_bytes, growth_kb=growth_kb)

    def mib(kb: int) -> str:
        return f"{kb / 1024:10.1f}"

    print(f"\n{'aggregator memory':44} {'MiB':>10}")
    print(f"{'adapter (one upload)':44} {adapter_bytes / MiB:10.1f}")
    print(f"{'baseline VmRSS (started, all joined)':44} {mib(figures['baseline_kb'])}")
    hwm = "VmHWM since baseline" if figures["hwm_reset"] else "VmHWM since start"
    print(f"{'peak ' + hwm:44} {mib(figures['hwm_kb'])}")
    sampled = f"peak VmRSS sampled every {args.sample_ms:g} ms"
    print(f"{sampled:44} {mib(figures['sampled_peak_kb'])}")
    print(f"{'VmRSS after the round closed':44} {mib(figures['after_kb'])}")
    print(f"{'peak - baseline':44} {mib(growth_kb)}")
    print(
        f"\nuploads: {figures['upload_s']:.1f} s ({figures['upload_mb_s']:.0f} MB/s); "
        f"aggregator threads: {figures['threads_baseline']} -> {figures['peak_threads']}; "
        f"version 1 max |error| {figures['max_abs_error']:.2e} (tolerance {TOLERANCE:g})"
    )
    report(
        args.json,
        "aggregator_memory",
        ratios,
        machine=described,
        settings={k: str(v) for k, v in vars(args).items() if k != "json"},
        figures=figures,
    )
    if figures["errors"]:
        for error in figures["errors"]:
            print(f"WRONG: {error}", file=sys.stderr)
        return 1
    return 0


def run(
    root: Path, shapes: dict[str, tuple[int, int]], adapter_bytes: int, args: argparse.Namespace
) -> dict[str, Any]:
    ca = CertificateAuthority.create("bench CA")
    ca.issue("aggregator-0", "aggregator", dns_names=[SERVER_NAME]).write(root / "tls")
    settings = {
        "name": FEDERATION,
        "rounds": 1,
        "min_clients": args.clients,
        "start_clients": args.clients,
        "local_steps": 1,
        "strategy": "fedavg",
        "deadline_s": 3600.0,
        "members": [f"client-{index:03d}" for index in range(args.clients)],
        "schema": {name: list(shape) for name, shape in shapes.items()},
    }
    state_dir = root / "state"
    (root / "aggregator.yaml").write_text(
        "aggregator:\n"
        f"  state_dir: {json.dumps(str(state_dir))}\n"
        f"  federations: [{json.dumps(settings)}]\n"
        f"  lean_memory: {json.dumps(not args.no_lean_memory)}\n"
        "server:\n"
        f"  tls_dir: {json.dumps(str(root / 'tls'))}\n"
    )
    server = ServiceProcess(
        "aggregator",
        ["serve", "aggregator", "--config", str(root / "aggregator.yaml")],
        log_path=root / "aggregator.log",
    )
    address = server.start(timeout_s=120)
    channels: list[grpc.Channel] = []
    try:
        clients = []
        for index in range(args.clients):
            issued = ca.issue(f"client-{index:03d}", "client")
            assert issued.key_pem is not None
            tls = TLSConfig(ca.cert_pem, issued.cert_pem, issued.key_pem)
            channels.append(create_channel(address, tls, server_name=SERVER_NAME))
            clients.append(AggregatorClient(channels[-1], timeout_s=600.0))
        for index, client in enumerate(clients):
            client.join(FEDERATION, client_samples(args.seed, index))
        plans = [client.plan(FEDERATION) for client in clients]
        if any(p.phase != aggregator_pb2.ROUND_PHASE_UPLOAD or not p.selected for p in plans):
            raise RuntimeError("the round did not open for every client after all joined")
        time.sleep(0.5)  # let start-up and join work settle before the baseline
        baseline = proc_status(server.pid)
        hwm_reset = reset_peak(server.pid)

        expected = {name: np.zeros(shape, dtype=np.float64) for name, shape in shapes.items()}
        lock = threading.Lock()
        samples: dict[str, int] = {}
        errors: list[str] = []

        def upload(index: int) -> None:
            delta = client_delta(args.seed, index, shapes)
            count = client_samples(args.seed, index)
            response = clients[index].upload(plans[index], count, delta)
            with lock:
                if response.duplicate:
                    errors.append(f"client-{index:03d}: upload counted as a duplicate")
                samples[f"client-{index:03d}"] = count
                for name, tensor in delta.items():
                    expected[name] += tensor.numpy().astype(np.float64) * count

        start = time.perf_counter()
        with (
            RssSampler(server.pid, args.sample_ms / 1000) as sampler,
            ThreadPoolExecutor(args.concurrency, thread_name_prefix="upload") as pool,
        ):
            for future in [pool.submit(upload, i) for i in range(args.clients)]:
                future.result()
            upload_s = time.perf_counter() - start
            final = clients[0].plan(FEDERATION)
            time.sleep(0.5)  # the close runs in the last upload; sample a little after it
        peak = proc_status(server.pid)
        wrong, max_abs_error = check_version(state_dir, expected, samples)
        errors += wrong
        if final.global_version != 1:
            errors.append(f"the federation is at version {final.global_version}, not 1")
    finally:
        for channel in channels:
            channel.close()
        server.stop()
    return {
        "baseline_kb": baseline["VmRSS"],
        "baseline_rss_anon_kb": baseline["RssAnon"],
        "threads_baseline": baseline["Threads"],
        "hwm_reset": hwm_reset,
        "hwm_kb": peak["VmHWM"],
        "sampled_peak_kb": sampler.peak_kb,
        "peak_kb": max(peak["VmHWM"], sampler.peak_kb),
        "after_kb": peak["VmRSS"],
        "after_rss_anon_kb": peak["RssAnon"],
        "peak_threads": sampler.peak_threads,
        "upload_s": upload_s,
        "upload_mb_s": args.clients * adapter_bytes / upload_s / 1e6,
        "lean_memory": not args.no_lean_memory,
        "max_abs_error": max_abs_error,
        "errors": errors,
        "rss_samples": sampler.samples,
    }


def check_version(
    state_dir: Path, expected: dict[str, np.ndarray[Any, Any]], samples: dict[str, int]
) -> tuple[list[str], float]:
    """What is wrong with version 1 against the sample-weighted average (nothing: []),
    and its largest absolute error."""
    path = state_dir / FEDERATION / "versions" / "v1.safetensors"
    if not path.is_file():
        return [f"{path} was not written"], float("nan")
    errors = []
    with safe_open(str(path), framework="numpy") as handle:
        contributors = json.loads((handle.metadata() or {}).get("contributors", "{}"))
    if contributors != samples:
        errors.append(f"version 1 names contributors {contributors}, not the uploads {samples}")
    got = load_file(str(path))
    if set(got) != set(expected):
        errors.append(f"version 1 holds tensors {sorted(got)}, not {sorted(expected)}")
    total = sum(samples.values())
    worst = 0.0
    for name, weighted_sum in expected.items():
        value = got.get(name)
        if value is None:
            continue
        if value.shape != weighted_sum.shape or value.dtype != np.float32:
            errors.append(f"{name}: {value.dtype} {value.shape}, not float32 {weighted_sum.shape}")
            continue
        gap = float(np.abs(value.astype(np.float64) - weighted_sum / total).max())
        worst = max(worst, gap)
        if gap > TOLERANCE:
            errors.append(f"{name}: off the weighted average by up to {gap:.3g}")
    return errors, worst


if __name__ == "__main__":
    sys.exit(main())
