"""Prometheus metrics shared by the transport layer (names follow Prometheus conventions)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

WIRE_BYTES = Counter(
    "splitfed_wire_payload_bytes",
    "Tensor payload bytes moved through the codec, by direction.",
    ["direction"],
)
WIRE_CHUNKS = Counter(
    "splitfed_wire_chunks",
    "Tensor chunks moved through the codec, by direction.",
    ["direction"],
)
WIRE_BUFFER_BYTES = Gauge(
    "splitfed_wire_receive_buffer_bytes",
    "Bytes held by receive buffers of tensors still arriving.",
)
