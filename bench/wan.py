"""Split training and generation over emulated internet links (bench/wanlink.py).

The backbone (``splitfed serve backbone``, mutual TLS) runs in one network namespace,
the client (head and tail) in another, joined by a veth pair shaped with ``tc tbf``
and a user-space delay proxy: the profiles ``lan`` (none), ``metro`` (1 Gbit/s, 5 ms
RTT), ``wan`` (100 Mbit/s, 40 ms) and ``poor`` (20 Mbit/s, 100 ms). One backbone serves
every profile; the link is reshaped between them, and each profile's client is a fresh
process inside the client namespace. Like two machines, client and backbone each get
half of the cores (one each on 2 cores) and as many torch threads.

The model is bench/split_step.py's (Llama layout, hidden 512, 8 layers, vocab 32000,
LoRA r=16 on q, k, v, o; k = m = 1). Per profile:

* **split LoRA step**, batch 4 x 256 tokens in 4 micro-batches of 1 x 256: median of
  ``--steps`` steps (after a warm-up) *sequential* (each micro-batch head -> body ->
  tail and back before the next, raw tensors: the step before issue 20) and *pipelined*
  (micro-batches in flight, clients/pipeline.py) with the encodings the SDK's link policy
  picks for the link it measured (clients/links.py). Ratios against ``lan``:
  ``step wan/lan`` and ``step poor/lan`` for both (targets <= 1.25 and <= 1.5 with
  pipelining and the adaptive encoding).
* **generation**: greedy, ``--new-tokens`` tokens for 4 left-padded prompts of 32 tokens
  (one decoding step per token for the batch); steps/s against the floor
  1 / (RTT + per-step compute), the compute being the ``lan`` step time and the RTT the
  harness's measured one (target >= 0.9 of the floor on ``wan``).
* **bytes on the wire** per step and per generated token, for each encoding (raw, bf16,
  int8), read from the veth's counters in the client namespace on ``lan`` (TLS, HTTP/2
  and TCP/IP headers included).

The harness checks itself first: each profile's RTT and throughput, measured through the
same path, within 10 % of its settings.

    python bench/wan.py [--profiles lan,metro,wan,poor] [--steps 6] [--new-tokens 32]
                        [--generations 3] [--quick] [--tiny] [--json PATH]

``--quick``: 2 steps, 4 new tokens, one generation per profile; ``--tiny``: a tiny model
(hidden 64, 3 layers, vocab 1000) and 4 x 32 tokens, for the smoke test.

Needs root (network namespaces); prints why and exits 2 where the harness cannot run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
SERVER_NAME = "backbone.bench.local"
ENCODINGS = ("raw", "bf16", "int8")
TINY_VOCAB = 1000
# Each step variant runs in this many blocks (after two warm-up steps in the first, one
# in the others: a new session's first steps and an encoding switch cost more).
BLOCKS = 3


# --- the client, inside the client namespace -----------------------------------------------


def _interface_bytes() -> tuple[int, int]:
    """(received, sent) bytes of this namespace's veth, from /proc/net/dev."""
    received = sent = 0
    for line in Path("/proc/net/dev").read_text().splitlines()[2:]:
        name, counters = line.split(":", 1)
        if name.strip() == "lo":
            continue
        fields = counters.split()
        received += int(fields[0])
        sent += int(fields[8])
    return received, sent


def _wire_bytes(run: Callable[[], Any]) -> int:
    """Bytes both ways on the namespace's links while ``run`` runs."""
    before = _interface_bytes()
    run()
    after = _interface_bytes()
    return (after[0] - before[0]) + (after[1] - before[1])


