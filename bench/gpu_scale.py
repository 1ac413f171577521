"""Split against centralized, and many sessions on one backbone, at 7B scale on one GPU.

A Llama-2-7B-shaped model (``--config 7b``: the real Llama-2-7b config, random bf16
weights made on the device, never downloaded; ``--config tiny``: 4 layers of hidden 64,
for testing on a CPU) with LoRA r=16 on q, k, v, o. The backbone runs in its own process
(``splitfed serve backbone``, adapter mode per-client, ``--device``) on loopback with
mutual TLS, as a service would; this process holds the clients (head and tail, k = m = 1)
on the same device: on one host the GPU is the only place where a 7B model's embedding,
a decoder layer and the 32000-way LM head run in time, and a client of a 7B backbone
would have an accelerator of its own. The clients' tensors cross to the CPU for the wire
(the client library sends and returns CPU tensors) and back. The centralized baselines
are the whole model in this process, on the same device.

Phases (each writes the JSON so far, so a run cut short still leaves its figures):

* step: forward + backward + AdamW step with global-norm clipping on ``--batch`` x
  ``--tokens`` tokens, split (head -> body over the Train stream -> tail) against the
  unsplit model; medians of ``--rounds`` steps each in alternating blocks; ratio
  ``split/centralized step`` (target <= 1.10).
* generate: greedy, ``--new-tokens`` tokens for 4 left-padded prompts of 32 tokens,
  SplitGenerator (body over the Generate stream) against Hugging Face ``generate``;
  ratio ``split/generate tokens/s``.
* sessions: N concurrent generating sessions (``--sessions-gen``; each its own channel,
  stream and thread, 1 prompt of ``--session-prompt`` tokens, ``--session-new-tokens``
  new ones) and N concurrent training sessions (``--sessions-train``; each its own
  channel, adapters and optimizer, ``--train-batch`` x ``--train-tokens`` tokens,
  ``--train-steps`` steps); aggregate tokens/s and samples/s against the serial
  aggregate: the first ``--serial-sessions`` sessions served one at a time (one at a
  time, a session's rate does not depend on how many wait). Ratios
  ``generation N sessions concurrent/serial`` (target for 16: >= 8) and ``training N
  sessions concurrent/serial`` (target for 8: >= 4). Memory per session: the device's
  used memory (all processes: torch.cuda.mem_get_info) at its peak in the phase above
  the level before the session phases, over N, and this process's
  torch.cuda.max_memory_allocated above its level at the phase's start, over N.

    python bench/gpu_scale.py [--config 7b|tiny] [--device cuda|cpu] [--quick]
        [--sessions-gen 1,4,16,32] [--sessions-train 1,4,8] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from common import greedy_generate, left_padded_prompts, machine, report
from split_step import (
    ADAPTER,
    OPTIMIZER,
    SERVER_NAME,
    SplitClient,
    centralized_step,
    lora_params,
)
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from splitfed.cli.launcher import ServiceProcess
from splitfed.clients.backbone import (
    BackboneClient,
    GenerateStream,
    RemoteBody,
    RemoteBodyStage,
)
from splitfed.models.generation import SamplingOptions, SplitGenerator
from splitfed.models.loading import load_head, load_tail
from splitfed.models.optim import (
    build_optimizer,
)
from splitfed.models.tiny import llama_config
from splitfed.protocol.backbone import SessionRequest
from splitfed.runtime import tune_allocator
from splitfed.security.ca import CertificateAuthority
from splitfed.tls import TLSConfig
from splitfed.transport import create_channel

VOCAB = 32000
GIB = 1 << 30
START = time.perf_counter()


def llama2_7b() -> LlamaConfig:
    """meta-llama/Llama-2-7b-hf's config.json, written out (pad id 0 added: the prompts
    are left-padded with it)."""
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        hidden_act="silu",
        max_position_embeddings=4096,
        initializer_range=0.02,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def tiny() -> LlamaConfig:
    return llama_config(
        VOCAB, 64, 4, intermediate_size=128, heads=4, kv_heads=4, max_positions=1024
    )


CONFIGS: dict[str, Callable[[], LlamaConfig]] = {"7b": llama2_7b, "tiny": tiny}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def say(message: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp} +{time.perf_counter() - START:6.1f}s] {message}", flush=True)


class Clock:
    """Wall seconds that include the device's queued work."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


