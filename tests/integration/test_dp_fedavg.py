"""DP-FedAvg rounds with real processes over mTLS: a backbone, the aggregator with
strategy dp_fedavg, and three `splitfed train` clients; with secure aggregation (the
clients clip and noise) and without (the aggregator does)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from federated_kit import federation, split_dataset
from opacus.accountants import RDPAccountant

from splitfed.cli import cli
from splitfed.security.dp_fedavg import privatize_update, squared_norm

CLIP, SIGMA, DELTA, ROUNDS = 1e-3, 0.5, 1e-5, 2


# make test-long: the noise, its clipping and the accounting (the aggregator's and the
# clients' share under secure aggregation) are checked in tests/unit/test_dp_fedavg.py.
@pytest.mark.long
@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secure-aggregation"])
def test_a_dp_fedavg_federation_completes_and_reports_its_epsilon(
    tmp_path: Path, secure: bool
) -> None:
    fed = federation(
        tmp_path,
        rounds=ROUNDS,
        secure_aggregation=secure,
        strategy="dp_fedavg",
        # delta: the default 1e-5 (the kit writes YAML, which reads 1e-05 as a string).
        strategy_options={"clip_norm": CLIP, "noise_multiplier": SIGMA},
    )
    try:
        names = ["hospital-a", "hospital-b", "bank-c"]
        data = split_dataset(fed.root, [6, 10, 16])
        configs = [fed.client_config(n, p) for n, p in zip(names, data, strict=True)]
        processes = [fed.run_client(c, n) for c, n in zip(configs, names, strict=True)]
        for name, process in zip(names, processes, strict=True):
            assert process.wait(timeout=300) == 0, (fed.root / f"{name}.log").read_text()[-3000:]
        previous: dict[str, torch.Tensor] = {}
        for round_ in range(1, ROUNDS + 1):
            # What each client sent, before masking: with secure aggregation its clipped,
            # noised update; in plain rounds its delta as trained.
            sent = [fed.updates(n)[f"round{round_}-attempt1"][0] for n in names]
            offset = fed.version(round_)
            step = {k: v - previous.get(k, torch.zeros_like(v)) for k, v in offset.items()}
            previous = offset
            if secure:
                # The global step is the plain mean of what was sent (weights 1, not the
                # samples 6/10/16), exact up to the fixed point's rounding.
                for tensor_name, value in step.items():
                    expected = sum(update[tensor_name] for update in sent) / len(sent)
                    torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
                # Each sent update is a clipped one plus N(0, (sigma C)^2 / 3) noise.
                coordinates = sum(t.numel() for t in sent[0].values())
                for update in sent:
                    ratio = squared_norm(update) / (coordinates * (SIGMA * CLIP) ** 2 / 3)
                    assert 0.5 < ratio < 2.0, ratio
            else:
                # Clipped by the aggregator, weighed 1, noise sigma C on the sum (fresh OS
                # randomness: a wide band, N coordinates make it certain).
                clipped = [privatize_update(u, CLIP, 0.0) for u in sent]
                assert all(squared_norm(u) > CLIP**2 for u in sent)  # clipping is active
                noise = torch.cat(
                    [
                        (step[k].double() - sum(c[k].double() for c in clipped) / 3).reshape(-1)
                        for k in step
                    ]
                )
                ratio = float(noise.square().mean()) / (SIGMA * CLIP / 3) ** 2
                assert 0.5 < ratio < 2.0, ratio
        accountant = RDPAccountant()
        for _ in range(ROUNDS):
            accountant.step(noise_multiplier=SIGMA, sample_rate=1.0)
        epsilon = accountant.get_epsilon(DELTA)
        log = (fed.root / "aggregator.log").read_text()
        assert f"dp_fedavg epsilon {epsilon:.4g} at delta 1e-05" in log
        # `splitfed status` with a client's config shows the federation's epsilon.
        report_path = fed.root / "status.json"
        result = CliRunner().invoke(
            cli, ["status", "--config", str(configs[0]), "--json", str(report_path)]
        )
        assert result.exit_code == 0, result.output
        services = json.loads(report_path.read_text())["services"]
        (aggregator,) = [s for s in services if s["service"] == "aggregator"]
        privacy = aggregator["details"]["privacy"]
        assert privacy.startswith(f"dp_fedavg epsilon {epsilon:.4g} at delta 1e-05"), privacy
        if secure:
            assert "DP-FedAvg: update clipped" in (fed.root / "hospital-a.log").read_text()
    finally:
        fed.stop()
