"""The aggregator: federated rounds that average clients' adapter updates."""
