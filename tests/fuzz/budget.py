"""How many cases a run sends: a bounded, reproducible sample in `make test`; under
`make fuzz` (``SPLITFED_FUZZ_EXAMPLES`` set) that many cases in total, freshly random."""

from __future__ import annotations

import math
import os

from hypothesis import HealthCheck, Phase, settings

EXAMPLES_ENV = "SPLITFED_FUZZ_EXAMPLES"
# The bounded sample of `make test`: a few hundred cases over all services.
SAMPLE_EXAMPLES = 300


def full_run() -> bool:
    """True under `make fuzz`: every failure counts, known bugs included."""
    return bool(os.environ.get(EXAMPLES_ENV))


def total_examples() -> int:
    value = os.environ.get(EXAMPLES_ENV)
    if not value:
        return SAMPLE_EXAMPLES
    try:
        total = int(value)
    except ValueError:
        raise ValueError(f"{EXAMPLES_ENV} must be a number of cases, got {value!r}") from None
    if total < 1:
        raise ValueError(f"{EXAMPLES_ENV} must be >= 1, got {total}")
    return total


def fuzz_settings(weight: int, total_weight: int) -> settings:
    """Hypothesis settings for a test that gets ``weight / total_weight`` of the cases.

    No shrinking and no example database: a case never fails inside hypothesis (the
    ledger records it), and nothing is written to ``.hypothesis``.
    """
    return settings(
        max_examples=max(1, math.ceil(total_examples() * weight / total_weight)),
        deadline=None,
        database=None,
        derandomize=not full_run(),
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
