"""Settings of an aggregator: where it keeps state, and its federations."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitfed.config import build
from splitfed.models.schema import Schema, load_schema, schema_from_mapping
from splitfed.security.ca import validate_identity
from splitfed.transport import parse_address

FEDERATION_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class FederationSettings:
    name: str
    # Rounds to run (0: until stopped).
    rounds: int = 3
    # A round aggregates only with at least this many updates.
    min_clients: int = 2
    # A round starts once this many clients joined (0: min_clients).
    start_clients: int = 0
    # Fraction of the joined clients selected each round (at least min_clients).
    sample_fraction: float = 1.0
    # Seconds a round (or one of its phases) may take before it closes or is retried.
    deadline_s: float = 600.0
    # Optimizer steps each selected client runs per round.
    local_steps: int = 10
    # Aggregation strategy from the registry: "fedavg", "fedexp", "fedavgm", "fedadam",
    # "median", "trimmed_mean", "dp_fedavg" (options: docs/federated.md).
    strategy: str = "fedavg"
    strategy_options: dict[str, float] = field(default_factory=dict)
    # The seed every party initialises the adapter from (version 0).
    adapter_seed: int = 0
    secure_aggregation: bool = False
    # Fixed-point scale of secure aggregation.
    secagg_scale: float = float(2**24)
    # Largest adapter (bytes of all delta tensors) an upload may declare.
    max_adapter_bytes: int = 1 << 30
    # Also average the body adapters the backbones hold for the members' sessions
    # (per-client adapter mode; several backbones: server-hierarchical training).
    server_adapters: bool = False
    backbones: tuple[str, ...] = ()
    # The name the backbones' certificates carry (default: the host of each address).
    backbone_server_name: str | None = None
    # Who may join (docs/federated.md "Membership"): these client identities, and/or
    # whoever presents the join token whose SHA-256 (hex) is join_token_sha256
    # (`splitfed federation token` makes one). At least one of the two is required.
    members: tuple[str, ...] = ()
    join_token_sha256: str = ""
    # The tensors (names and shapes) of the federation's adapter: every update must hold
    # exactly these. Inline ({name = [shape]} or {name = {shape = [...]}}) or a file
    # (schema JSON from `splitfed adapters schema`, or a .safetensors adapter); one of them.
    schema: dict[str, Any] = field(default_factory=dict)
    schema_file: Path | None = None
    # The most samples one update may claim (its weight in the average); a member may
    # also never claim more than it declared when it joined.
    max_samples: int = 1_000_000
    # Scale every plain update down to at most this L2 norm (all tensors together) before
    # it is averaged; 0: off. Not with secure aggregation (the aggregator cannot see it).
    clip_update_norm: float = 0.0

    def __post_init__(self) -> None:
        if not self.name or not set(self.name) <= FEDERATION_NAME_CHARS or len(self.name) > 63:
            raise ValueError(
                f"federation name {self.name!r}: use 1-63 characters of a-z, 0-9, '-', '_', '.'"
            )
        if self.rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {self.rounds}")
        if self.min_clients < 1:
            raise ValueError(f"min_clients must be >= 1, got {self.min_clients}")
        if self.start_clients == 0:
            object.__setattr__(self, "start_clients", self.min_clients)
        elif self.start_clients < self.min_clients:
            raise ValueError(
                f"start_clients ({self.start_clients}) must be >= min_clients ({self.min_clients})"
            )
        if not 0 < self.sample_fraction <= 1:
            raise ValueError(f"sample_fraction must be in (0, 1], got {self.sample_fraction}")
        if self.deadline_s <= 0:
            raise ValueError(f"deadline_s must be positive, got {self.deadline_s}")
        if self.local_steps < 1:
            raise ValueError(f"local_steps must be >= 1, got {self.local_steps}")
        if self.max_adapter_bytes < 1:
            raise ValueError(f"max_adapter_bytes must be >= 1, got {self.max_adapter_bytes}")
        if self.secure_aggregation and self.min_clients < 2:
            raise ValueError(
                "secure aggregation needs min_clients >= 2: a single survivor's update would "
                "be its own sum"
            )
        if self.server_adapters and not self.backbones:
            raise ValueError("server_adapters needs the backbones' addresses in backbones")
        for address in self.backbones:
            parse_address(address)
        if self.secagg_scale <= 1:
            raise ValueError(f"secagg_scale must be > 1, got {self.secagg_scale}")
        from splitfed.services.aggregator.strategies import (
            FedExP,
            is_robust,
            make_strategy,
            private_strategy,
        )

        strategy = make_strategy(self.strategy, self.strategy_options)  # validates both
        if self.secure_aggregation and isinstance(strategy, FedExP):
            raise ValueError(
                f"strategy {self.strategy!r} needs each update's norm, which secure "
                "aggregation hides; use fedavg, fedavgm or fedadam with secure_aggregation"
            )
        if self.secure_aggregation and is_robust(strategy):
            raise ValueError(
                f"strategy {self.strategy!r} looks at every update, which secure aggregation "
                "hides; use it in plain rounds, or fedavg/fedavgm/fedadam with secure_aggregation"
            )
        if private_strategy(strategy) is not None and self.server_adapters:
            raise ValueError(
                "dp_fedavg does not cover server-side adapters: the backbones' body adapters "
                "are averaged without clipping or noise; use it with server_adapters = false"
            )
        for member in self.members:
            try:
                validate_identity(member)
            except ValueError as exc:
                raise ValueError(f"members: {exc}") from None
        if len(set(self.members)) != len(self.members):
            raise ValueError("members lists an identity twice")
        if self.join_token_sha256 and not _SHA256_HEX.fullmatch(self.join_token_sha256):
            raise ValueError(
                "join_token_sha256 must be the SHA-256 of the join token as 64 lowercase hex "
                "digits (`splitfed federation token` prints a token and its digest)"
            )
        if not self.members and not self.join_token_sha256:
            raise ValueError(
                f"federation {self.name!r} says nobody may join: list the client identities in "
                "members, or set join_token_sha256 (`splitfed federation token`)"
            )
        if not 1 <= self.max_samples <= 1 << 40:
            raise ValueError(f"max_samples must be in [1, 2^40], got {self.max_samples}")
        if self.clip_update_norm < 0 or self.clip_update_norm != self.clip_update_norm:
            raise ValueError(f"clip_update_norm must be >= 0, got {self.clip_update_norm}")
        if self.secure_aggregation and self.clip_update_norm:
            raise ValueError(
                "clip_update_norm needs each update's norm, which secure aggregation hides; "
                "clients clip their own updates there"
            )
        if self.schema_file is not None:
            object.__setattr__(self, "schema_file", Path(self.schema_file))
        if bool(self.schema) == (self.schema_file is not None):
            raise ValueError(
                f"federation {self.name!r}: give its adapter's tensors in schema or schema_file "
                "(exactly one; `splitfed adapters schema --config client.toml` writes it)"
            )
        if self.schema:
            self.tensor_schema()  # checks it (a schema_file is read at start and by
            # `splitfed config validate`)

    def tensor_schema(self) -> Schema:
        """The federation's tensors: name -> shape."""
        if self.schema_file is not None:
            return load_schema(self.schema_file)
        return schema_from_mapping(self.schema, "schema")


