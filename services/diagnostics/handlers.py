"""Plain functions behind the Diagnostics servicer; no gRPC in here."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

from splitfed.security.identity import Identity
from splitfed.wire import ReceivedTensor

logger = logging.getLogger(__name__)


def handle_echo(tensors: Iterable[ReceivedTensor]) -> Iterator[ReceivedTensor]:
    """Send back each tensor once it has arrived whole and verified, in its own encoding."""
    count = 0
    for received in tensors:
        count += 1
        logger.debug(
            "[Diagnostics.EchoTensors] echo %r %s %s %s",
            received.name,
            tuple(received.tensor.shape),
            received.tensor.dtype,
            received.encoding,
        )
        yield received
    logger.info("[Diagnostics.EchoTensors] echoed %d tensors", count)


def handle_who_am_i(identity: Identity | None) -> tuple[str, str]:
    if identity is None:
        return "", ""
    return identity.name, identity.role
