"""A body across several devices (`[backbone] device`, models/placement.py): the spec's
parsing and errors, the plan of blocks per device, and the dispatch, checked on the CPU
(two device names for the CPU make the dispatch path run; a GPU machine checks CUDA)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from splitfed.models.placement import (
    AUTO,
    auto_blocks,
    block_device,
    blocks_per_device,
    parse_device,
    place_blocks,
)
from splitfed.models.tiny import make_tiny_checkpoint
from splitfed.services.backbone.bodies import SharedBody
from splitfed.services.backbone.settings import BackboneSettings


def test_device_specs_parse_and_say_what_is_wrong() -> None:
    assert parse_device("cpu") == "cpu"
    assert parse_device(" cuda:1 ") == "cuda:1"
    assert parse_device("auto") == AUTO
    assert parse_device("cuda:0=16, cuda:1=14") == [("cuda:0", 16), ("cuda:1", 14)]
    for bad, message in [
        ("", "empty"),
        ("gpu7", "no torch device"),
        ("cuda:0=16,cuda:1", "DEVICE=BLOCKS"),
        ("cuda:0=0", "BLOCKS >= 1"),
        ("tpu=3", "no torch device"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_device(bad)
    with pytest.raises(ValueError, match="device"):
        BackboneSettings(model_path=Path("m"), device="cuda:0=x")


def test_blocks_per_device_must_add_up() -> None:
    assert blocks_per_device([("cuda:0", 2), ("cuda:1", 1)], 3) == ["cuda:0", "cuda:0", "cuda:1"]
    with pytest.raises(ValueError, match="places 3 blocks but the body has 4"):
        blocks_per_device([("cuda:0", 2), ("cuda:1", 1)], 4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("placement")
    return make_tiny_checkpoint(root / "model", ["Add 1 and 2.", "3"], layers=6, hidden_size=32)


def _body_output(settings: BackboneSettings, k: int = 1, m: int = 1) -> torch.Tensor:
    shared = SharedBody(settings)
    body = shared.body_for(k, m)
    body.eval()
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 32, generator=generator)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0
    hidden, mask = shared.inputs(hidden, mask)
    cache = body.new_cache()
    with torch.no_grad():
        first = body(hidden, mask, cache)
        step = body(hidden[:, -1:], torch.cat([mask, mask[:, -1:]], -1), cache)
    return torch.cat([first, step], 1)


def test_a_body_over_several_devices_computes_what_one_device_does(checkpoint: Path) -> None:
    one = _body_output(BackboneSettings(model_path=checkpoint, device="cpu"))
    # Blocks 1..4 of the six: two on "cpu", two on "cpu:0" (another name, so the blocks
    # are dispatched with hooks as on two GPUs); prefill and a cached decode step.
    spread = BackboneSettings(model_path=checkpoint, device="cpu=2,cpu:0=2")
    shared = SharedBody(spread)
    assert shared.block_devices == ["cpu", "cpu", "cpu:0", "cpu:0"]
    body = shared.body_for(2, 1)  # blocks 2..4: the last three of the shared four
    cpu, cpu0 = torch.device("cpu"), torch.device("cpu:0")
    assert [block_device(block) for block in body.blocks] == [cpu, cpu0, cpu0]
    torch.testing.assert_close(_body_output(spread), one, atol=0, rtol=0)
    # A session that keeps more blocks itself gets the blocks it needs, on their devices.
    torch.testing.assert_close(
        _body_output(spread, k=2),
        _body_output(BackboneSettings(model_path=checkpoint, device="cpu"), k=2),
        atol=0,
        rtol=0,
    )
    with pytest.raises(ValueError, match="places 3 blocks but the body has 4"):
        SharedBody(BackboneSettings(model_path=checkpoint, device="cpu=2,cpu:0=1"))


def test_auto_without_a_gpu_is_the_cpu(checkpoint: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: auto spreads over it (checked on the device)")
    shared = SharedBody(BackboneSettings(model_path=checkpoint, device="auto"))
    assert shared.block_devices == ["cpu"] * 4
    assert auto_blocks(shared.part) == ["cpu"] * 4
    place_blocks(shared.part, shared.block_devices)
