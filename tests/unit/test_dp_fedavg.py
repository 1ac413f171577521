"""DP-FedAvg: clipping and equal weights, the noise on the sum in plain rounds (the
aggregator's) and with secure aggregation (the clients', through the real masking), the
accountant over rounds against opacus, and what the plan, the metric and the log report."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from aggregator_kit import MEMBERS, SHAPES, deltas, settings, upload
from opacus.accountants import RDPAccountant
from prometheus_client import REGISTRY
from scipy.stats import chi2

from splitfed.cli.status import federation_privacy
from splitfed.config import build
from splitfed.security.dp_fedavg import (
    client_noise_std,
    clip_factor,
    federation_epsilon,
    privatize_update,
    squared_norm,
)
from splitfed.security.secagg import Participant, SecAggParams
from splitfed.services.aggregator.federation import Federation
from splitfed.services.aggregator.settings import AggregatorSettings
from splitfed.services.aggregator.strategies import DPFedAvg, make_strategy

# One tensor of 4000 coordinates: each round gives 4000 samples of the noise.
BIG = {"w": (40, 100)}
BIG_SCHEMA = {"w": [40, 100]}


def dp(clip_norm: float = 1.0, noise_multiplier: float = 1.0, **more: float) -> dict[str, object]:
    return {
        "strategy": "dp_fedavg",
        "strategy_options": {
            "clip_norm": clip_norm,
            "noise_multiplier": noise_multiplier,
            **more,
        },
    }


def start(fed: Federation, members: str, samples: int = 100) -> None:
    for who in members:
        fed.join(who, samples)


def round_average(fed: Federation, version: int) -> dict[str, torch.Tensor]:
    """What round ``version`` added to the global offset."""
    now = fed.offset(version)
    before = fed.offset(version - 1)
    return {n: t.double() - before.get(n, torch.zeros_like(t)).double() for n, t in now.items()}


def within_chi_square(noise: torch.Tensor, std: float, alpha: float = 1e-3) -> tuple[float, bool]:
    """Whether ``noise`` (mean 0 by construction) has standard deviation ``std``: sum
    x^2 / std^2 is chi-square with N degrees of freedom; two-sided test at ``alpha``.
    Returns the variance ratio and the verdict."""
    count = noise.numel()
    statistic = float(noise.double().square().sum()) / std**2
    low, high = chi2.ppf(alpha / 2, count), chi2.ppf(1 - alpha / 2, count)
    return statistic / count, bool(low < statistic < high)


# --- the strategy and its options ---------------------------------------------------------


def test_options_are_validated_with_errors_that_say_what_to_set() -> None:
    assert make_strategy("dp_fedavg", {"clip_norm": 2, "noise_multiplier": 0.5}) == DPFedAvg(
        clip_norm=2, noise_multiplier=0.5
    )
    with pytest.raises(ValueError, match=r"dp_fedavg needs clip_norm .* and noise_multiplier"):
        make_strategy("dp_fedavg", {"clip_norm": 1.0})
    with pytest.raises(ValueError, match=r"dp_fedavg needs clip_norm .* and noise_multiplier"):
        make_strategy("dp_fedavg", {})
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="clip_norm > 0"):
            make_strategy("dp_fedavg", {"clip_norm": bad, "noise_multiplier": 1.0})
    for bad in (-0.1, math.inf, math.nan):
        with pytest.raises(ValueError, match="noise_multiplier >= 0"):
            make_strategy("dp_fedavg", {"clip_norm": 1.0, "noise_multiplier": bad})
    for bad in (0.0, 1.0, 2.0):
        with pytest.raises(ValueError, match="0 < delta < 1"):
            make_strategy("dp_fedavg", {"clip_norm": 1, "noise_multiplier": 1, "delta": bad})
    with pytest.raises(ValueError, match="dp_fedavg's delta must be a number, got '1e-05'"):
        make_strategy("dp_fedavg", {"clip_norm": 1, "noise_multiplier": 1, "delta": "1e-05"})
    with pytest.raises(ValueError, match="unexpected keyword argument 'sigma'"):
        make_strategy("dp_fedavg", {"clip_norm": 1, "noise_multiplier": 1, "sigma": 1})
    # Through the federation's settings: plain and secure rounds, not server adapters.
    settings(**dp())
    settings(**dp(), secure_aggregation=True)
    with pytest.raises(ValueError, match="dp_fedavg does not cover server-side adapters"):
        settings(**dp(), server_adapters=True, backbones=("127.0.0.1:1",))
    config = {
        "state_dir": "x",
        "federations": [
            {
                "name": "f",
                "members": ["a"],
                "schema": {"w": [1]},
                "strategy": "dp_fedavg",
                "strategy_options": {"noise_multiplier": 1.0},
            }
        ],
    }
    with pytest.raises(ValueError, match=r"\[federations\[0\]\] dp_fedavg needs clip_norm"):
        build(AggregatorSettings, config, "aggregator")
    # Robust strategies stay plain-rounds-only.
    with pytest.raises(ValueError, match="secure aggregation"):
        settings(strategy="median", secure_aggregation=True)


def test_privatize_clips_the_whole_update_and_refuses_non_finite_values() -> None:
    update = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[0.0, 4.0]])}  # norm 5
    assert squared_norm(update) == 25.0
    assert clip_factor(25.0, 10.0) == 1.0 and clip_factor(25.0, 1.0) == 0.2
    clipped = privatize_update(update, 1.0, 0.0)
    torch.testing.assert_close(clipped["a"], torch.tensor([0.6, 0.0]))
    torch.testing.assert_close(clipped["b"], torch.tensor([[0.0, 0.8]]))
    same = privatize_update(update, 10.0, 0.0)  # short enough: unchanged
    assert all(torch.equal(same[n], update[n]) for n in update)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    noisy = privatize_update(update, 1.0, 0.5, g1)
    assert torch.equal(noisy["a"], privatize_update(update, 1.0, 0.5, g2)["a"])
    assert not torch.equal(noisy["a"], clipped["a"])
    with pytest.raises(ValueError, match="NaN or infinite"):
        privatize_update({"a": torch.tensor([math.nan])}, 1.0, 0.0)
    with pytest.raises(ValueError, match="clip_norm must be a finite number > 0"):
        privatize_update(update, 0.0, 0.0)
    assert client_noise_std(2.0, 0.5, 4) == 0.5


# --- plain rounds: the aggregator clips and noises -----------------------------------------


def test_without_noise_and_with_a_large_clip_it_is_fedavg_exactly(tmp_path: Path) -> None:
    """Every client declares the same samples (a power of two, so that FedAvg's weighting
    is exact in float32): the global versions are bit for bit FedAvg's."""
    plain = Federation(settings(min_clients=3), tmp_path / "fedavg")
    private = Federation(
        settings(min_clients=3, **dp(clip_norm=1e6, noise_multiplier=0.0)), tmp_path / "dp"
    )
    for fed in (plain, private):
        start(fed, "abc")
        for round_ in range(3):
            for index, who in enumerate("abc"):
                upload(fed, who, deltas(10 * round_ + index, scale=3.0), 8)
        assert fed.state.version == 3
    for version in (1, 2, 3):
        ours, theirs = private.offset(version), plain.offset(version)
        assert ours.keys() == theirs.keys()
        for name in ours:
            assert torch.equal(ours[name], theirs[name]), (version, name)


