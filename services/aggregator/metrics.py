"""The aggregator's Prometheus metrics (docs/observability.md)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

AGGREGATOR_ROUNDS = Counter(
    "splitfed_aggregator_rounds",
    "Rounds that ended, by federation and outcome (closed: a new global version; "
    "retried: too few keys, updates or reveals before the deadline).",
    ["federation", "outcome"],
)
AGGREGATOR_UPDATES = Counter(
    "splitfed_aggregator_updates",
    "Client updates folded into a round's sum, by federation.",
    ["federation"],
)
AGGREGATOR_PARTICIPANTS = Gauge(
    "splitfed_aggregator_round_participants",
    "Clients whose updates made the last closed round's version, by federation.",
    ["federation"],
)
AGGREGATOR_ROUND = Gauge(
    "splitfed_aggregator_round",
    "The round a federation is in.",
    ["federation"],
)
AGGREGATOR_VERSION = Gauge(
    "splitfed_aggregator_global_version",
    "The federation's current global adapter version.",
    ["federation"],
)
AGGREGATOR_JOINED = Gauge(
    "splitfed_aggregator_joined_clients",
    "Clients that joined the federation.",
    ["federation"],
)
AGGREGATION_SECONDS = Histogram(
    "splitfed_aggregator_aggregation_seconds",
    "Time to close a round: unmask, average, apply the strategy, write the version.",
    ["federation"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
FEDERATION_EPSILON = Gauge(
    "splitfed_federation_epsilon",
    "Epsilon of the client-level (epsilon, delta) differential privacy a dp_fedavg "
    "federation's closed rounds have spent (+Inf after a round without noise); no sample "
    "for federations without dp_fedavg (not private).",
    ["federation"],
)
