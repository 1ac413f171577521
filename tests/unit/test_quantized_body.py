"""A backbone's quantized shared body (``[backbone] quantization``): sessions' bodies and
multi-adapter passes share its quantized weights (no copy per session), a batched pass
over sessions equals each session one by one (training and continuously batched
generation), and bad settings are refused with a clear error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from modelkit import tiny_config, with_session_adapter
from transformers import AutoModelForCausalLM

from splitfed.cli.configs import BackboneConfig
from splitfed.models import Body
from splitfed.models.adapters import AdapterSettings, adapter_state
from splitfed.models.multi_adapter import MultiAdapterBody
from splitfed.models.optim import OptimizerSettings, build_optimizer
from splitfed.models.parts import PartCache
from splitfed.models.quantization import quantization_of
from splitfed.services.backbone.bodies import SharedBody
from splitfed.services.backbone.settings import BackboneSettings

MODES = ("int8", "nf4")
HIDDEN = 64  # NF4 quantizes blocks of 64 weights
# Batched and one by one run the same quantized matmuls on the same rows (dequantize,
# then a float32 matmul); only the matmul's blocking over a different number of rows
# can change the last bits.
ATOL = 1e-5
ADAPTERS = (
    AdapterSettings(kind="lora", r=4, alpha=8, seed=11),
    AdapterSettings(kind="lora", r=2, alpha=4, seed=12),
    AdapterSettings(kind="lora", r=4, alpha=16, seed=13),
)
ROWS = (2, 1, 3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("quantized-body") / "llama"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama", 4, hidden=HIDDEN)).save_pretrained(
        str(path)
    )
    return path


def shared(path: Path, mode: str) -> SharedBody:
    body = SharedBody(BackboneSettings(model_path=path, quantization=mode))
    assert quantization_of(body.part) == body.summary.quantization == mode
    return body


def session_body(frozen: SharedBody, settings: AdapterSettings) -> Body:
    """A session's body as the backbone makes it, with a random (not zero) LoRA B so that
    every adapter tensor gets a gradient from the first step."""
    body: Body = with_session_adapter(frozen.body_for(1, 1), settings)
    return body


def micro_batch(seed: int, rows: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, tokens, HIDDEN, generator=generator)
    mask = torch.ones(rows, tokens, dtype=torch.long)
    for row in range(1, rows):
        mask[row, : row + 1] = 0  # left padding
    return hidden, mask


def quantized_storages(module: torch.nn.Module) -> dict[str, int]:
    """Where each quantized projection of ``module`` keeps its weights, by projection
    name (a session's LoRA wraps the projection as ``base_layer``): the weight's data
    (a CPU int8 weight: torchao's int8 values and their scales), an NF4 weight's
    scales, a bitsandbytes int8 projection's matmul state ``CB``."""
    found: dict[str, int] = {}
    for name, sub in module.named_modules():
        weight = getattr(sub, "weight", None)
        torchao = type(weight).__module__.startswith("torchao")
        if type(sub).__name__ not in ("Linear8bitLt", "Linear4bit") and not torchao:
            continue
        key = name.replace(".base_layer", "")
        if torchao:
            found[f"{key}.weight"] = weight.qdata.data_ptr()
            found[f"{key}.scale"] = weight.scale.data_ptr()
            continue
        found[f"{key}.weight"] = weight.data_ptr()
        quant_state = getattr(weight, "quant_state", None)
        if quant_state is not None:
            found[f"{key}.absmax"] = quant_state.absmax.data_ptr()
        state = getattr(sub, "state", None)
        if state is not None and getattr(state, "CB", None) is not None:
            found[f"{key}.CB"] = state.CB.data_ptr()
    return found


@pytest.mark.parametrize("mode", MODES)
def test_sessions_and_their_batched_pass_share_the_quantized_weights(
    checkpoint: Path, mode: str
) -> None:
    frozen = shared(checkpoint, mode)
    bytes_before = frozen.weight_bytes
    loaded = quantized_storages(frozen.part)
    assert len(loaded) == 2 * 7 * 2  # the weight and its scales
    bodies = [session_body(frozen, settings) for settings in ADAPTERS[:2]]
    multi = MultiAdapterBody(bodies)
    hidden, mask = micro_batch(0, 2, 5)
    for body in bodies:
        body(hidden, mask).sum().backward()
    multi([hidden, hidden], [mask, mask])
    with torch.no_grad():
        multi.eval()([hidden, hidden], [mask, mask])
    # The same storages after passes in training and eval mode, alone and batched.
    expected = quantized_storages(frozen.part)
    # 2 blocks x (q, k, v, o, gate, up, down) x (weight, its scales).
    assert len(expected) == 2 * 7 * 2
    assert {n: expected[n] for n in loaded} == loaded
    for module in (*bodies, multi.body):
        got = quantized_storages(module)
        assert {n: got.get(n) for n in expected} == expected
    assert frozen.weight_bytes == bytes_before


@pytest.mark.parametrize("mode", MODES)
def test_multi_adapter_training_on_a_quantized_body_equals_one_by_one(
    checkpoint: Path, mode: str
) -> None:
    """Three sessions of different ranks and rows, three AdamW steps: each output, h1
    gradient, adapter gradient and adapter tensor of the batched pass within ATOL of
    the sessions run one by one (STYLE.md rule 15)."""
    frozen = shared(checkpoint, mode)
    alone = [session_body(frozen, settings) for settings in ADAPTERS]
    batched = [session_body(frozen, settings) for settings in ADAPTERS]
    optimizers = [
        build_optimizer(
            [p for p in body.parameters() if p.requires_grad], OptimizerSettings(learning_rate=1e-2)
        )[0]
        for body in alone + batched
    ]
    worst = 0.0
    for step in range(3):
        batches = [micro_batch(10 * step + i, rows, 4 + i) for i, rows in enumerate(ROWS)]
        grads_out = [
            torch.randn(h.shape, generator=torch.Generator().manual_seed(i))
            for i, (h, _) in enumerate(batches)
        ]
        reference = []
        for body, (hidden, mask), grad in zip(alone, batches, grads_out, strict=True):
            h1 = hidden.clone().requires_grad_(True)
            output = body(h1, mask)
            output.backward(grad)
            reference.append((output.detach(), h1.grad))
        multi = MultiAdapterBody(batched)
        inputs = [hidden.clone().requires_grad_(True) for hidden, _ in batches]
        outputs = multi(inputs, [mask for _, mask in batches])
        torch.autograd.backward(outputs, grads_out)
        for index, (output, h1_grad) in enumerate(reference):
            assert inputs[index].grad is not None and h1_grad is not None
            worst = max(worst, _diff(outputs[index], output), _diff(inputs[index].grad, h1_grad))
            expected = adapter_state(alone[index], grads=True)
            got = adapter_state(batched[index], grads=True)
            assert set(got) == set(expected) and expected
            worst = max(worst, *(_diff(got[n], g) for n, g in expected.items()))
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for a, b in zip(alone, batched, strict=True):
            got = adapter_state(b)
            worst = max(worst, *(_diff(got[n], t) for n, t in adapter_state(a).items()))
    print(f"{mode}: max difference batched vs one by one {worst:.2e}")
    assert worst <= ATOL
    # The adapters are floating point and moved apart: the comparison saw something.
    first, second = adapter_state(batched[0]), adapter_state(batched[2])
    assert all(t.is_floating_point() for t in first.values())
    assert any(_diff(first[n], t) > 1e-3 for n, t in second.items() if n in first)


@pytest.mark.parametrize("mode", MODES)
def test_continuously_batched_generation_on_a_quantized_body_equals_one_by_one(
    checkpoint: Path, mode: str
) -> None:
    """Sessions join, decode one position at a time and sit passes out; each merged
    pass's output equals the session's own pass on its own cache (NF4 decodes a single
    row through bitsandbytes' gemv kernel, several rows through a matmul)."""
    frozen = shared(checkpoint, mode)
    bodies = [session_body(frozen, settings).eval() for settings in ADAPTERS]
    multi = MultiAdapterBody(bodies).eval()
    alone: list[PartCache] = [body.new_cache() for body in bodies]
    merged: list[PartCache] = [body.new_cache() for body in bodies]
    masks: dict[int, torch.Tensor] = {}
    schedule = ({0: 5, 1: 3}, {0: 1, 1: 1, 2: 4}, {0: 1, 2: 1}, {1: 1, 2: 1})
    rows = (1, 1, 2)  # one row alone: the decode steps of sessions 0 and 1 are gemv
    worst = 0.0
    for number, members in enumerate(schedule):
        steps: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, tokens in members.items():
            hidden, new = micro_batch(100 * number + i, rows[i], tokens)
            if i in masks:
                new = torch.ones_like(new)
            masks[i] = new if i not in masks else torch.cat([masks[i], new], -1)
            steps[i] = (hidden, masks[i])
        with torch.no_grad():
            expected = {i: bodies[i](h, m, alone[i]) for i, (h, m) in steps.items()}
            got = multi.cached(
                list(steps),
                [h for h, _ in steps.values()],
                [m for _, m in steps.values()],
                [merged[i] for i in steps],
            )
        for i, output in zip(steps, got, strict=True):
            worst = max(worst, _diff(output, expected[i]))
            assert merged[i].length == alone[i].length
    print(f"{mode}: max difference merged vs alone {worst:.2e}")
    assert worst <= ATOL


def test_an_unknown_quantization_is_refused_by_the_settings_and_the_config(
    tmp_path: Path,
) -> None:
    message = "quantization must be one of none, int8, nf4; got 'fp8'"
    with pytest.raises(ValueError, match=message):
        BackboneSettings(model_path=tmp_path, quantization="fp8")
    config: dict[str, Any] = {"backbone": {"model_path": str(tmp_path), "quantization": "fp8"}}
    with pytest.raises(ValueError, match=rf"^\[backbone\] {message}$"):
        BackboneConfig.from_mapping(config)
    config["backbone"]["quantization"] = "nf4"
    assert BackboneConfig.from_mapping(config).backbone.quantization == "nf4"


def test_nf4_on_projections_not_a_multiple_of_64_is_refused_at_load(tmp_path: Path) -> None:
    AutoModelForCausalLM.from_config(tiny_config("llama", 4, hidden=32)).save_pretrained(
        str(tmp_path)
    )
    with pytest.raises(ValueError, match="nf4 needs projections whose input size is a multiple"):
        SharedBody(BackboneSettings(model_path=tmp_path, quantization="nf4"))
    # int8 has no such constraint.
    assert shared(tmp_path, "int8").summary.quantization == "int8"


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max())
