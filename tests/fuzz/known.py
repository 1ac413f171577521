"""Bugs the fuzzer found in code this suite does not fix (services being rewritten).

Each entry matches the failures one bug causes, and names the strict-xfail test (in
tests/fuzz/test_live_services.py, beside the deployment it needs) that reproduces it in a
few lines. `make test` tolerates
matching failures (the repro keeps the bug visible: once fixed, the xfail passes and
fails the suite, and the entry goes); `make fuzz` counts them like any other failure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fuzz.harness import Case, Outcome


@dataclass(frozen=True)
class Known:
    name: str
    repro: str
    matches: Callable[[Case, Outcome, str], bool]


# Found, reproduced and fixed so far: undecodable requests (INTERNAL, transport), a LoRA
# rank without a cap, NaN optimizer settings and LoRA targets peft cannot adapt
# (backbone OpenSession); their tests are in test_transport.py and test_live_services.py.
KNOWN: list[Known] = []


def match(case: Case, outcome: Outcome, problem: str) -> str | None:
    for known in KNOWN:
        if known.matches(case, outcome, problem):
            return f"{known.name} ({known.repro})"
    return None
