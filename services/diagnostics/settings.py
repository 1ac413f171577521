"""Settings of the Diagnostics service that every splitfed server also serves.

On a production service the echo is a link check, not a bulk transfer: its defaults let
one 64 MiB tensor through (what ``splitfed demo``'s link check sends), hold at most
128 MiB of receive buffers across all echo streams, and keep two streams open at once,
one per identity, so that a party cannot use the echo to take a service's memory or its
worker threads. A dedicated diagnostics server (``splitfed serve diagnostics``, the
transport benchmark) uses :data:`DEDICATED`.
"""

from __future__ import annotations

from dataclasses import dataclass

from splitfed.streams import StreamGuard
from splitfed.wire import DEFAULT_MAX_TENSOR_BYTES, MiB, ReceiveBudget, TensorLimits


@dataclass(frozen=True)
class DiagnosticsSettings:
    """The ``[diagnostics]`` section of a service's config."""

    # Largest tensor one echo accepts (checked from its header, before allocating).
    max_tensor_bytes: int = 64 * MiB
    # Receive buffers of all echo streams together.
    max_buffered_bytes: int = 128 * MiB
    max_streams: int = 2
    max_streams_per_identity: int = 1
    # An echo stream on which nothing moved for this long is cancelled.
    stream_idle_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("max_tensor_bytes", "max_streams", "max_streams_per_identity"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_buffered_bytes < self.max_tensor_bytes:
            raise ValueError(
                f"max_buffered_bytes ({self.max_buffered_bytes}) must hold at least one "
                f"largest tensor (max_tensor_bytes {self.max_tensor_bytes})"
            )
        if self.max_streams_per_identity > self.max_streams:
            raise ValueError(
                f"max_streams_per_identity ({self.max_streams_per_identity}) cannot exceed "
                f"max_streams ({self.max_streams})"
            )
        if self.stream_idle_timeout_s <= 0:
            raise ValueError(
                f"stream_idle_timeout_s must be positive, got {self.stream_idle_timeout_s}"
            )

    def limits(self) -> TensorLimits:
        return TensorLimits(max_tensor_bytes=self.max_tensor_bytes)

    def budget(self) -> ReceiveBudget:
        return ReceiveBudget(self.max_buffered_bytes)

    def guard(self) -> StreamGuard:
        return StreamGuard(
            "Diagnostics.EchoTensors",
            max_streams=self.max_streams,
            idle_timeout_s=self.stream_idle_timeout_s,
            max_streams_per_identity=self.max_streams_per_identity,
        )


# What production services serve (their [diagnostics] section's defaults).
LINK_CHECK = DiagnosticsSettings()
# A server that exists for the echo (``splitfed serve diagnostics``, benchmarks): the
# codec's own tensor limit, room for two such tensors, eight streams, any of one identity.
DEDICATED = DiagnosticsSettings(
    max_tensor_bytes=DEFAULT_MAX_TENSOR_BYTES,
    max_buffered_bytes=2 * DEFAULT_MAX_TENSOR_BYTES,
    max_streams=8,
    max_streams_per_identity=8,
    stream_idle_timeout_s=120.0,
)