def worker(args: argparse.Namespace) -> int:
    import torch
    from common import left_padded_prompts
    from split_step import SplitClient, client_half

    from splitfed.clients.links import AutoEncodings, LinkMeter, WireEncodings, measure_rtt

    class WanClient(SplitClient):
        """SplitClient whose wire encodings are set by name, or chosen by the SDK's link
        policy (clients/links.py: what ``encoding = "auto"`` does in the trainer)."""

        def set_encodings(self, name: str) -> None:
            self.stream.encodings = WireEncodings(name, name)

        def adapt_encodings(self) -> None:
            """Measure the link over a raw pipelined step, then ask the policy."""
            meter = LinkMeter()
            self.stream = TrainStream(self.client, self.session, WireEncodings(), meter=meter)
            self.remote = RemoteBody(self.stream).train()
            self.body = self.remote
            accepted = self.client.model_info().encodings
            auto = AutoEncodings(accepted, lambda: measure_rtt(self.client.model_info), every=1)
            wall = self.step(ids, mask, micro_batches=4, pipelined=True)
            chosen = auto.observe(meter.finish_step(wall))
            self.stream.encodings = chosen or auto.current
            self.estimate = auto.estimate

        def encodings_description(self) -> str:
            return str(self.stream.encodings)

    from splitfed.clients.backbone import (
        BackboneClient,
        GenerateStream,
        RemoteBody,
        RemoteBodyStage,
        TrainStream,
    )
    from splitfed.models.generation import SamplingOptions, SplitGenerator
    from splitfed.models.loading import load_head, load_tail
    from splitfed.protocol.backbone import SessionRequest
    from splitfed.runtime import tune_allocator
    from splitfed.tls import TLSConfig
    from splitfed.transport import create_channel

    threads, _ = client_half()
    tune_allocator()
    root = Path(args.root)
    model = root / "model"
    tls = TLSConfig.from_dir(root / "client")
    gen = torch.Generator().manual_seed(1)
    vocab, tokens = (TINY_VOCAB, 32) if args.tiny else (32000, 256)
    ids = torch.randint(3, vocab, (4, tokens), generator=gen)
    mask = torch.ones_like(ids)
    prompts, prompt_mask = left_padded_prompts(gen)
    prompts = prompts % vocab
    figures: dict[str, Any] = {"profile": args.worker, "threads": threads}
    with create_channel(args.address, tls, server_name=SERVER_NAME) as channel:
        client = BackboneClient(channel)

        def step_times(split: WanClient, pipelined: bool, count: int, warmup: int) -> list[float]:
            for _ in range(warmup):
                split.step(ids, mask, micro_batches=4, pipelined=pipelined)
            return [
                split.step(ids, mask, micro_batches=4, pipelined=pipelined) for _ in range(count)
            ]

        split = WanClient(model, client)
        split.adapt_encodings()
        adapted = split.stream.encodings
        figures["encodings"] = str(adapted)
        if split.estimate is not None:
            figures["link_estimate"] = vars(split.estimate)
        steps: dict[str, list[float]] = {}
        for block in range(BLOCKS):  # alternating blocks: drifts of the machine hit all
            for name, pipelined, encodings in (
                ("sequential", False, WireEncodings()),
                ("pipelined raw", True, WireEncodings()),
                ("pipelined", True, adapted),
            ):
                split.stream.encodings = encodings
                steps.setdefault(name, []).extend(
                    step_times(
                        split, pipelined, max(1, args.steps // BLOCKS), 2 if block == 0 else 1
                    )
                )
        figures["step_s"] = {name: statistics.median(times) for name, times in steps.items()}
        figures["step_raw_s"] = steps
        split.close()

        head, tail = load_head(model), load_tail(model)
        options = SamplingOptions(max_new_tokens=args.new_tokens)

        def generation(encoding: str) -> tuple[SplitGenerator, GenerateStream, str]:
            request = SessionRequest(k=1, m=1, encoding=encoding)
            session = client.open_session(request).session_id
            stream = GenerateStream(client, session, encoding)
            return SplitGenerator(head, RemoteBodyStage(stream), tail), stream, session

        generator, stream, session = generation("raw")
        generator.generate(prompts, prompt_mask, options)  # warm-up
        times = []
        for _ in range(args.generations):
            start = time.perf_counter()
            generator.generate(prompts, prompt_mask, options)
            times.append(time.perf_counter() - start)
        stream.close()
        client.close_session(session)
        figures["generation_step_s"] = statistics.median(times) / args.new_tokens
        figures["generation_raw_s"] = times

        def wire_bytes(encoding: str) -> tuple[float, float]:
            """Bytes on the wire of a pipelined step and of one generated token (both
            directions) with every tensor in ``encoding``."""
            split = WanClient(model, client)
            split.set_encodings(encoding)
            split.step(ids, mask, micro_batches=4, pipelined=True)
            step = _wire_bytes(lambda: split.step(ids, mask, micro_batches=4, pipelined=True))
            split.close()
            generator, stream, session = generation(encoding)
            one = SamplingOptions(max_new_tokens=1)
            prompt_only = _wire_bytes(lambda: generator.generate(prompts, prompt_mask, one))
            whole = _wire_bytes(lambda: generator.generate(prompts, prompt_mask, options))
            stream.close()
            client.close_session(session)
            return step, (whole - prompt_only) / (args.new_tokens - 1)

        if args.wire_bytes:
            per_step: dict[str, float] = {}
            per_token: dict[str, float] = {}
            for encoding in ENCODINGS:
                per_step[encoding], per_token[encoding] = wire_bytes(encoding)
            figures["bytes_per_step"] = per_step
            figures["bytes_per_token"] = per_token
    Path(args.out).write_text(json.dumps(figures))
    return 0


# --- the orchestrator ------------------------------------------------------------------------


def _certificates(root: Path) -> None:
    from splitfed.security.ca import CertificateAuthority

    ca = CertificateAuthority.create("bench CA")
    ca.issue("backbone-0", "backbone", dns_names=[SERVER_NAME]).write(root / "tls")
    ca.issue("bench", "client").write(root / "client")


def _run_worker(link: Any, address: str, root: Path, profile: str, args: Any) -> dict[str, Any]:
    out = root / f"{profile}.json"
    argv = [
        sys.executable,
        str(BENCH / "wan.py"),
        "--worker",
        profile,
        "--address",
        address,
        "--root",
        str(root),
        "--out",
        str(out),
        "--steps",
        str(args.steps),
        "--new-tokens",
        str(args.new_tokens),
        "--generations",
        str(args.generations),
        *(["--wire-bytes"] if profile == "lan" else []),
        *(["--tiny"] if args.tiny else []),
    ]
    subprocess.run(link.command("client", argv), check=True, cwd=BENCH, timeout=900)
    figures: dict[str, Any] = json.loads(out.read_text())
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--profiles", default="lan,metro,wan,poor")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer steps and tokens")
    parser.add_argument(
        "--tiny", action="store_true", help="a tiny model and 4 x 32 tokens (a smoke test)"
    )
    parser.add_argument("--json", type=Path)
    # The client's side, run by the orchestrator inside the client namespace.
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--wire-bytes", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.quick:
        args.steps, args.new_tokens, args.generations = 2, 4, 1
    if args.steps < 2 or args.new_tokens < 2 or args.generations < 1:
        parser.error("--steps and --new-tokens must be >= 2, --generations >= 1")
    from wanlink import PROFILES, WanLink, unavailable

    names = args.profiles.split(",")
    unknown = set(names) - set(PROFILES)
    if unknown or "lan" not in names:
        parser.error(f"--profiles: lan and some of {', '.join(PROFILES)} (unknown: {unknown})")
    reason = unavailable()
    if reason is not None:
        print(f"bench/wan.py cannot run here: {reason}", file=sys.stderr)
        return 2
    import torch
    from common import llama_512x8, machine, report, save_random_llama
    from split_step import ALL_CORES, pin

    from splitfed.cli.launcher import ServiceProcess
    from splitfed.models.tiny import llama_config

    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    described = machine(load=load, cores=len(ALL_CORES))
    started = time.monotonic()
    figures: dict[str, Any] = {"profiles": {}, "checks": {}}
    with tempfile.TemporaryDirectory(prefix="splitfed-wan-") as tmp:
        root = Path(tmp)
        os.chmod(root, 0o755)
        torch.set_num_threads(1)
        if args.tiny:
            config = llama_config(TINY_VOCAB, 64, 3, heads=4, kv_heads=4)
        else:
            config = llama_512x8()
        save_random_llama(root / "model", config)
        _certificates(root)
        with WanLink(PROFILES["lan"]) as link:
            (root / "backbone.yaml").write_text(
                f"backbone:\n  model_path: {json.dumps(str(root / 'model'))}\n"
                f"server:\n  tls_dir: {json.dumps(str(root / 'tls'))}\n"
                f"  listen: {json.dumps(f'{link.server_ip}:0')}\n"
            )
            server = ServiceProcess(
                "backbone",
                ["serve", "backbone", "--config", str(root / "backbone.yaml")],
                prefix=link.command("server", []),
            )
            server.start(timeout_s=300)
            try:
                pin(server.pid, second_half=True)
                # A fresh backbone's first client runs its steps ~30 % slower for a while
                # (measured: a second client of the same backbone, same link, does not):
                # one short client first, not measured.
                warm = argparse.Namespace(**{**vars(args), "steps": 2, "generations": 1})
                _run_worker(link, link.connect(server.port), root, "warm-up", warm)
                for name in names:
                    link.set_profile(PROFILES[name])
                    check = link.check()
                    figures["checks"][name] = {
                        "rtt_ms": check.rtt_ms,
                        "up_mbit": check.up_mbit,
                        "down_mbit": check.down_mbit,
                        "within_10_percent": check.within(),
                    }
                    print(f"{name:6} harness check: {check.summary()}", flush=True)
                    address = link.connect(server.port)
                    figures["profiles"][name] = _run_worker(link, address, root, name, args)
                    print(_profile_line(name, figures["profiles"][name]), flush=True)
            finally:
                server.stop()
    figures["seconds"] = time.monotonic() - started
    ratios = _ratios(figures, names)
    print(f"\nbench/wan.py took {figures['seconds']:.0f} s\n")
    report(args.json, "wan", ratios, machine=described, figures=figures)
    return 0