def test_updates_are_clipped_and_weighed_equally_whatever_their_samples(
    tmp_path: Path,
) -> None:
    fed = Federation(settings(min_clients=3, **dp(clip_norm=0.5, noise_multiplier=0.0)), tmp_path)
    start(fed, "abc", samples=1000)
    updates = {"a": deltas(1, 10.0), "b": deltas(2, 0.01), "c": deltas(3, 1.0)}
    for who, samples in zip("abc", (1000, 1, 7), strict=True):
        upload(fed, who, updates[who], samples)
    for name, value in fed.offset(1).items():
        expected = sum(privatize_update(u, 0.5, 0.0)[name] for u in updates.values()) / 3
        torch.testing.assert_close(value, expected)
    # b's update is shorter than the clip: it counts as it is, like the others, with 1/3.
    assert squared_norm(updates["b"]) < 0.25


def test_the_aggregator_adds_the_target_noise_to_the_sum(tmp_path: Path) -> None:
    sigma, clip = 1.5, 0.2
    fed = Federation(
        settings(
            min_clients=2, rounds=4, schema=BIG_SCHEMA, **dp(clip_norm=clip, noise_multiplier=sigma)
        ),
        tmp_path,
    )
    start(fed, "ab")
    g = torch.Generator().manual_seed(0)
    noise = []
    for version in (1, 2, 3, 4):
        updates = {w: {"w": torch.randn(BIG["w"], generator=g)} for w in "ab"}
        for who, update in updates.items():
            upload(fed, who, update, 5)
        clipped = sum(privatize_update(u, clip, 0.0)["w"].double() for u in updates.values())
        noise.append(round_average(fed, version)["w"] * 2 - clipped)
    ratio, ok = within_chi_square(torch.cat([n.reshape(-1) for n in noise]), sigma * clip)
    assert ok, f"noise variance / target variance = {ratio:.4f}"


