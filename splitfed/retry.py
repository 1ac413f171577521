"""The one retry policy: capped exponential backoff with jitter.

Retries only UNAVAILABLE and DEADLINE_EXCEEDED, and never a failure of authentication.
gRPC reports a failed TLS handshake as UNAVAILABLE; where the client itself rejects the
server (unknown CA, expired certificate, wrong server name) the details say so and the
call is not retried. Where the *server* rejects the client's certificate under TLS 1.3,
the client only sees its socket closed, which looks like a network fault; the channel
factory therefore checks the client's own certificate (validity, issuer) before it
connects, so an expired or foreign certificate fails at once with a clear error.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import grpc

from splitfed.errors import rpc_status

logger = logging.getLogger(__name__)

T = TypeVar("T")

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# What gRPC and BoringSSL write in the details when the client rejects the server.
_TLS_FAILURE_MARKERS = (
    "handshake failed",
    "ssl_error",
    "certificate_verify_failed",
    "verification check failed",
    "peer name",
)


def is_tls_failure(err: grpc.RpcError) -> bool:
    lowered = rpc_status(err)[1].lower()
    return any(marker in lowered for marker in _TLS_FAILURE_MARKERS)


def is_retryable(err: BaseException) -> bool:
    if not isinstance(err, grpc.RpcError):
        return False
    return rpc_status(err)[0] in RETRYABLE and not is_tls_failure(err)


@dataclass(frozen=True)
class RetryPolicy:
    """Attempt ``max_attempts`` times in all; delay n is ``min(max, initial * multiplier**n)``,
    scaled by a random factor in ``[1 - jitter, 1]``."""

    max_attempts: int = 5
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff_s < 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("need 0 <= initial_backoff_s <= max_backoff_s")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be between 0 and 1, got {self.jitter}")

    def delays(self, rng: Callable[[], float] = random.random) -> Iterator[float]:
        """The ``max_attempts - 1`` waits between attempts."""
        backoff = self.initial_backoff_s
        for _ in range(self.max_attempts - 1):
            yield min(self.max_backoff_s, backoff) * (1 - self.jitter * rng())
            backoff *= self.multiplier


DEFAULT_RETRY = RetryPolicy()


def call_with_retry(
    call: Callable[[], T],
    policy: RetryPolicy = DEFAULT_RETRY,
    *,
    what: str = "call",
    sleep: Callable[[float], None] = time.sleep,
    rng: Callable[[], float] = random.random,
) -> T:
    """Run ``call`` (one whole RPC, streams rebuilt inside it) under ``policy``."""
    delays = policy.delays(rng)
    attempt = 1
    while True:
        try:
            return call()
        except grpc.RpcError as err:
            if not is_retryable(err):
                raise
            delay = next(delays, None)
            if delay is None:
                raise
            code = rpc_status(err)[0]
            logger.warning(
                "[retry] %s failed (attempt %d/%d, %s); retrying in %.2fs",
                what,
                attempt,
                policy.max_attempts,
                code,
                delay,
            )
            sleep(delay)
            attempt += 1
