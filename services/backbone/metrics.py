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

# Continuous batching of generation (services/backbone/decoding.py).
GENERATE_PASS_SESSIONS = Histogram(
    "splitfed_backbone_generate_pass_sessions",
    "Sessions whose generation steps ran in one pass.",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
GENERATE_PASS_TOKENS = Histogram(
    "splitfed_backbone_generate_pass_tokens",
    "New positions one generation pass computed (rows x its longest step, padding included).",
    buckets=(1, 4, 16, 64, 256, 1024, 4096, 16384),
)
GENERATE_PASS_SECONDS = Histogram(
    "splitfed_backbone_generate_pass_seconds",
    "Time of one generation pass (no window), by sessions in it (1, 2-4, 5-8, 9-16, 17+).",
    ["sessions"],
    buckets=COMPUTE_BUCKETS,
)
GENERATE_WAIT_SECONDS = Histogram(
    "splitfed_backbone_generate_wait_seconds",
    "Time a generation step waited from its arrival to its first pass.",
    buckets=COMPUTE_BUCKETS,
)
GENERATE_WINDOW_SECONDS = Histogram(
    "splitfed_backbone_generate_window_seconds",
    "Time a generation pass waited for steps due soon before it ran (the adaptive window).",
    buckets=COMPUTE_BUCKETS,
)
GENERATE_TOKEN_BUDGET = Gauge(
    "splitfed_backbone_generate_token_budget",
    "New positions the next generation pass may hold (max_pass_tokens, less where free "
    "device memory would not hold them).",
)
DEVICE_UTILISATION = Gauge(
    "splitfed_backbone_device_utilisation",
    "Percent of the last sample period the body's (first) GPU was busy (NVML; absent on a CPU).",
)
