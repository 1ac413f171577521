"""The OpenAI-compatible endpoint against direct generation: the same prompt, the same
greedy tokens, through ``splitfed serve openai`` and the official ``openai`` package
(streaming) or through the SDK in this process.

A Llama-layout model (``--hidden`` 512, ``--layers`` 8, as bench/split_overhead.py
times, with the vocabulary of a byte-level tokenizer trained on the bundled texts) saved
with random weights. The backbone (``splitfed serve backbone``, per-client adapters)
runs in its own process on the second half of the cores; the data owner's side on the
first: this process and, for the endpoint, ``splitfed serve openai`` in a child process
of its own (as a deployment runs it). Both sides use the client config's k = m = 1 and a
LoRA adapter (r 8) that is a no-op (no checkpoint): the same body either way.

* **direct**: a split session opened once (clients/app.py ``split_session``), each
  generation ``SplitGenerator.stream`` with its text decoded as it arrives
  (``text_deltas``), the SDK's own path without the HTTP layer;
* **endpoint**: ``openai.OpenAI(...).completions.create(..., stream=True)`` against the
  server (its pool of ``--concurrency`` sessions opened at start-up); the prompt is
  formatted as ``splitfed generate`` formats it, so both sides generate the same tokens
  (checked: the texts must be equal).

tokens/s = generated tokens / wall time from the request to the last token (prefill
included), the median of ``--rounds`` rounds, direct and endpoint alternating. Then
``--concurrency`` endpoint requests at once (threads), aggregate tokens/s against one
request alone: the pool's sessions generating concurrently, their steps merged on the
backbone.

    python bench/openai.py [--layers 8] [--hidden 512] [--new-tokens 64] [--rounds 7]
                           [--concurrency 4] [--quick] [--json PATH]

``--quick`` is a smoke run (2 layers, hidden 64, 8 tokens, 2 rounds, concurrency 2).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from common import report
from concurrency import backbone
from split_step import SERVER_NAME, client_half

from splitfed.cli.launcher import ServiceProcess
from splitfed.clients.app import ClientConfig, backbone_client, prompt_ids, split_session
from splitfed.clients.app import sampling_options as config_sampling
from splitfed.clients.streaming import text_deltas
from splitfed.models.generation import SplitGenerator
from splitfed.models.tiny import BUNDLED_DATASET, llama_config, train_tokenizer
from splitfed.runtime import tune_allocator
from splitfed.security.ca import CertificateAuthority

PROMPT = "Name three colours of the sea and say which one you like."
DEFAULTS: dict[str, Any] = {
    "layers": 8,
    "hidden": 512,
    "new_tokens": 64,
    "rounds": 7,
    "concurrency": 4,
}
QUICK: dict[str, Any] = {
    "layers": 3,
    "hidden": 64,
    "new_tokens": 8,
    "rounds": 2,
    "concurrency": 2,
}
MODEL_NAME = "bench"


def save_model(path: Path, hidden: int, layers: int) -> None:
    """A random Llama-layout model and a tokenizer trained on the bundled texts."""
    rows = [json.loads(line) for line in BUNDLED_DATASET.read_text().splitlines() if line]
    texts = [str(value) for row in rows for value in row.values()]
    tokenizer = train_tokenizer(texts)
    heads = max(1, hidden // 64)
    config = llama_config(
        len(tokenizer),
        hidden,
        layers,
        intermediate_size=hidden * 11 // 4,
        heads=heads,
        kv_heads=heads,
        max_positions=1024,
    )
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def write_client_config(root: Path, address: str, new_tokens: int) -> Path:
    """The data owner's config: no checkpoint; greedy, ``new_tokens`` tokens, and no
    stop token (id 0, padding, which a generation never needs to stop at)."""
    path = root / "client.toml"
    path.write_text(
        "[backbone]\n"
        f"address = {json.dumps(address)}\nserver_name = {json.dumps(SERVER_NAME)}\n"
        f"tls_dir = {json.dumps(str(root / 'client-tls'))}\n"
        "[training]\n"
        f"data = {json.dumps(str(BUNDLED_DATASET))}\n"
        f"model_path = {json.dumps(str(root / 'model'))}\nk = 1\nm = 1\n"
        "[adapter]\nr = 8\nalpha = 16\n"
        f"[generation]\nmax_new_tokens = {new_tokens}\nstop_token_ids = [0]\n"
    )
    return path


class Direct:
    """Generation through the SDK in this process, on a session opened once."""

    def __init__(self, config: ClientConfig) -> None:
        from transformers import AutoTokenizer

        self._client = backbone_client(config.backbone)
        client = self._client.__enter__()
        self._split = split_session(client, config)
        split = self._split.__enter__()
        self.tokenizer = AutoTokenizer.from_pretrained(
            str(config.training.model_path), local_files_only=True
        )
        self.generator = SplitGenerator(split.head, split.body(), split.tail)
        self.sampling = config_sampling(config, self.tokenizer)
        self.ids, self.mask = prompt_ids(
            self.tokenizer, [PROMPT], chat_template=config.training.chat_template
        )

    def run(self) -> tuple[str, int, float]:
        """(text, tokens, seconds) of one generation."""
        started = time.perf_counter()
        text, tokens = "", 0
        steps = self.generator.stream(self.ids, self.mask, self.sampling)

        def counted() -> Any:
            nonlocal tokens
            for step in steps:
                tokens += 1
                yield step

        for delta in text_deltas(counted(), self.tokenizer, 1):
            text += delta.text
        return text, tokens, time.perf_counter() - started

    def close(self) -> None:
        self._split.__exit__(None, None, None)
        self._client.__exit__(None, None, None)


def endpoint_run(api: Any, new_tokens: int) -> tuple[str, int, float]:
    """(text, tokens, seconds) of one streamed completion."""
    started = time.perf_counter()
    stream = api.completions.create(
        model=MODEL_NAME,
        prompt=PROMPT,
        max_tokens=new_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, tokens = "", 0
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].text or ""
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return text, tokens, time.perf_counter() - started


def concurrent_rate(api: Any, requests: int, new_tokens: int) -> float:
    """Aggregate tokens/s of ``requests`` streamed completions started together."""
    results: list[tuple[str, int, float]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(requests + 1)

    def worker() -> None:
        start.wait()
        try:
            results.append(endpoint_run(api, new_tokens))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(requests)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    if errors:
        raise errors[0]
    return sum(tokens for _, tokens, _ in results) / wall


def openai_package() -> Any:
    """The ``openai`` package, not this script: run as ``python bench/openai.py``, this
    folder is first on sys.path and holds an ``openai.py``."""
    here = Path(__file__).resolve().parent
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    try:
        import openai
    finally:
        sys.path[:] = saved
    return openai


def measure(root: Path, args: Any) -> dict[str, Any]:
    openai = openai_package()
    ca = CertificateAuthority.create("bench CA")
    ca.issue("backbone-0", "backbone", dns_names=[SERVER_NAME]).write(root / "tls")
    ca.issue("data-owner", "client").write(root / "client-tls")
    with backbone(root, args.device, None) as server:
        assert server.address is not None
        config_path = write_client_config(root, server.address, args.new_tokens)
        config = ClientConfig.load(config_path)
        endpoint = ServiceProcess(
            "openai",
            [
                "serve",
                "openai",
                "--config",
                str(config_path),
                "--listen",
                "127.0.0.1:0",
                "--model-name",
                MODEL_NAME,
                "--concurrency",
                str(args.concurrency),
            ],
            log_path=root / "openai.log",
            env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},
        )
        endpoint.start(timeout_s=300)
        direct = Direct(config)
        try:
            api = openai.OpenAI(
                base_url=f"http://{endpoint.address}/v1", api_key="unused", max_retries=0
            )
            reference, _, _ = direct.run()  # warm-up, both sides
            warm, _, _ = endpoint_run(api, args.new_tokens)
            if warm != reference:
                raise SystemExit(
                    f"the endpoint generated other text than direct generation:\n"
                    f"direct:   {reference!r}\nendpoint: {warm!r}"
                )
            times: dict[str, list[float]] = {"direct": [], "endpoint": []}
            tokens: dict[str, int] = {}
            for _ in range(args.rounds):
                for name, run in (
                    ("direct", direct.run),
                    ("endpoint", lambda: endpoint_run(api, args.new_tokens)),
                ):
                    text, count, seconds = run()
                    if text != reference:
                        raise SystemExit(f"{name}: the text changed between rounds")
                    tokens[name] = count
                    times[name].append(seconds)
            if tokens["direct"] != tokens["endpoint"]:
                raise SystemExit(f"token counts differ: {tokens}")
            concurrent = [concurrent_rate(api, args.concurrency, args.new_tokens) for _ in range(3)]
        finally:
            direct.close()
            endpoint.stop()
    rate = {name: tokens[name] / statistics.median(t) for name, t in times.items()}
    per_token_ms = {name: 1000 * statistics.median(t) / tokens[name] for name, t in times.items()}
    return {
        "tokens": tokens["direct"],
        "seconds": times,
        "tokens_per_s": rate,
        "ms_per_token": per_token_ms,
        "concurrent_tokens_per_s": statistics.median(concurrent),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--layers", type=int, help="decoder layers (8)")
    parser.add_argument("--hidden", type=int, help="hidden size (512)")
    parser.add_argument("--new-tokens", type=int, help="tokens per generation (64)")
    parser.add_argument("--rounds", type=int, help="rounds per side (7)")
    parser.add_argument("--concurrency", type=int, help="requests at once, pool sessions (4)")
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--device", default="cpu", help="the backbone's device (cuda:0, ...)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    for name, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.layers < 3 or min(args.hidden, args.new_tokens, args.rounds, args.concurrency) < 1:
        parser.error("--layers must be >= 3; --hidden, --new-tokens, --rounds, --concurrency >= 1")
    _, described = client_half(**{"backbone device": args.device})
    tune_allocator()
    with tempfile.TemporaryDirectory(prefix="splitfed-bench-") as tmp:
        root = Path(tmp)
        save_model(root / "model", args.hidden, args.layers)
        figures = measure(root, args)
    rate, per_token = figures["tokens_per_s"], figures["ms_per_token"]
    print(
        f"\n{args.layers} layers, hidden {args.hidden}; {figures['tokens']} tokens per "
        f"generation, median of {args.rounds} rounds"
    )
    print(f"{'':10} {'tokens/s':>9} {'ms/token':>9}")
    for name in ("direct", "endpoint"):
        print(f"{name:10} {rate[name]:9.1f} {per_token[name]:9.2f}")
    print(
        f"endpoint, {args.concurrency} requests at once: "
        f"{figures['concurrent_tokens_per_s']:.1f} tokens/s"
    )
    ratios = {
        "openai endpoint/direct generation tokens/s": rate["endpoint"] / rate["direct"],
        f"openai endpoint {args.concurrency} concurrent/1 request tokens/s": (
            figures["concurrent_tokens_per_s"] / rate["endpoint"]
        ),
    }
    report(
        args.json,
        "openai",
        ratios,
        machine=described,
        settings={k: getattr(args, k) for k in (*DEFAULTS, "device")},
        figures=figures,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
