"""The backbone's Prometheus metrics (docs/observability.md)."""

from __future__ import annotations

from prometheus_client import Gauge, Histogram

COMPUTE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

BACKBONE_SESSIONS = Gauge(
    "splitfed_backbone_sessions",
    "Sessions a backbone holds in memory.",
)
BACKBONE_KV_CACHE_BYTES = Gauge(
    "splitfed_backbone_kv_cache_bytes",
    "Bytes held by the KV caches of generation sessions.",
)
COMPUTE_QUEUE_DEPTH = Gauge(
    "splitfed_backbone_compute_queue_depth",
    "Jobs waiting for the backbone's compute worker.",
)
COMPUTE_WAIT_SECONDS = Histogram(
    "splitfed_backbone_compute_wait_seconds",
    "Time a job waited for its turn on the compute worker (0 when it ran at once).",
    buckets=COMPUTE_BUCKETS,
)
COMPUTE_SECONDS = Histogram(
    "splitfed_backbone_compute_seconds",
    "Time the device spent on one job, by operation (forward, backward, step, generate, other).",
    ["operation"],
    buckets=COMPUTE_BUCKETS,
)
