"""Activation perturbation (per-token clipping + Gaussian noise) and its privacy accountant,
alone and inside the split trainer (against a body run in this process).

One module a little over 500 lines: the mechanism and its accountant are tested together,
since every figure the accountant reports is checked against the noise applied."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import deque
from pathlib import Path
from typing import Any

import pytest
import torch
from backbone_kit import tiny_checkpoint
from opacus.accountants import RDPAccountant
from prometheus_client import REGISTRY

from splitfed.clients import trainer as trainer_module
from splitfed.clients.app import ClientConfig
from splitfed.clients.trainer import SplitTrainer, StepReport, TrainSettings
from splitfed.models.adapters import AdapterSettings
from splitfed.models.loading import load_body
from splitfed.models.optim import OptimizerSettings
from splitfed.models.tiny import BUNDLED_DATASET
from splitfed.protocol.backbone import ModelInfo, SessionInfo, SessionRequest
from splitfed.security.perturbation import (
    PerturbationSettings,
    Perturber,
    PrivacyAccountant,
    composed_noise_multiplier,
    perturb_gradient,
    perturb_hidden,
)
from splitfed.v1 import backbone_pb2

# opacus warns when the best RDP order is the last it tries; the bound still holds.
pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the")


def hidden_states(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def right_padded_mask(lengths: list[int], tokens: int) -> torch.Tensor:
    return (torch.arange(tokens)[None, :] < torch.tensor(lengths)[:, None]).long()


def generator(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- the mechanism -----------------------------------------------------------------------


@pytest.mark.parametrize("perturb", [perturb_hidden, perturb_gradient])
def test_clip_norm_zero_is_a_no_op(perturb: Any) -> None:
    h = hidden_states(2, 5, 8)
    mask = right_padded_mask([5, 3], 5)
    out = perturb(h, mask, 0.0, 0.0, generator())
    assert out is h
    assert torch.equal(out, hidden_states(2, 5, 8))


def test_disabled_perturber_returns_its_input() -> None:
    h = hidden_states(2, 5, 8)
    perturber = Perturber(PerturbationSettings())
    assert perturber.hidden(h, None, release=1, micro=0) is h
    assert perturber.gradient(h, None, release=1, micro=0) is h


def test_clipping_bounds_every_token_and_keeps_shorter_ones() -> None:
    clip = 3.0
    h = hidden_states(3, 6, 16)  # token norms around 4
    h[0, 0] *= 0.1  # well below the clip norm
    h[1, 2] *= 10.0  # far above
    mask = right_padded_mask([6, 6, 4], 6)
    out = perturb_hidden(h, mask, clip, 0.0, generator())
    norms_in = torch.linalg.vector_norm(h, dim=-1)
    norms_out = torch.linalg.vector_norm(out, dim=-1)
    real = mask.bool()
    assert (norms_out[real] <= clip * (1 + 1e-6)).all()
    short = real & (norms_in <= clip)
    long = real & (norms_in > clip)
    assert short.any() and long.any()
    assert torch.equal(out[short], h[short])  # untouched, bit for bit
    torch.testing.assert_close(norms_out[long], torch.full_like(norms_out[long], clip))
    # Clipping scales, it does not turn: same directions.
    cosine = torch.nn.functional.cosine_similarity(out[long], h[long], dim=-1)
    torch.testing.assert_close(cosine, torch.ones_like(cosine))
    assert torch.equal(out[~real], torch.zeros_like(out[~real]))  # padding is zeroed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_half_precision_is_clipped_in_float32(dtype: torch.dtype) -> None:
    # fp16 squares overflow past 256: norms computed in fp16 would be inf.
    h = hidden_states(2, 4, 64, dtype=dtype) * 100
    out = perturb_hidden(h, None, 1.0, 0.0)
    assert out.dtype == dtype
    norms = torch.linalg.vector_norm(out.float(), dim=-1)
    ulp = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    assert (norms <= 1.0 + 2 * ulp * math.sqrt(64)).all()
    assert (norms >= 1.0 - 2 * ulp * math.sqrt(64)).all()


def test_noise_has_the_configured_scale() -> None:
    clip, sigma = 2.0, 0.7
    h = hidden_states(64, 128, 64) * 0.01  # far below the clip norm: only noise changes it
    out = perturb_hidden(h, None, clip, sigma, generator(3))
    noise = (out - h).flatten().double()
    count = noise.numel()
    expected = sigma * clip
    # Standard errors: std / sqrt(n) for the mean, about std / sqrt(2n) for the std.
    assert abs(noise.mean().item()) < 5 * expected / math.sqrt(count)
    assert noise.std().item() == pytest.approx(expected, rel=5 / math.sqrt(2 * count))
    kurtosis = ((noise - noise.mean()) ** 4).mean() / noise.var() ** 2
    assert kurtosis.item() == pytest.approx(3.0, abs=0.05)  # Gaussian, not uniform


def test_gradient_noise_has_the_configured_scale_and_masks_padding() -> None:
    clip, sigma = 0.5, 3.0
    grad = torch.zeros(16, 256, 32)
    mask = right_padded_mask([256] * 15 + [100], 256)
    out = perturb_gradient(grad, mask, clip, sigma, generator(4))
    real = out[mask.bool()].flatten().double()
    assert real.std().item() == pytest.approx(sigma * clip, rel=5 / math.sqrt(2 * real.numel()))
    assert torch.equal(out[~mask.bool()], torch.zeros_like(out[~mask.bool()]))


def test_the_same_seed_gives_the_same_noise() -> None:
    h = hidden_states(2, 5, 8)
    first = perturb_hidden(h, None, 1.0, 1.0, generator(11))
    assert torch.equal(first, perturb_hidden(h, None, 1.0, 1.0, generator(11)))
    assert not torch.equal(first, perturb_hidden(h, None, 1.0, 1.0, generator(12)))
    perturber = Perturber(PerturbationSettings(clip_norm=1.0, noise_multiplier=1.0, seed=5))
    again = Perturber(PerturbationSettings(clip_norm=1.0, noise_multiplier=1.0, seed=5))
    one = perturber.hidden(h, None, release=3, micro=1)
    assert torch.equal(one, again.hidden(h, None, release=3, micro=1))
    assert not torch.equal(one, perturber.hidden(h, None, release=4, micro=1))
    assert not torch.equal(one, perturber.hidden(h, None, release=3, micro=0))


def test_gradients_flow_through_the_clipping() -> None:
    h = hidden_states(2, 4, 6).double() * 2  # some tokens above, some below 3.0
    h.requires_grad_(True)
    mask = right_padded_mask([4, 3], 4)

    def clipped(x: torch.Tensor) -> torch.Tensor:
        # A fresh generator per call: the noise is the same constant every time.
        return perturb_hidden(x, mask, 3.0, 0.5, generator(2))

    assert torch.autograd.gradcheck(clipped, (h,))
    # And by hand: the identity below the clip norm, zero on padding.
    weights = hidden_states(2, 4, 6, seed=1).double()
    (clipped(h) * weights).sum().backward()
    assert h.grad is not None
    norms = torch.linalg.vector_norm(h.detach(), dim=-1)
    short = mask.bool() & (norms < 3.0)
    assert short.any()
    torch.testing.assert_close(h.grad[short], weights[short])
    assert torch.equal(h.grad[~mask.bool()], torch.zeros_like(h.grad[~mask.bool()]))


def test_mask_of_the_wrong_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="does not match"):
        perturb_hidden(hidden_states(2, 5, 8), torch.ones(2, 4), 1.0, 0.0)


# --- settings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"clip_norm": -1.0}, "clip_norm must be a finite number >= 0"),
        ({"clip_norm": math.inf}, "clip_norm must be a finite number >= 0"),
        ({"noise_multiplier": -0.1}, "noise_multiplier must be a finite number >= 0"),
        ({"noise_multiplier": 1.0}, "noise_multiplier 1.0 needs clip_norm > 0"),
        ({"grad_clip_norm": -2.0}, "grad_clip_norm must be a finite number >= 0"),
        ({"grad_noise_multiplier": 0.5}, "grad_noise_multiplier 0.5 needs grad_clip_norm > 0"),
        ({"clip_norm": 1.0, "delta": 0.0}, r"delta must be in \(0, 1\)"),
        ({"clip_norm": 1.0, "delta": 1.0}, r"delta must be in \(0, 1\)"),
        ({"seed": -1}, "seed must be >= 0"),
    ],
)
def test_invalid_settings_say_what_to_change(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PerturbationSettings(**values)


def test_enabled_and_the_accounted_noise_multiplier() -> None:
    assert not PerturbationSettings().enabled
    hidden = PerturbationSettings(clip_norm=1.0, noise_multiplier=0.8)
    assert hidden.enabled and hidden.hidden_enabled and not hidden.gradient_enabled
    assert hidden.accounted_noise_multiplier == 0.8
    both = dataclasses.replace(hidden, grad_clip_norm=0.1, grad_noise_multiplier=0.6)
    assert both.accounted_noise_multiplier == pytest.approx(1 / math.sqrt(0.8**-2 + 0.6**-2))
    grads_only = PerturbationSettings(grad_clip_norm=0.1, grad_noise_multiplier=1.0)
    assert grads_only.enabled and grads_only.accounted_noise_multiplier == 0.0
    assert composed_noise_multiplier(1.0, 1.0) == pytest.approx(1 / math.sqrt(2))
    assert composed_noise_multiplier(2.0) == 2.0
    assert composed_noise_multiplier(1.0, 0.0) == 0.0


# --- the accountant ----------------------------------------------------------------------


def opacus_epsilon(sigma: float, sample_rate: float, steps: int, delta: float) -> float:
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=sample_rate)
    return float(accountant.get_epsilon(delta))


@pytest.mark.parametrize(
    ("sigma", "sample_rate", "steps", "delta"),
    [(1.1, 0.01, 1000, 1e-5), (0.8, 0.25, 40, 1e-6), (2.0, 1.0, 10, 1e-5), (5.0, 0.003, 1, 1e-5)],
)
def test_epsilon_is_opacus_rdp_epsilon(
    sigma: float, sample_rate: float, steps: int, delta: float
) -> None:
    accountant = PrivacyAccountant(sigma, sample_rate, delta)
    assert accountant.epsilon == 0.0
    for _ in range(steps):
        accountant.step()
    assert accountant.steps == steps
    expected = opacus_epsilon(sigma, sample_rate, steps, delta)
    assert accountant.epsilon == pytest.approx(expected, rel=1e-12)
    assert accountant.step_epsilon == pytest.approx(
        opacus_epsilon(sigma, sample_rate, 1, delta), rel=1e-12
    )
    spent = accountant.spent()
    assert (spent.epsilon, spent.delta, spent.steps) == (accountant.epsilon, delta, steps)
    assert (spent.noise_multiplier, spent.sample_rate) == (sigma, sample_rate)


def test_epsilon_grows_with_steps_and_shrinks_with_noise() -> None:
    few, many, noisy = (PrivacyAccountant(s, 0.05, 1e-5) for s in (1.0, 1.0, 2.0))
    for _ in range(10):
        few.step()
    for _ in range(100):
        many.step()
        noisy.step()
    assert 0 < few.epsilon < many.epsilon
    assert noisy.epsilon < many.epsilon


def test_no_noise_means_infinite_epsilon() -> None:
    accountant = PrivacyAccountant(0.0, 0.1, 1e-5)
    accountant.step()
    assert accountant.epsilon == math.inf
    assert accountant.step_epsilon == math.inf


def test_accounting_grad_noise_composes_both_mechanisms() -> None:
    settings = PerturbationSettings(
        clip_norm=1.0, noise_multiplier=1.0, grad_clip_norm=0.1, grad_noise_multiplier=2.0
    )
    accountant = PrivacyAccountant.for_settings(settings, 0.02)
    for _ in range(50):
        accountant.step()
    composed = 1 / math.sqrt(1.0**-2 + 2.0**-2)
    assert accountant.epsilon == pytest.approx(opacus_epsilon(composed, 0.02, 50, 1e-5))
    assert accountant.epsilon > opacus_epsilon(1.0, 0.02, 50, 1e-5)


def test_history_resumes_and_mixes_settings() -> None:
    accountant = PrivacyAccountant(1.0, 0.1, 1e-5)
    for _ in range(5):
        accountant.step()
    resumed = PrivacyAccountant(1.5, 0.1, 1e-5)
    resumed.load_history(accountant.history())
    resumed.step()
    assert resumed.history() == [(1.0, 0.1, 5), (1.5, 0.1, 1)]
    assert resumed.steps == 6
    reference = RDPAccountant()
    for sigma in [1.0] * 5 + [1.5]:
        reference.step(noise_multiplier=sigma, sample_rate=0.1)
    assert resumed.epsilon == pytest.approx(float(reference.get_epsilon(1e-5)))
    resumed.load_history([(0.0, 1.0, 3), *resumed.history()])
    assert resumed.epsilon == math.inf
    with pytest.raises(ValueError, match="invalid accountant entry"):
        resumed.load_history([(1.0, 0.0, 3)])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((1.0, 0.0, 1e-5), r"sample_rate must be in \(0, 1\]"),
        ((1.0, 1.5, 1e-5), r"sample_rate must be in \(0, 1\]"),
        ((1.0, 0.1, 0.0), r"delta must be in \(0, 1\)"),
        ((-1.0, 0.1, 1e-5), "noise_multiplier must be a finite number >= 0"),
    ],
)
def test_invalid_accountant_arguments(args: tuple[float, float, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PrivacyAccountant(*args)


# --- configuration -----------------------------------------------------------------------


def write_client_config(path: Path, perturbation: str) -> Path:
    path.write_text(
        "[backbone]\n"
        'address = "127.0.0.1:50051"\n'
        "insecure = true\n"
        "[training]\n"
        f'data = "{BUNDLED_DATASET}"\n'
        'model_path = "model"\n'
        f"{perturbation}"
    )
    return path


def test_config_file_sets_the_perturbation(tmp_path: Path) -> None:
    config = ClientConfig.load(
        write_client_config(
            tmp_path / "client.toml",
            "[training.perturbation]\nclip_norm = 1\nnoise_multiplier = 0.5\ndelta = 1e-6\n",
        )
    )
    assert config.training.perturbation == PerturbationSettings(
        clip_norm=1.0, noise_multiplier=0.5, delta=1e-6
    )
    default = ClientConfig.load(write_client_config(tmp_path / "plain.toml", ""))
    assert default.training.perturbation == PerturbationSettings()
    assert not default.training.perturbation.enabled


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ('clip_norm = "big"\n', r"\[training\] \[perturbation\] clip_norm: expected a number"),
        ("sigma = 1.0\n", r"\[training\] \[perturbation\] has no field 'sigma'"),
        ("noise_multiplier = 1.0\n", r"\[training\] \[perturbation\] noise_multiplier 1.0 needs"),
    ],
)
def test_config_errors_name_the_field(tmp_path: Path, section: str, message: str) -> None:
    path = write_client_config(tmp_path / "client.toml", f"[training.perturbation]\n{section}")
    with pytest.raises(ValueError, match=message):
        ClientConfig.load(path)


def test_perturbation_must_be_a_mapping() -> None:
    with pytest.raises(ValueError, match="perturbation must be a mapping"):
        TrainSettings(data=BUNDLED_DATASET, model_path=Path("m"), perturbation=1.0)  # type: ignore[arg-type]


# --- in the trainer, against a body run in this process ------------------------------------


class LocalBackbone:
    """What the trainer talks to, with the body in this process: records what it is sent."""

    session_id = "local-session"

    def __init__(self, model_path: Path) -> None:
        self.body = load_body(model_path, 1, 1)
        self.body.requires_grad_(False)
        self.step = 0
        self.hidden: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.grads: list[tuple[torch.Tensor, torch.Tensor]] = []

    def open_session(self, request: SessionRequest) -> SessionInfo:
        return SessionInfo(self.session_id, self.step, bool(request.session_id), ModelInfo())

    def close_session(self, session_id: str) -> None:
        pass


class LocalStream:
    """Stands in for TrainStream: runs the body locally and keeps what crossed the wire."""

    def __init__(
        self, client: LocalBackbone, session_id: str, encoding: str, *more: Any, **options: Any
    ) -> None:
        # ``more``/``options``: whatever else TrainStream takes (sealing, ...), unused here.
        self.backbone = client
        self.pending: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        # Replies of the pipelined schedule's sends (send_forward, send_backward), in order.
        self.replies: deque[tuple[backbone_pb2.TrainResponse, torch.Tensor]] = deque()

    def send_forward(
        self, step: int, micro: int, hidden: torch.Tensor, mask: torch.Tensor, *, train: bool = True
    ) -> None:
        out = self.forward(step, micro, hidden, mask, train=train)
        op = backbone_pb2.TRAIN_OP_FORWARD if train else backbone_pb2.TRAIN_OP_EVAL
        self.replies.append((backbone_pb2.TrainResponse(op=op, step=step, micro_batch=micro), out))

    def send_backward(self, step: int, micro: int, grad: torch.Tensor) -> None:
        out = self.backward(step, micro, grad)
        op = backbone_pb2.TRAIN_OP_BACKWARD
        self.replies.append((backbone_pb2.TrainResponse(op=op, step=step, micro_batch=micro), out))

    def receive(self) -> tuple[backbone_pb2.TrainResponse, torch.Tensor]:
        return self.replies.popleft()

    def forward(
        self, step: int, micro: int, hidden: torch.Tensor, mask: torch.Tensor, *, train: bool = True
    ) -> torch.Tensor:
        self.backbone.hidden.append((hidden.detach().clone(), mask.clone()))
        x = hidden.detach().requires_grad_(train)
        with torch.set_grad_enabled(train):
            out = self.backbone.body(x, mask)
        if train:
            self.pending[(step, micro)] = (x, out, mask)
        return out.detach()

    def backward(self, step: int, micro: int, grad: torch.Tensor) -> torch.Tensor:
        x, out, mask = self.pending.pop((step, micro))
        self.backbone.grads.append((grad.clone(), mask))
        (grad_in,) = torch.autograd.grad(out, x, grad)
        return grad_in

    def step(
        self, step: int, client_sq_norm: float, max_grad_norm: float
    ) -> backbone_pb2.StepResult:
        self.backbone.step = step
        return backbone_pb2.StepResult(backbone_grad_sq_norm=0.0)

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("model"), layers=4, hidden_size=32)


def make_trainer(
    model_path: Path,
    perturbation: PerturbationSettings,
    *,
    steps: int = 2,
    checkpoint_dir: Path | None = None,
    backbone: LocalBackbone | None = None,
    **overrides: Any,
) -> SplitTrainer:
    values: dict[str, Any] = dict(
        data=BUNDLED_DATASET,
        model_path=model_path,
        batch_size=4,
        accumulation=2,
        max_steps=steps,
        max_length=48,
        seed=3,
        checkpoint_dir=checkpoint_dir,
        perturbation=perturbation,
    )
    settings = TrainSettings(**(values | overrides))
    return SplitTrainer(
        backbone or LocalBackbone(model_path),  # type: ignore[arg-type]
        settings,
        AdapterSettings(kind="lora", r=2, alpha=4, seed=1),
        OptimizerSettings(learning_rate=1e-3),
    )


def run_trainer(
    model_path: Path, perturbation: PerturbationSettings, **options: Any
) -> tuple[SplitTrainer, list[StepReport], LocalBackbone]:
    trainer = make_trainer(model_path, perturbation, **options)
    reports = trainer.run()
    trainer.close()
    backbone = trainer.client
    assert isinstance(backbone, LocalBackbone)
    return trainer, reports, backbone


@pytest.fixture
def local_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trainer_module, "TrainStream", LocalStream)


def token_norms(
    records: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    real = torch.cat([torch.linalg.vector_norm(t[m.bool()], dim=-1) for t, m in records])
    padded = torch.cat([t[~m.bool()].flatten() for t, m in records])
    return real, padded


@pytest.mark.usefixtures("local_stream")
def test_trainer_without_perturbation_sends_the_head_output(model_path: Path) -> None:
    trainer = make_trainer(model_path, PerturbationSettings(), steps=1)
    batch = trainer.data.for_step(1)[0]
    with torch.no_grad():
        expected = trainer.head(batch.input_ids, batch.attention_mask)
    (report,) = trainer.run()
    assert trainer.accountant is None and trainer.privacy_spent() is None
    assert report.epsilon is None and report.delta is None and report.step_epsilon is None
    backbone = trainer.client
    assert isinstance(backbone, LocalBackbone)
    assert torch.equal(backbone.hidden[0][0], expected)


@pytest.mark.usefixtures("local_stream")
def test_trainer_clips_what_it_sends_both_ways(model_path: Path) -> None:
    # The tiny model's hidden states have norms of 0.09-0.15: 0.11 clips some of them.
    settings = PerturbationSettings(clip_norm=0.11, grad_clip_norm=1e-4)
    _, reports, backbone = run_trainer(
        model_path, settings, eval_data=BUNDLED_DATASET, eval_every=2, eval_batches=3
    )
    # 2 steps x 2 micro-batches, then 3 evaluation batches (no gradients).
    assert len(backbone.hidden) == 7 and len(backbone.grads) == 4
    real, padded = token_norms(backbone.hidden)
    assert (real <= 0.11 * (1 + 1e-6)).all()
    assert (real > 0.11 * (1 - 1e-6)).sum() > 10 and (real < 0.1).sum() > 10
    assert torch.equal(padded, torch.zeros_like(padded))
    grad_real, grad_padded = token_norms(backbone.grads)
    assert (grad_real <= 1e-4 * (1 + 1e-6)).all() and grad_real.max() > 1e-4 * (1 - 1e-6)
    assert torch.equal(grad_padded, torch.zeros_like(grad_padded))
    # Clipping without noise is no privacy at all.
    assert reports[-1].epsilon == math.inf


@pytest.mark.usefixtures("local_stream")
def test_trainer_noise_matches_the_configured_scale(model_path: Path) -> None:
    _, _, clean = run_trainer(model_path, PerturbationSettings(), steps=1)
    clip, sigma = 1e4, 2e-4  # the clip norm never bites: the difference is the noise
    settings = PerturbationSettings(clip_norm=clip, noise_multiplier=sigma, seed=9)
    _, _, noisy = run_trainer(model_path, settings, steps=1)
    noise = torch.cat(
        [
            (n[m.bool()] - c[m.bool()]).flatten()
            for (n, m), (c, _) in zip(noisy.hidden, clean.hidden, strict=True)
        ]
    ).double()
    assert noise.numel() > 3000
    assert noise.std().item() == pytest.approx(sigma * clip, rel=5 / math.sqrt(2 * noise.numel()))
    assert abs(noise.mean().item()) < 5 * sigma * clip / math.sqrt(noise.numel())
    # The same seed sends the same tensors.
    _, _, again = run_trainer(model_path, settings, steps=1)
    for (first, _), (second, _) in zip(noisy.hidden, again.hidden, strict=True):
        assert torch.equal(first, second)


@pytest.mark.usefixtures("local_stream")
def test_trainer_reports_the_accountants_epsilon(model_path: Path, tmp_path: Path) -> None:
    settings = PerturbationSettings(
        clip_norm=1.0, noise_multiplier=0.9, grad_clip_norm=0.01, grad_noise_multiplier=1.2
    )
    trainer, reports, backbone = run_trainer(model_path, settings, steps=3, checkpoint_dir=tmp_path)
    examples = len(trainer.data.encoded)
    sample_rate = 4 * 2 / examples
    assert trainer.sample_rate() == sample_rate
    sigma = 1 / math.sqrt(0.9**-2 + 1.2**-2)
    for report in reports:
        assert report.delta == 1e-5
        assert report.epsilon == pytest.approx(
            opacus_epsilon(sigma, sample_rate, report.step, 1e-5)
        )
        assert report.step_epsilon == pytest.approx(opacus_epsilon(sigma, sample_rate, 1, 1e-5))
    spent = trainer.privacy_spent()
    assert spent is not None and spent.steps == 3 and spent.epsilon == reports[-1].epsilon
    gauge = REGISTRY.get_sample_value("splitfed_privacy_epsilon", {"session": "local-session"})
    assert gauge == reports[-1].epsilon
    # Resuming from the checkpoint keeps counting from where the run stopped.
    assert json.loads((tmp_path / "privacy.json").read_text())["history"] == [
        [sigma, sample_rate, 3]
    ]
    resumed = dataclasses.replace(trainer.settings, max_steps=4)
    again = SplitTrainer(
        backbone,  # type: ignore[arg-type]
        resumed,
        trainer.adapter,
        trainer.optimizer_settings,
    )
    (last,) = again.run()
    again.close()
    assert last.step == 4
    assert last.epsilon == pytest.approx(opacus_epsilon(sigma, sample_rate, 4, 1e-5))