# --- secure aggregation: the clients noise, the masked sum carries the target --------------


def secure_dp_round(
    fed: Federation,
    updates: dict[str, dict[str, torch.Tensor]],
    dropped: str,
    seed: int,
) -> None:
    """One securely aggregated round as the clients run it: keys, each client clips and
    noises its update with the plan's parameters (the function FederatedTrainer uses),
    weighs it 1, masks it; the ``dropped`` never upload, the others reveal for them."""
    s = fed.state
    params = SecAggParams(fed.settings.name, s.round, scale=fed.settings.secagg_scale)
    people = {who: Participant(who, params) for who in s.selected}
    for who, person in people.items():
        fed.advertise_key(who, s.round, s.attempt, person.public_key)
    for index, (who, person) in enumerate(sorted(people.items())):
        plan = fed.plan(who).plan
        assert plan.private and plan.dp_client_noise_std > 0
        person.set_peers({p.identity: p.public_key for p in plan.peers})
        if who in dropped:
            continue
        generator = torch.Generator().manual_seed(1000 * seed + index)
        private = privatize_update(
            updates[who], plan.dp_clip_norm, plan.dp_client_noise_std, generator
        )
        masked = {
            n: torch.from_numpy(person.encode_and_mask(n, t, 1.0).view("int64").reshape(t.shape))
            for n, t in private.items()
        }
        upload(fed, who, masked, 100)
    if dropped:
        fed.tick(fed.state.deadline + 1)
        assert fed.state.dropped == sorted(dropped)
        for who, person in people.items():
            if who not in dropped:
                fed.reveal(who, s.round, s.attempt, person.reveal(sorted(dropped)))


@pytest.mark.parametrize(
    ("members", "min_clients", "dropped", "ratio"),
    [("abc", 3, "", 1.0), ("abcd", 3, "d", 1.0), ("abcd", 3, "", 4 / 3)],
    ids=["all-contribute", "one-drops-out", "more-than-the-minimum"],
)
def test_with_secure_aggregation_the_unmasked_sum_carries_the_target_noise(
    tmp_path: Path, members: str, min_clients: int, dropped: str, ratio: float
) -> None:
    """Each client adds N(0, (sigma C)^2 / min_clients): m contributors give the sum a
    noise variance of (sigma C)^2 m / min_clients, the target when m = min_clients (also
    after a dropout), more when more contribute (the documented price of dropouts)."""
    sigma, clip, rounds = 1.2, 0.5, 8
    fed = Federation(
        settings(
            members=tuple(members),
            min_clients=min_clients,
            start_clients=len(members),
            rounds=rounds,
            schema=BIG_SCHEMA,
            secure_aggregation=True,
            **dp(clip_norm=clip, noise_multiplier=sigma),
        ),
        tmp_path,
    )
    start(fed, members)
    g = torch.Generator().manual_seed(42)
    noise = []
    for version in range(1, rounds + 1):
        updates = {w: {"w": torch.randn(BIG["w"], generator=g) * 0.1} for w in members}
        secure_dp_round(fed, updates, dropped, version)
        assert fed.state.version == version
        contributors = [w for w in members if w not in dropped]
        assert fed.state.history[-1]["contributors"] == {w: 100 for w in contributors}
        clipped = sum(privatize_update(updates[w], clip, 0.0)["w"].double() for w in contributors)
        noise.append(round_average(fed, version)["w"] * len(contributors) - clipped)
    samples = torch.cat([n.reshape(-1) for n in noise])
    assert abs(float(samples.mean())) < 4 * sigma * clip * math.sqrt(ratio / samples.numel())
    measured, ok = within_chi_square(samples, sigma * clip * math.sqrt(ratio))
    assert ok, f"noise variance / expected variance = {measured:.4f}"
    # The test can tell the target from the alternatives: noise sized for every peer
    # instead of min_clients (a dropout would then lower it), or no noise at all.
    if ratio != 1.0:
        assert not within_chi_square(samples, sigma * clip)[1]