class Results:
    """The JSON document, rewritten after every phase (``partial`` until the end)."""

    def __init__(self, path: Path | None, **parts: Any) -> None:
        self.path = path
        self.parts: dict[str, Any] = {**parts, "figures": {}}
        self.ratios: dict[str, float] = {}
        self.write()  # the machine and settings, even if nothing else comes

    def phase(self, name: str, figures: dict[str, Any], ratios: dict[str, float]) -> None:
        self.parts["figures"][name] = figures
        for what, value in ratios.items():
            if what not in self.ratios:
                say(f"{name}: {what} = {value:.3f}")
        self.ratios.update(ratios)
        self.write()

    def write(self) -> None:
        if self.path is not None:
            document = {"benchmark": "gpu_scale", "partial": True, **self.parts}
            document["ratios"] = self.ratios
            self.path.write_text(json.dumps(document, indent=2) + "\n")

    def final(self) -> None:
        report(self.path, "gpu_scale", self.ratios, partial=False, **self.parts)


# --- models -------------------------------------------------------------------------


def random_model(config: LlamaConfig, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    """A random-initialised (seed 0) model made directly in ``dtype`` on ``device``: no
    fp32 copy in host memory."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model


class OnDevice(nn.Module):
    """The remote body for clients on ``device``: the wire takes and gives CPU tensors."""

    def __init__(self, body: RemoteBody, device: torch.device) -> None:
        super().__init__()
        self.body = body
        self.device = device

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        output: torch.Tensor = self.body(hidden.cpu(), attention_mask.cpu())
        return output.to(self.device)


class StageOnDevice:
    """RemoteBodyStage for a SplitGenerator on ``device``."""

    def __init__(self, stage: RemoteBodyStage, device: torch.device) -> None:
        self.stage = stage
        self.device = device

    def step(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        output: torch.Tensor = self.stage.step(hidden.cpu(), attention_mask.cpu())
        return output.to(self.device)

    def reset(self) -> None:
        self.stage.reset()


class TrainingClient(SplitClient):
    """One data owner: the split step of bench/split_step.py with its own head and tail
    (with LoRA) on ``device``, session, Train stream and optimizer; h1, h2 and their
    gradients cross through the CPU (:class:`OnDevice`)."""

    def __init__(self, path: Path, client: BackboneClient, device: torch.device) -> None:
        dtype = load_dtype(path)
        self.head = load_head(path, dtype=dtype, device=device)
        self.tail = load_tail(path, dtype=dtype, device=device)
        for part in (self.head, self.tail):
            ADAPTER.apply(part)
            part.train()
        self.params = [
            p for part in (self.head, self.tail) for p in part.parameters() if p.requires_grad
        ]
        self.optimizer, self.scheduler = build_optimizer(self.params, OPTIMIZER)
        self.open(client, ADAPTER)
        self.body = OnDevice(self.remote, device)


def load_dtype(path: Path) -> torch.dtype:
    config = json.loads((path / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return DTYPES.get(str(name), torch.float32)


# --- the backbone ---------------------------------------------------------------------


@contextmanager
def backbone(root: Path, args: argparse.Namespace, log: Path) -> Iterator[str]:
    """``splitfed serve backbone`` on loopback with mTLS, limits raised for 32+ sessions
    of one identity; yields its address."""
    big = 64 * GIB if args.device == "cuda" else 4 * GIB
    streams = max(*args.sessions_gen, *args.sessions_train, 8) + 8
    config = root / "backbone.yaml"
    config.write_text(
        "backbone:\n"
        f"  model_path: {json.dumps(str(root / 'model'))}\n"
        f"  device: {json.dumps(args.device)}\n"
        f"  dtype: {json.dumps(args.dtype)}\n"
        "  adapter_mode: per-client\n"
        f"  max_sessions: {2 * streams}\n"
        f"  max_sessions_per_identity: {2 * streams}\n"
        f"  max_streams: {streams}\n"
        f"  max_streams_per_identity: {streams}\n"
        f"  max_cache_bytes: {big}\n"
        f"  max_cache_bytes_per_identity: {big}\n"
        f"  max_pending_bytes: {big}\n"
        f"  max_pending_bytes_per_identity: {big}\n"
        f"server:\n  tls_dir: {json.dumps(str(root / 'tls'))}\n"
    )
    server = ServiceProcess(
        "backbone", ["serve", "backbone", "--config", str(config)], log_path=log
    )
    try:
        address = server.start(timeout_s=600)
    except BaseException:
        if log.exists():
            print(log.read_text()[-4000:], file=sys.stderr, flush=True)
        raise
    try:
        yield address
    finally:
        server.stop()


# --- device memory --------------------------------------------------------------------


def device_used(device: torch.device) -> int | None:
    """Bytes in use on the device by every process, or None off CUDA."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return total - free


class PeakSampler:
    """Samples ``device_used`` every 20 ms while active; ``peak`` is the highest seen."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = device_used(device)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.done.wait(0.02):
            used = device_used(self.device)
            if used is not None and self.peak is not None:
                self.peak = max(self.peak, used)

    def __enter__(self) -> PeakSampler:
        if self.peak is not None:
            self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.done.set()
        if self.thread.is_alive():
            self.thread.join()
        used = device_used(self.device)
        if used is not None and self.peak is not None:
            self.peak = max(self.peak, used)


def memory_figures(
    device: torch.device, sessions: int, baseline: int | None, sampler: PeakSampler, start: int
) -> dict[str, float | None]:
    if device.type != "cuda":
        return {"device_used_per_session_gib": None, "client_allocated_per_session_gib": None}
    peak_here = torch.cuda.max_memory_allocated(device)
    assert baseline is not None and sampler.peak is not None
    return {
        "device_used_peak_gib": sampler.peak / GIB,
        "device_used_per_session_gib": (sampler.peak - baseline) / sessions / GIB,
        "client_allocated_per_session_gib": (peak_here - start) / sessions / GIB,
        "client_reserved_gib": torch.cuda.memory_reserved(device) / GIB,
    }


def opened_per_session(before: int | None, after: int | None, sessions: int) -> float | None:
    """Device memory that opening ``sessions`` sessions took (their clients' ends and the
    backbone's session state), per session."""
    if before is None or after is None:
        return None
    return (after - before) / sessions / GIB


def run_concurrently(work: list[Callable[[], None]]) -> float:
    """Seconds for every callable of ``work``, each in its own thread, all at once."""
    errors: list[BaseException] = []

    def worker(job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(job,)) for job in work]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    if errors:
        raise errors[0]
    return seconds


# --- phases ---------------------------------------------------------------------------


def step_phase(
    model: LlamaForCausalLM,
    params: list[nn.Parameter],
    path: Path,
    client: BackboneClient,
    args: argparse.Namespace,
    device: torch.device,
) -> tuple[dict[str, Any], dict[str, float]]:
    clock = Clock(device)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (args.batch, args.tokens), generator=gen).to(device)
    mask = torch.ones_like(ids)
    optimizer, scheduler = build_optimizer(params, OPTIMIZER)
    model.train()

    def centralized() -> float:
        return centralized_step(model, params, optimizer, scheduler, ids, mask, clock)

    split_client = TrainingClient(path, client, device)

    def split() -> float:
        start = clock()
        split_client.step(ids, mask)
        return clock() - start

    centralized()  # warm-ups
    split()
    times: dict[str, list[float]] = {"centralized": [], "split": []}
    blocks = 2 if args.rounds < 4 else 4  # alternating: drifts of the machine hit both
    per_block = max(1, args.rounds // blocks)
    for block in range(blocks):
        times["centralized"] += [centralized() for _ in range(per_block)]
        times["split"] += [split() for _ in range(per_block)]
        say(f"step: block {block + 1}/{blocks} done")
    split_client.close()
    model.zero_grad(set_to_none=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    figures = {
        "batch": args.batch,
        "tokens": args.tokens,
        "step_s": medians,
        "raw_s": times,
        "centralized_peak_allocated_gib": (
            torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
        ),
    }
    return figures, {"split/centralized step": medians["split"] / medians["centralized"]}


def generate_phase(
    model: LlamaForCausalLM,
    head: nn.Module,
    tail: nn.Module,
    client: BackboneClient,
    args: argparse.Namespace,
    device: torch.device,
) -> tuple[dict[str, Any], dict[str, float]]:
    clock = Clock(device)
    model.eval()
    prompts, prompt_mask = left_padded_prompts(torch.Generator().manual_seed(2))
    prompts, prompt_mask = prompts.to(device), prompt_mask.to(device)
    session = client.open_session(SessionRequest(k=1, m=1, adapter=ADAPTER)).session_id
    stream = GenerateStream(client, session, "raw")
    generator = SplitGenerator(head, StageOnDevice(RemoteBodyStage(stream), device), tail)
    options = SamplingOptions(max_new_tokens=args.new_tokens)

    def local() -> float:
        start = clock()
        greedy_generate(model, prompts, prompt_mask, args.new_tokens)
        return clock() - start

    def split() -> float:
        start = clock()
        generator.generate(prompts, prompt_mask, options)
        return clock() - start

    local()  # warm-ups
    split()
    times: dict[str, list[float]] = {"generate": [], "split": []}
    for _ in range(args.gen_rounds):
        times["generate"].append(local())
        times["split"].append(split())
    stream.close()
    client.close_session(session)
    tokens = prompts.shape[0] * args.new_tokens
    rates = {name: tokens / statistics.median(values) for name, values in times.items()}
    figures = {
        "prompts": list(prompts.shape),
        "new_tokens": args.new_tokens,
        "tokens_per_s": rates,
        "raw_s": times,
    }
    return figures, {"split/generate tokens/s": rates["split"] / rates["generate"]}


class GeneratingSession:
    def __init__(
        self,
        index: int,
        channel: Any,
        head: nn.Module,
        tail: nn.Module,
        args: argparse.Namespace,
        device: torch.device,
    ) -> None:
        self.client = BackboneClient(channel)
        self.session = self.client.open_session(
            SessionRequest(k=1, m=1, adapter=ADAPTER)
        ).session_id
        self.stream = GenerateStream(self.client, self.session, "raw")
        stage = StageOnDevice(RemoteBodyStage(self.stream), device)
        self.generator = SplitGenerator(head, stage, tail)
        gen = torch.Generator().manual_seed(100 + index)
        self.prompt = torch.randint(3, VOCAB, (1, args.session_prompt), generator=gen).to(device)
        self.mask = torch.ones_like(self.prompt)
        self.options = SamplingOptions(max_new_tokens=args.session_new_tokens)

    def run(self) -> None:
        self.generator.generate(self.prompt, self.mask, self.options)

    def warm(self) -> None:
        self.generator.generate(self.prompt, self.mask, SamplingOptions(max_new_tokens=2))

    def close(self) -> None:
        self.stream.close()
        self.client.close_session(self.session)


def sessions_phase(
    kind: str,
    counts: list[int],
    sessions: list[Any],
    work: Callable[[Any], Callable[[], None]],
    warm: Callable[[Any], None],
    units_per_session: int,
    args: argparse.Namespace,
    device: torch.device,
    baseline: int | None,
    results: Results,
    opened_per_session_gib: float | None,
) -> None:
    """Every session warmed up once (``warm``, one at a time), then the serial aggregate
    over the first ``--serial-sessions`` sessions, then each N of ``counts``
    concurrently; ``units_per_session`` tokens or samples each run."""
    unit = "tokens" if kind == "generation" else "samples"
    for session in sessions:
        warm(session)
    say(f"{kind}: {len(sessions)} sessions warmed up")
    serial_n = min(args.serial_sessions, len(sessions))

    def one_at_a_time() -> None:
        for session in sessions[:serial_n]:
            work(session)()

    serial_s = run_concurrently([one_at_a_time])  # a thread, as the concurrent ones
    serial_rate = serial_n * units_per_session / serial_s
    say(f"{kind}: serial {serial_n} sessions, {serial_rate:.1f} {unit}/s")
    figures: dict[str, Any] = {
        f"{unit}_per_session": units_per_session,
        "serial": {"sessions": serial_n, "seconds": serial_s, f"{unit}_per_s": serial_rate},
        "opened_per_session_gib": opened_per_session_gib,
        "concurrent": {},
    }
    ratios: dict[str, float] = {}
    for n in counts:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start_allocated = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        with PeakSampler(device) as sampler:
            seconds = run_concurrently([work(session) for session in sessions[:n]])
        rate = n * units_per_session / seconds
        figures["concurrent"][str(n)] = {
            "seconds": seconds,
            f"{unit}_per_s": rate,
            **memory_figures(device, n, baseline, sampler, start_allocated),
        }
        ratios[f"{kind} {n} sessions concurrent/serial"] = rate / serial_rate
        say(f"{kind}: {n} concurrent sessions, {rate:.1f} {unit}/s")
        results.phase(f"{kind}_sessions", figures, ratios)


# --- main -----------------------------------------------------------------------------


def counts(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,4,16, got {text!r}")
    return values


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="7b")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on cuda")
    parser.add_argument("--quick", action="store_true", help="few rounds and tokens (testing)")
    parser.add_argument("--sessions-gen", type=counts, help="default 1,4,16,32 (quick: 1,4)")
    parser.add_argument("--sessions-train", type=counts, help="default 1,4,8 (quick: 1,2)")
    parser.add_argument("--serial-sessions", type=int, default=4)
    parser.add_argument("--rounds", type=int, help="timed steps per path (default 12)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, help="tokens per sequence (default 512)")
    parser.add_argument("--new-tokens", type=int, help="generate phase (default 64)")
    parser.add_argument("--gen-rounds", type=int, help="timed generations per path (3)")
    parser.add_argument("--session-prompt", type=int, default=64)
    parser.add_argument("--session-new-tokens", type=int, help="default 32 (quick: 4)")
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--train-tokens", type=int, help="default 256 (quick: 32)")
    parser.add_argument("--train-steps", type=int, help="steps per session and run (3)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "sessions_gen": [1, 4] if quick else [1, 4, 16, 32],
        "sessions_train": [1, 2] if quick else [1, 4, 8],
        "rounds": 2 if quick else 12,
        "tokens": 32 if quick else 512,
        "new_tokens": 4 if quick else 64,
        "gen_rounds": 1 if quick else 3,
        "session_new_tokens": 4 if quick else 32,
        "train_tokens": 32 if quick else 256,
        "train_steps": 1 if quick else 3,
        "dtype": "bfloat16" if args.device == "cuda" else "float32",
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    positive = ("rounds", "batch", "tokens", "new_tokens", "gen_rounds", "serial_sessions")
    if any(getattr(args, name) < 1 for name in positive) or args.tokens < 2:
        parser.error("sizes and counts must be >= 1 (--tokens >= 2)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    cuda: dict[str, Any] = {}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        cuda = {
            "gpu": torch.cuda.get_device_name(device),
            "gpu_memory_gib": round(properties.total_memory / GIB, 1),
            "cuda": torch.version.cuda,
        }
    described = machine(device=args.device, dtype=args.dtype, config=args.config, **cuda)
    settings = {
        name: getattr(args, name)
        for name in (
            "config",
            "device",
            "dtype",
            "quick",
            "sessions_gen",
            "sessions_train",
            "serial_sessions",
            "rounds",
            "batch",
            "tokens",
            "new_tokens",
            "gen_rounds",
            "session_prompt",
            "session_new_tokens",
            "train_batch",
            "train_tokens",
            "train_steps",
        )
    }
    results = Results(args.json, machine=described, settings=settings)
    tune_allocator()
    log_dir = args.json.parent if args.json is not None else None
    with tempfile.TemporaryDirectory(prefix="splitfed-gpu-scale-") as tmp:
        root = Path(tmp)
        say(f"building the random {args.config} model ({args.dtype}, on {device})")
        # Held in a list that run() empties: it frees the model before the sessions.
        models = [random_model(CONFIGS[args.config](), dtype, device)]
        parameters = sum(p.numel() for p in models[0].parameters())
        say(f"{parameters / 1e6:,.1f} M parameters; saving")
        built = time.perf_counter()
        models[0].save_pretrained(root / "model")
        say("saved")
        setup = {"build_s": built - START, "save_s": time.perf_counter() - built}
        ca = CertificateAuthority.create("bench CA")
        ca.issue("backbone-0", "backbone", dns_names=[SERVER_NAME]).write(root / "tls")
        me = ca.issue("bench", "client")
        assert me.key_pem is not None
        tls = TLSConfig(ca.cert_pem, me.cert_pem, me.key_pem)
        log = (log_dir or root) / "gpu_scale_backbone.log"
        starting = time.perf_counter()
        with backbone(root, args, log) as address:
            say(f"backbone up at {address}")
            results.phase(
                "setup", {**setup, "backbone_start_s": time.perf_counter() - starting}, {}
            )
            # In a thread, as the sessions' clients are: the same generation timed on the
            # main thread ran 1.4 to 5 times slower than on a thread (tiny, 2 shared CPU
            # cores; cause not established), which would tilt serial against concurrent.
            run_concurrently(
                [lambda: run(models, root / "model", address, tls, args, device, results)]
            )
    results.final()
    return 0


def run(
    models: list[LlamaForCausalLM],
    path: Path,
    address: str,
    tls: TLSConfig,
    args: argparse.Namespace,
    device: torch.device,
    results: Results,
) -> None:
    channels: list[Any] = []

    def channel() -> Any:
        opened = create_channel(address, tls, server_name=SERVER_NAME)
        channels.append(opened)
        return opened

    model = models.pop()
    try:
        client = BackboneClient(channel())
        params = lora_params(model)
        say(f"step phase: {args.batch} x {args.tokens} tokens, {args.rounds} rounds per path")
        results.phase("step", *step_phase(model, params, path, client, args, device))
        ends_dtype = load_dtype(path)
        head = load_head(path, dtype=ends_dtype, device=device)
        tail = load_tail(path, dtype=ends_dtype, device=device)
        say(f"generate phase: 4 prompts, {args.new_tokens} new tokens")
        results.phase("generate", *generate_phase(model, head, tail, client, args, device))
        kept = weakref.ref(model)
        del model, params  # the sessions phases measure the backbone and its clients only
        gc.collect()
        say(f"centralized model freed: {kept() is None}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        before = device_used(device)
        gen_sessions = [
            GeneratingSession(i, channel(), head, tail, args, device)
            for i in range(max(args.sessions_gen))
        ]
        baseline = device_used(device)
        say(f"generation sessions: {args.sessions_gen}, {len(gen_sessions)} opened")
        with torch.no_grad():
            sessions_phase(
                "generation",
                args.sessions_gen,
                gen_sessions,
                lambda s: s.run,
                lambda s: s.warm(),
                args.session_new_tokens,
                args,
                device,
                baseline,
                results,
                opened_per_session(before, baseline, len(gen_sessions)),
            )
        for session in gen_sessions:
            session.close()
        del gen_sessions
        gc.collect()
        before = device_used(device)
        trainers = []
        for _ in range(max(args.sessions_train)):
            trainers.append(TrainingClient(path, BackboneClient(channel()), device))
        baseline = device_used(device)
        say(f"training sessions: {args.sessions_train}, {len(trainers)} opened")
        batches = {}
        for i, trainer in enumerate(trainers):
            gen = torch.Generator().manual_seed(200 + i)
            ids = torch.randint(3, VOCAB, (args.train_batch, args.train_tokens), generator=gen)
            batches[id(trainer)] = (ids.to(device), torch.ones_like(ids).to(device))

        def train(trainer: TrainingClient) -> Callable[[], None]:
            def job() -> None:
                for _ in range(args.train_steps):
                    trainer.step(*batches[id(trainer)])

            return job

        sessions_phase(
            "training",
            args.sessions_train,
            trainers,
            train,
            lambda t: t.step(*batches[id(t)]),
            args.train_batch * args.train_steps,
            args,
            device,
            baseline,
            results,
            opened_per_session(before, baseline, len(trainers)),
        )
        for trainer in trainers:
            trainer.close()
    finally:
        for opened in channels:
            opened.close()


if __name__ == "__main__":
    sys.exit(main())