@dataclass(frozen=True)
class AggregatorSettings:
    state_dir: Path
    federations: tuple[FederationSettings, ...] = ()
    # Keep memory flat however many clients upload: the "lean" allocator profile, capped
    # per-connection read buffers and no BDP probing (a few tens of percent of upload
    # throughput; docs/benchmarks.md "Aggregator memory"). False: the throughput defaults.
    lean_memory: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        federations = []
        items: tuple[object, ...] = self.federations
        for index, item in enumerate(items):
            if isinstance(item, FederationSettings):
                federations.append(item)
            elif isinstance(item, dict):
                federations.append(build(FederationSettings, item, f"federations[{index}]"))
            else:
                raise ValueError(f"federations[{index}] must be a mapping of fields")
        names = [f.name for f in federations]
        if len(set(names)) != len(names):
            raise ValueError(f"federation names must be unique, got {names}")
        if not federations:
            raise ValueError("configure at least one federation under [aggregator] federations")
        object.__setattr__(self, "federations", tuple(federations))

    def federation(self, name: str) -> FederationSettings | None:
        return next((f for f in self.federations if f.name == name), None)


# Server threads kept free of streaming calls (unary calls, health checks).
RESERVED_WORKERS = 4


def stream_slots(max_workers: int, diagnostics_streams: int) -> int:
    """How many streaming calls (uploads, downloads, watches) the aggregator may hold at
    once: each holds a server thread, so together with the diagnostics echo's streams they
    leave RESERVED_WORKERS threads free. ValueError if ``max_workers`` leaves none."""
    slots = max_workers - RESERVED_WORKERS - diagnostics_streams
    if slots < 1:
        raise ValueError(
            f"[server] max_workers ({max_workers}) must be at least "
            f"{RESERVED_WORKERS + diagnostics_streams + 1}: {RESERVED_WORKERS} threads stay "
            f"free for unary calls and health checks, {diagnostics_streams} serve the "
            "[diagnostics] echo, and the aggregator's streams need at least one"
        )
    return slots