# --- the accountant ---------------------------------------------------------------------


def opacus_epsilon(sigma: float, rate: float, rounds: int, delta: float) -> float:
    accountant = RDPAccountant()
    for _ in range(rounds):
        accountant.step(noise_multiplier=sigma, sample_rate=rate)
    return float(accountant.get_epsilon(delta))


@pytest.mark.parametrize(
    ("fraction", "rate"), [(1.0, 1.0), (0.5, 0.6)], ids=["every-member", "sampled"]
)
def test_epsilon_is_opacus_over_the_closed_rounds_and_survives_a_restart(
    tmp_path: Path, fraction: float, rate: float, caplog: pytest.LogCaptureFixture
) -> None:
    """q is the fraction of the members selected: sample_fraction 0.5 of 5 members
    selects max(min_clients, ceil(2.5)) = 3, q = 0.6; every member, q = 1."""
    sigma, delta, name = 1.1, 1e-6, f"eps-{int(fraction * 10)}"
    fed_settings = settings(
        name=name,
        rounds=4,
        start_clients=len(MEMBERS),
        sample_fraction=fraction,
        **dp(clip_norm=1.0, noise_multiplier=sigma, delta=delta),
    )
    fed = Federation(fed_settings, tmp_path)
    assert fed.plan("a").plan.dp_epsilon == 0.0  # nothing released yet
    start(fed, MEMBERS)
    expected_rate = len(fed.state.selected) / len(MEMBERS)
    assert expected_rate == rate
    with caplog.at_level(logging.INFO, logger="splitfed.services.aggregator.federation"):
        for _ in range(3):
            for who in fed.state.selected:
                upload(fed, who, deltas(ord(who)), 10)
    assert fed.state.version == 3
    expected = opacus_epsilon(sigma, expected_rate, 3, delta)
    assert fed.epsilon == pytest.approx(expected, rel=1e-12)
    plan = fed.plan("a").plan
    assert (plan.dp_epsilon, plan.dp_delta) == (fed.epsilon, delta)
    assert (plan.dp_clip_norm, plan.dp_noise_multiplier, plan.dp_client_noise_std) == (
        1.0,
        sigma,
        0.0,  # plain rounds: the aggregator adds the noise
    )
    gauge = REGISTRY.get_sample_value("splitfed_federation_epsilon", {"federation": name})
    assert gauge == pytest.approx(expected, rel=1e-12)
    assert f"dp_fedavg epsilon {expected:.4g} at delta 1e-06" in caplog.text
    assert federation_privacy(plan.to_proto()).startswith(f"dp_fedavg epsilon {expected:.4g}")
    # A restarted aggregator derives it from the rounds state.json holds.
    again = Federation(fed_settings, tmp_path)
    assert again.epsilon == fed.epsilon
    assert again.state.history[-1]["dp"]["sample_rate"] == expected_rate
    assert federation_epsilon([(sigma, expected_rate)] * 3, delta) == fed.epsilon


def test_federations_without_dp_fedavg_say_not_private(tmp_path: Path) -> None:
    fed = Federation(settings(name="plain-one"), tmp_path)
    start(fed, "ab")
    upload(fed, "a", deltas(1), 1)
    upload(fed, "b", deltas(2), 1)
    plan = fed.plan("a").plan
    assert not plan.private and plan.dp_epsilon == 0.0
    assert federation_privacy(plan.to_proto()) == "not private"
    assert "dp" not in fed.state.history[-1]
    labels = {"federation": "plain-one"}
    assert REGISTRY.get_sample_value("splitfed_federation_epsilon", labels) is None
    # Switched to dp_fedavg later: the round closed without noise makes epsilon infinite.
    switched = Federation(settings(name="plain-one", **dp()), tmp_path)
    assert switched.epsilon == math.inf
    assert "epsilon inf" in federation_privacy(switched.plan("a").plan.to_proto())


def test_secure_rounds_tell_the_clients_their_noise(tmp_path: Path) -> None:
    fed = Federation(
        settings(min_clients=4, secure_aggregation=True, **dp(clip_norm=0.5, noise_multiplier=2.0)),
        tmp_path,
    )
    plan = fed.plan("a").plan
    assert plan.dp_client_noise_std == pytest.approx(2.0 * 0.5 / 2)  # sigma C / sqrt(4)
    assert SHAPES  # the kit's schema
