"""Wire encodings chosen per link: what a training step sends in, how the link is
measured, and the policy that picks the encodings from the measurements.

A split step moves four tensors: h1 and dL/dh2 from the client, h2 and dL/dh1 from the
backbone. :class:`WireEncodings` names the encoding of the activations (h1, h2) and of
the gradients (dL/dh2, dL/dh1); the client sends its tensors in them and asks for the
replies in them (``reply_encoding`` of each request), so it can change them between steps.

:func:`choose_encodings` is the policy (docs/wire.md, *Choosing encodings per link*): the
most precise rung of :data:`LADDER` whose transfer time stays a small fraction of the
step's compute time. :class:`LinkMeter` measures the link from the training stream itself
(bytes and wall time of each exchange, less the backbone's reported compute time and one
round trip), :func:`measure_rtt` the round trip from small unary calls, and
:class:`AutoEncodings` re-applies the policy every few steps (``encoding = "auto"``).

Pure Python and torch: nothing here opens a connection (the RTT probe is a callable).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from splitfed.encodings import encoding_names, get_encoding

logger = logging.getLogger(__name__)

AUTO = "auto"


@dataclass(frozen=True)
class WireEncodings:
    """The wire encodings of one training step: ``activations`` for h1 (sent) and h2
    (replied), ``gradients`` for dL/dh2 (sent) and dL/dh1 (replied)."""

    activations: str = "raw"
    gradients: str = "raw"

    def __post_init__(self) -> None:
        for kind in ("activations", "gradients"):
            name = getattr(self, kind)
            if name not in encoding_names():
                raise ValueError(
                    f"{kind} encoding {name!r} is unknown; known: {', '.join(encoding_names())}"
                )

    def __str__(self) -> str:
        if self.activations == self.gradients:
            return self.activations
        return f"activations {self.activations}, gradients {self.gradients}"

    def usable(self, accepted: Iterable[str]) -> bool:
        allowed = set(accepted)
        return self.activations in allowed and self.gradients in allowed


RAW = WireEncodings()

# The rungs the policy climbs down, most precise first (fidelity measured by
# bench/encoding_fidelity.py; docs/wire.md has the table). Step bytes relative to raw
# float32: 1, 1/2, about 3/8, about 1/4.
LADDER: tuple[WireEncodings, ...] = (
    RAW,
    WireEncodings("bf16", "bf16"),
    WireEncodings("int8", "bf16"),
    WireEncodings("int8", "int8"),
)

_DTYPES = {2: torch.bfloat16, 4: torch.float32, 8: torch.float64}


def size_ratio(encoding: str, itemsize: int = 4, row: int = 4096) -> float:
    """Payload bytes of ``encoding`` per raw byte, for rows of ``row`` values of
    ``itemsize`` bytes (the hidden states' dtype)."""
    dtype = _DTYPES.get(itemsize, torch.float32)
    codec = get_encoding(encoding)
    if not codec.supports(dtype):
        return 1.0
    return codec.encoded_nbytes(dtype, (row,)) / (row * dtype.itemsize)


def step_bytes(encodings: WireEncodings, step_bytes_raw: float, itemsize: int = 4) -> float:
    """A step's bytes on the wire in ``encodings``, half of them activations and half
    gradients (h1, h2, dL/dh2, dL/dh1 all have one shape)."""
    ratio = size_ratio(encodings.activations, itemsize) + size_ratio(encodings.gradients, itemsize)
    return step_bytes_raw * ratio / 2


@dataclass(frozen=True)
class LinkPolicy:
    """The thresholds of :func:`choose_encodings` (docs/wire.md).

    ``slack``: a rung fits when its transfer takes at most this fraction of the step's
    compute time (a sequential step then slows by at most that much; a pipelined one
    hides it). ``free_s``: transfers shorter than this never cost precision. ``local_rtt_s``:
    a link with a round trip below this is loopback or a LAN, and stays raw whatever
    the compute. ``margin``: moving back up to a more precise rung needs its transfer to
    fit ``margin`` times the budget (no flapping at the boundary).
    """

    slack: float = 0.1
    free_s: float = 0.005
    local_rtt_s: float = 0.002
    margin: float = 0.8

    def __post_init__(self) -> None:
        if self.slack <= 0 or self.free_s < 0 or self.local_rtt_s < 0:
            raise ValueError("slack must be > 0, free_s and local_rtt_s >= 0")
        if not 0 < self.margin <= 1:
            raise ValueError(f"margin must be in (0, 1], got {self.margin}")


def choose_encodings(
    bandwidth_bytes_s: float,
    rtt_s: float,
    step_bytes_raw: float,
    compute_s: float,
    *,
    accepted: Iterable[str] | None = None,
    current: WireEncodings | None = None,
    policy: LinkPolicy = LinkPolicy(),
    itemsize: int = 4,
) -> WireEncodings:
    """The most precise rung of :data:`LADDER` (of those whose encodings the backbone
    ``accepted``) whose transfer, ``step_bytes(rung) / bandwidth``, fits the budget
    ``max(free_s, slack * compute_s)``; the cheapest usable rung when none fits. A link
    whose ``rtt_s`` is below ``local_rtt_s`` stays raw. With ``current``, a rung more
    precise than it must fit ``margin`` times the budget.

    The round trip costs every encoding the same (no encoding shortens it), so it does
    not enter the budget; it only tells a local link."""
    names = encoding_names() if accepted is None else list(accepted)
    rungs = [rung for rung in LADDER if rung.usable(names)]
    if not rungs:
        raise ValueError(f"none of the encodings {sorted(names)} makes a rung of the ladder")
    if rtt_s < policy.local_rtt_s and rungs[0] == RAW:
        return RAW
    budget = max(policy.free_s, policy.slack * max(compute_s, 0.0))
    position = rungs.index(current) if current in rungs else 0
    for index, rung in enumerate(rungs):
        if bandwidth_bytes_s <= 0:
            break
        seconds = step_bytes(rung, step_bytes_raw, itemsize) / bandwidth_bytes_s
        allowed = budget * (policy.margin if index < position else 1.0)
        if seconds <= allowed:
            return rung
    return rungs[-1]


def measure_rtt(probe: Callable[[], object], samples: int = 3) -> float:
    """The link's round trip: the shortest of ``samples`` calls of ``probe`` (a small
    unary call, e.g. ``BackboneClient.model_info``)."""
    times = []
    for _ in range(max(1, samples)):
        started = time.perf_counter()
        probe()
        times.append(time.perf_counter() - started)
    return min(times)


@dataclass(frozen=True)
class Exchange:
    """One request and its reply on the training stream: bytes on the wire both ways,
    the raw (decoded) bytes of the float tensors, the wall time from the first send to
    the reply, the backbone's reported compute time, and whether it ran alone (nothing
    else of the stream in flight when it was sent, so its wall time is its own)."""

    wire_bytes: int
    raw_bytes: int
    wall_s: float
    server_s: float
    alone: bool


@dataclass(frozen=True)
class StepSample:
    """What a step did on the link: its wall time, the time the client spent waiting
    for replies, and its exchanges."""

    wall_s: float
    waited_s: float
    exchanges: tuple[Exchange, ...]

    @property
    def raw_bytes(self) -> int:
        return sum(e.raw_bytes for e in self.exchanges)

    @property
    def compute_s(self) -> float:
        """Client compute (the wall time not spent waiting) plus the backbone's."""
        server = sum(e.server_s for e in self.exchanges)
        return max(0.0, self.wall_s - self.waited_s) + server


@dataclass
class LinkMeter:
    """Counts the exchanges of a training stream (``TrainStream`` calls :meth:`sent` and
    :meth:`replied`, in order: replies come back in the order requests went out) and
    the time the client waits for replies; :meth:`finish_step` hands over a step's."""

    clock: Callable[[], float] = time.perf_counter
    _pending: deque[tuple[float, int, int, bool]] = field(default_factory=deque)
    _done: list[Exchange] = field(default_factory=list)
    _waited: float = 0.0

    def sent(self, wire_bytes: int, raw_bytes: int) -> None:
        self._pending.append((self.clock(), wire_bytes, raw_bytes, not self._pending))

    def replied(self, wire_bytes: int, raw_bytes: int, server_s: float, waited_s: float) -> None:
        self._waited += waited_s
        if not self._pending:
            return
        started, sent_wire, sent_raw, alone = self._pending.popleft()
        self._done.append(
            Exchange(
                sent_wire + wire_bytes,
                sent_raw + raw_bytes,
                self.clock() - started,
                server_s,
                alone,
            )
        )

    def reset(self) -> None:
        """Forget what is in flight (the stream was lost)."""
        self._pending.clear()

    def finish_step(self, wall_s: float) -> StepSample:
        sample = StepSample(wall_s, self._waited, tuple(self._done))
        self._done, self._waited = [], 0.0
        return sample


def bandwidth(exchanges: Sequence[Exchange], rtt_s: float) -> float:
    """Bytes per second over the exchanges that ran alone: their bytes over their wall
    time less the backbone's compute and one round trip each. ``inf`` when that time is
    too short to measure (below 0.1 ms per exchange: loopback)."""
    alone = [e for e in exchanges if e.alone]
    if not alone:
        return math.inf
    seconds = sum(max(0.0, e.wall_s - e.server_s - rtt_s) for e in alone)
    if seconds < 1e-4 * len(alone):
        return math.inf
    return sum(e.wire_bytes for e in alone) / seconds


@dataclass(frozen=True)
class LinkEstimate:
    bandwidth_bytes_s: float
    rtt_s: float
    step_bytes_raw: float
    compute_s: float


class AutoEncodings:
    """``encoding = "auto"``: the policy applied to the link as measured. Feed it each
    step's :class:`StepSample`; after the first step and then every ``every`` steps it
    re-measures the round trip (``rtt``), estimates bandwidth and compute from the steps
    since the last decision, and returns the new encodings when they change (to be used
    from the next step on), else None."""

    def __init__(
        self,
        accepted: Iterable[str],
        rtt: Callable[[], float],
        *,
        every: int = 4,
        policy: LinkPolicy = LinkPolicy(),
        start: WireEncodings = RAW,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.accepted = tuple(accepted)
        self.rtt = rtt
        self.every = every
        self.policy = policy
        self.current = start
        self.estimate: LinkEstimate | None = None
        self._samples: list[StepSample] = []
        self._decisions = 0

    def observe(self, sample: StepSample) -> WireEncodings | None:
        if not sample.exchanges:
            return None
        self._samples.append(sample)
        if len(self._samples) < (1 if self._decisions == 0 else self.every):
            return None
        samples, self._samples = self._samples, []
        self._decisions += 1
        rtt_s = self.rtt()
        exchanges = [e for s in samples for e in s.exchanges]
        self.estimate = LinkEstimate(
            bandwidth_bytes_s=bandwidth(exchanges, rtt_s),
            rtt_s=rtt_s,
            step_bytes_raw=statistics.median(s.raw_bytes for s in samples),
            compute_s=statistics.median(s.compute_s for s in samples),
        )
        chosen = choose_encodings(
            self.estimate.bandwidth_bytes_s,
            self.estimate.rtt_s,
            self.estimate.step_bytes_raw,
            self.estimate.compute_s,
            accepted=self.accepted,
            current=self.current,
            policy=self.policy,
        )
        if chosen == self.current:
            return None
        logger.info(
            "[AutoEncodings] %s -> %s: bandwidth %.3g MB/s, RTT %.1f ms, %.3g MB per step "
            "raw, compute %.3f s per step",
            self.current,
            chosen,
            self.estimate.bandwidth_bytes_s / 1e6,
            self.estimate.rtt_s * 1e3,
            self.estimate.step_bytes_raw / 1e6,
            self.estimate.compute_s,
        )
        self.current = chosen
        return chosen
