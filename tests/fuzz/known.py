"""Bugs the fuzzer found in code this suite does not fix (services being rewritten).

Each entry matches the failures one bug causes, and names the strict-xfail test (in
tests/fuzz/test_live_services.py, beside the deployment it needs) that reproduces it in a
few lines. `make test` tolerates
matching failures (the repro keeps the bug visible: once fixed, the xfail passes and
fails the suite, and the entry goes); `make fuzz` counts them like any other failure.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from fuzz.harness import Case, Outcome

from splitfed.v1 import backbone_pb2


@dataclass(frozen=True)
class Known:
    name: str
    repro: str
    matches: Callable[[Case, Outcome, str], bool]


# The largest LoRA rank a tiny test model could plausibly want; above it, no cap exists.
PLAUSIBLE_RANK = 4096


def _huge_lora_rank(case: Case, outcome: Outcome, problem: str) -> bool:
    if not case.method.endswith("/OpenSession"):
        return False
    try:
        request = backbone_pb2.OpenSessionRequest.FromString(case.messages[0])
    except Exception:
        return False
    return request.adapter.lora.r > PLAUSIBLE_RANK and (
        problem == "status INTERNAL" or problem.startswith("resident memory")
    )


def _nan_optimizer_setting(case: Case, outcome: Outcome, problem: str) -> bool:
    if not case.method.endswith("/OpenSession") or problem != "status INTERNAL":
        return False
    try:
        request = backbone_pb2.OpenSessionRequest.FromString(case.messages[0])
    except Exception:
        return False
    settings = request.optimizer
    return any(math.isnan(v) for v in (settings.learning_rate, settings.weight_decay, settings.eps))


# LoRA targets of the tiny Llama body; other names may match a module peft cannot adapt.
ATTENTION_PROJECTIONS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})


def _odd_lora_targets(case: Case, outcome: Outcome, problem: str) -> bool:
    if not case.method.endswith("/OpenSession") or problem != "status INTERNAL":
        return False
    try:
        request = backbone_pb2.OpenSessionRequest.FromString(case.messages[0])
    except Exception:
        return False
    return not set(request.adapter.lora.target_modules) <= ATTENTION_PROJECTIONS


KNOWN: list[Known] = [
    Known(
        "backbone OpenSession takes any LoRA rank: r = 2**20 adds 1 GiB to the backbone, "
        "larger ranks fail with INTERNAL",
        "test_repro_backbone_caps_the_lora_rank",
        _huge_lora_rank,
    ),
    Known(
        "backbone OpenSession with a NaN learning_rate, weight_decay or eps: INTERNAL",
        "test_repro_backbone_refuses_nan_optimizer_settings",
        _nan_optimizer_setting,
    ),
    Known(
        "backbone OpenSession with LoRA target_modules that name a module peft cannot adapt "
        "(mlp, lm_head, embed_tokens): INTERNAL",
        "test_repro_backbone_refuses_odd_lora_targets",
        _odd_lora_targets,
    ),
]


def match(case: Case, outcome: Outcome, problem: str) -> str | None:
    for known in KNOWN:
        if known.matches(case, outcome, problem):
            return f"{known.name} ({known.repro})"
    return None
