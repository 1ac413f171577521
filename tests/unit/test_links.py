"""The link policy (choose_encodings), the link meter and encoding = "auto", with a fake
clock and a fake link: no network, no timing."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from splitfed.clients.links import (
    LADDER,
    RAW,
    AutoEncodings,
    Exchange,
    LinkMeter,
    LinkPolicy,
    StepSample,
    WireEncodings,
    bandwidth,
    choose_encodings,
    step_bytes,
)
from splitfed.clients.trainer import SplitTrainer, TrainSettings

MiB = 1 << 20
# The bench step (batch 4 x 256 tokens, hidden 512, float32): h1, h2, dL/dh2, dL/dh1.
STEP = 4 * 2 * MiB
BF16 = WireEncodings("bf16", "bf16")
INT8_BF16 = WireEncodings("int8", "bf16")
INT8 = WireEncodings("int8", "int8")
MBIT = 1e6 / 8  # bytes per second


def test_ladder_runs_from_most_to_least_bytes() -> None:
    sizes = [step_bytes(rung, STEP) for rung in LADDER]
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[0] == STEP and sizes[1] == STEP / 2
    assert STEP / 4 < sizes[-1] < STEP / 4 * 1.01  # int8: a scale per row of 4096


def test_wire_encodings_refuse_unknown_names() -> None:
    with pytest.raises(ValueError, match="gradients encoding 'fp4' is unknown"):
        WireEncodings("raw", "fp4")
    assert str(BF16) == "bf16"
    assert str(INT8_BF16) == "activations int8, gradients bf16"


@pytest.mark.parametrize(
    ("profile", "bandwidth_bytes_s", "rtt_s", "expected"),
    [
        ("loopback", 2e9, 0.0001, RAW),
        ("lan", 1000 * MBIT, 0.0005, RAW),
        ("metro", 1000 * MBIT, 0.005, RAW),  # 67 ms of 1 s compute: within the 10 %
        ("wan", 100 * MBIT, 0.040, INT8),  # even int8 takes 170 ms: the cheapest
        ("poor", 20 * MBIT, 0.100, INT8),
    ],
)
def test_policy_on_the_issue_profiles(
    profile: str, bandwidth_bytes_s: float, rtt_s: float, expected: WireEncodings
) -> None:
    assert choose_encodings(bandwidth_bytes_s, rtt_s, STEP, 1.0) == expected, profile


def test_policy_takes_the_most_precise_rung_that_fits() -> None:
    # 100 Mbit/s: raw 0.67 s, bf16 0.34 s, int8/bf16 0.25 s, int8 0.17 s per step.
    wan = 100 * MBIT
    assert choose_encodings(wan, 0.04, STEP, 7.0) == RAW
    assert choose_encodings(wan, 0.04, STEP, 3.5) == BF16
    assert choose_encodings(wan, 0.04, STEP, 2.6) == INT8_BF16
    assert choose_encodings(wan, 0.04, STEP, 1.8) == INT8


def test_a_local_link_stays_raw_whatever_the_compute() -> None:
    # A GPU's 10 ms step on a slow LAN: the rule alone would compress; the RTT says local.
    assert choose_encodings(100 * MBIT, 0.0008, STEP, 0.01) == RAW
    assert choose_encodings(100 * MBIT, 0.003, STEP, 0.01) == INT8


def test_tiny_transfers_are_free() -> None:
    assert choose_encodings(10 * MBIT, 0.05, 4096, 0.0) == RAW  # 3 ms < free_s
    assert choose_encodings(10 * MBIT, 0.05, 4096, 0.0, policy=LinkPolicy(free_s=0)) == INT8


def test_policy_keeps_to_the_accepted_encodings() -> None:
    assert choose_encodings(20 * MBIT, 0.1, STEP, 1.0, accepted=["raw", "bf16"]) == BF16
    assert choose_encodings(20 * MBIT, 0.1, STEP, 1.0, accepted=["raw"]) == RAW
    # Only int8: the one rung it makes, even on loopback.
    assert choose_encodings(2e9, 0.0001, STEP, 1.0, accepted=["int8"]) == INT8
    with pytest.raises(ValueError, match="none of the encodings"):
        choose_encodings(20 * MBIT, 0.1, STEP, 1.0, accepted=[])


def test_moving_up_needs_the_margin() -> None:
    # raw needs 0.67 s at 100 Mbit/s: budget 0.7 s (compute 7 s) fits it from scratch...
    wan = 100 * MBIT
    assert choose_encodings(wan, 0.04, STEP, 7.0) == RAW
    # ...but coming from bf16 it must fit 0.8 x 0.7 = 0.56 s: it stays bf16.
    assert choose_encodings(wan, 0.04, STEP, 7.0, current=BF16) == BF16
    assert choose_encodings(wan, 0.04, STEP, 9.0, current=BF16) == RAW
    # Moving down needs no margin.
    assert choose_encodings(wan, 0.04, STEP, 3.5, current=RAW) == BF16


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeLink:
    """A link of ``bandwidth`` bytes/s and ``rtt`` s, and a backbone that computes for
    ``server_s`` per request, driving a LinkMeter through a fake clock."""

    bandwidth: float
    rtt: float
    server_s: float = 0.2
    clock: FakeClock = field(default_factory=FakeClock)

    def exchange(self, meter: LinkMeter, sent: int, received: int, raw: int) -> None:
        meter.sent(sent, raw // 2)
        waited = self.rtt + self.server_s + (sent + received) / self.bandwidth
        self.clock.now += waited
        meter.replied(received, raw // 2, self.server_s, waited)

    def run(self, meter: LinkMeter, encodings: WireEncodings, client_s: float = 0.6) -> float:
        """One step of one micro-batch: forward (h1 -> h2), backward (dL/dh2 -> dL/dh1),
        2 MiB float32 tensors in ``encodings``; its wall time."""
        started = self.clock.now
        self.clock.now += client_s
        for kind in ("activations", "gradients"):
            wire = int(step_bytes(WireEncodings(getattr(encodings, kind)), 2 * MiB))
            self.exchange(meter, wire, wire, 4 * MiB)
        return self.clock.now - started

    def step(self, meter: LinkMeter, encodings: WireEncodings) -> StepSample:
        return meter.finish_step(self.run(meter, encodings))


def test_meter_measures_the_fake_link() -> None:
    link = FakeLink(bandwidth=100 * MBIT, rtt=0.04)
    meter = LinkMeter(clock=link.clock)
    sample = link.step(meter, RAW)
    assert sample.raw_bytes == STEP
    assert sample.compute_s == pytest.approx(0.6 + 2 * 0.2)
    assert bandwidth(sample.exchanges, 0.04) == pytest.approx(100 * MBIT)
    # Exchanges sent while another is in flight do not measure the link.
    assert bandwidth([Exchange(1000, 1000, 5.0, 0.0, alone=False)], 0.04) == math.inf
    # Loopback: nothing left after compute and RTT.
    assert bandwidth([Exchange(STEP, STEP, 0.2, 0.2, alone=True)], 0.0001) == math.inf


def test_meter_marks_pipelined_exchanges() -> None:
    clock = FakeClock()
    meter = LinkMeter(clock=clock)
    meter.sent(100, 100)
    meter.sent(100, 100)  # a second request while the first is in flight
    clock.now = 1.0
    meter.replied(100, 100, 0.1, 1.0)
    meter.replied(100, 100, 0.1, 0.0)
    first, second = meter.finish_step(1.0).exchanges
    assert first.alone and not second.alone
    assert (first.wall_s, first.wire_bytes) == (1.0, 200)


def test_auto_switches_between_steps_as_the_link_changes(caplog: pytest.LogCaptureFixture) -> None:
    link = FakeLink(bandwidth=1000 * MBIT, rtt=0.005)
    meter = LinkMeter(clock=link.clock)
    probes: list[float] = []

    def rtt() -> float:
        probes.append(link.rtt)
        return link.rtt

    auto = AutoEncodings(["raw", "bf16", "int8"], rtt, every=3)
    used = []
    caplog.set_level(logging.INFO, logger="splitfed.clients.links")
    for step in range(1, 13):
        if step == 2:
            link.bandwidth, link.rtt = 20 * MBIT, 0.1  # the link degrades
        if step == 8:
            link.bandwidth, link.rtt = 1000 * MBIT, 0.005  # and recovers
        used.append(auto.current)
        auto.observe(link.step(meter, auto.current))
    # Decisions after steps 1, 4, 7 and 10: metro is raw, poor the cheapest rung.
    assert len(probes) == 4
    assert used == [RAW] * 4 + [INT8] * 6 + [RAW] * 2
    switches = [r.getMessage() for r in caplog.records if "->" in r.getMessage()]
    assert len(switches) == 2
    assert switches[0].startswith("[AutoEncodings] raw -> int8: bandwidth 2.5 MB/s")
    assert auto.estimate is not None and auto.estimate.rtt_s == 0.005


def test_auto_needs_every_of_at_least_one() -> None:
    with pytest.raises(ValueError, match="every must be >= 1"):
        AutoEncodings(["raw"], lambda: 0.0, every=0)


def settings(**values: Any) -> TrainSettings:
    return TrainSettings(data=Path("d.jsonl"), model_path=Path("m"), **values)


def test_train_settings_encodings() -> None:
    assert settings(encoding="auto").encoding == "auto"
    assert settings(encoding="int8", gradient_encoding="bf16").gradient_encoding == "bf16"
    with pytest.raises(ValueError, match="encoding 'fp4' is unknown; use 'auto' or one of"):
        settings(encoding="fp4")
    with pytest.raises(ValueError, match="gradient_encoding 'auto' is unknown"):
        settings(gradient_encoding="auto")
    with pytest.raises(ValueError, match='"auto" chooses the gradients'):
        settings(encoding="auto", gradient_encoding="raw")
    with pytest.raises(ValueError, match="encoding_every must be >= 1"):
        settings(encoding="auto", encoding_every=0)


def test_trainer_switches_its_stream_between_steps() -> None:
    """SplitTrainer._observe_link hands the step's sample to the policy and moves the
    stream to the new encodings (a stand-in trainer: no model, no backbone)."""
    link = FakeLink(bandwidth=20 * MBIT, rtt=0.1)
    meter = LinkMeter(clock=link.clock)
    stream = SimpleNamespace(encodings=RAW)
    trainer: Any = SimpleNamespace(
        link=meter,
        auto=AutoEncodings(["raw", "bf16", "int8"], lambda: 0.1),
        encodings=RAW,
        stream=stream,
    )
    # A step that reconnected measured the reconnection: left out.
    SplitTrainer._observe_link(trainer, 1, link.run(meter, RAW), retries=1)
    assert trainer.encodings == RAW and stream.encodings == RAW
    SplitTrainer._observe_link(trainer, 2, link.run(meter, RAW), retries=0)
    assert trainer.encodings == INT8 and stream.encodings == INT8
