"""Continuous batching over real mTLS, backbone in its own process: organisations
generating at once (each its own certificate, session, LoRA adapter, head and tail,
prompts of different lengths and padding, starting and finishing at different times)
get exactly the tokens each gets alone (greedy, fp32), while their steps share passes
(the backbone's metrics)."""

from __future__ import annotations

import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from backbone_kit import Deployment, deployment

from splitfed.clients.backbone import GenerateStream, RemoteBodyStage
from splitfed.models.adapters import AdapterSettings
from splitfed.models.generation import SamplingOptions, SplitGenerator
from splitfed.models.loading import load_head, load_tail
from splitfed.protocol.backbone import SessionRequest

ORGANISATIONS = 4
# Each organisation's prompt (rows, tokens) and how many tokens it generates.
PROMPTS = ((2, 7), (1, 12), (2, 4), (1, 9))
NEW_TOKENS = (10, 6, 12, 8)


def metric(address: str, name: str) -> float:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def prompt(index: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, tokens = PROMPTS[index]
    generator = torch.Generator().manual_seed(index)
    ids = torch.randint(3, vocab, (rows, tokens), generator=generator)
    mask = torch.ones_like(ids)
    if rows > 1:
        mask[1, :3] = 0  # a left-padded row
    return ids, mask


def generate(dep: Deployment, index: int, start: threading.Barrier | None) -> torch.Tensor:
    channel, client = dep.connect(f"hospital-{index}")
    with channel:
        adapter = AdapterSettings(kind="lora", r=2 + index, alpha=8, seed=index)
        session = client.open_session(SessionRequest(k=1, m=1, adapter=adapter)).session_id
        # Random values: LoRA B starts at zero, which would make every adapter the same.
        gen = torch.Generator().manual_seed(10 + index)
        client.import_adapter(
            session,
            {
                name: torch.randn(t.shape, generator=gen) * 0.3
                for name, t in client.export_adapter(session).items()
            },
        )
        head, tail = load_head(dep.model_path), load_tail(dep.model_path)
        stream = GenerateStream(client, session, "raw")
        generator = SplitGenerator(head, RemoteBodyStage(stream), tail)
        ids, mask = prompt(index, int(head.config.vocab_size))
        if start is not None:
            start.wait(timeout=60)
        tokens = generator.generate(ids, mask, SamplingOptions(max_new_tokens=NEW_TOKENS[index]))
        stream.close()
        client.close_session(session)
        return tokens


def test_concurrent_organisations_get_exactly_their_tokens_alone_in_shared_passes(
    tmp_path: Path,
) -> None:
    dep = deployment(tmp_path, adapter_mode="per-client", server={"metrics_port": 0})
    dep.start()
    try:
        metrics = dep.metrics
        alone = [generate(dep, index, None) for index in range(ORGANISATIONS)]
        passes = metric(metrics, "splitfed_backbone_generate_pass_sessions_count")
        steps = metric(metrics, "splitfed_backbone_generate_pass_sessions_sum")
        assert passes == steps  # one at a time: one session per pass
        start = threading.Barrier(ORGANISATIONS)
        with ThreadPoolExecutor(max_workers=ORGANISATIONS) as pool:
            together = list(pool.map(lambda i: generate(dep, i, start), range(ORGANISATIONS)))
        passes = metric(metrics, "splitfed_backbone_generate_pass_sessions_count") - passes
        steps = metric(metrics, "splitfed_backbone_generate_pass_sessions_sum") - steps
    finally:
        dep.stop()
    for index, (mine, reference) in enumerate(zip(together, alone, strict=True)):
        assert torch.equal(mine, reference), f"organisation {index}"
    assert steps == sum(NEW_TOKENS)  # every step of every organisation, each once
    assert passes < steps  # and fewer passes than steps: they were shared