def _profile_line(name: str, figures: dict[str, Any]) -> str:
    steps = figures["step_s"]
    return (
        f"{name:6} step: sequential raw {steps['sequential']:.3f} s, pipelined raw "
        f"{steps['pipelined raw']:.3f} s, pipelined {figures['encodings']} "
        f"{steps['pipelined']:.3f} s; generation {1 / figures['generation_step_s']:.1f} "
        f"steps/s ({4 / figures['generation_step_s']:.1f} tokens/s)"
    )


def _ratios(figures: dict[str, Any], names: list[str]) -> dict[str, float]:
    profiles, checks = figures["profiles"], figures["checks"]
    lan = profiles["lan"]
    ratios: dict[str, float] = {}
    for name in names:
        if name == "lan":
            continue
        steps = profiles[name]["step_s"]
        ratios[f"step {name}/lan"] = steps["pipelined"] / lan["step_s"]["pipelined"]
        for variant in ("sequential", "pipelined raw"):
            ratios[f"step {name}/lan {variant}"] = steps[variant] / lan["step_s"][variant]
    compute = lan["generation_step_s"]
    for name in names:
        floor = 1.0 / (checks[name]["rtt_ms"] / 1000 + compute)
        ratios[f"generation {name} steps/s / floor"] = (
            1.0 / profiles[name]["generation_step_s"] / floor
        )
    for encoding, nbytes in lan.get("bytes_per_step", {}).items():
        ratios[f"bytes per step {encoding}/raw"] = nbytes / lan["bytes_per_step"]["raw"]
    return ratios


if __name__ == "__main__":
    sys.exit(main())
