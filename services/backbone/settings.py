"""Settings of a backbone (one flat, validated dataclass; loaded from YAML or TOML)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitfed.encodings import encoding_names
from splitfed.models.placement import parse_device
from splitfed.models.quantization import check_quantization

ADAPTER_MODES = ("per-client", "shared")
# A per-identity quota left unset is this fraction of its global limit (at least 1).
IDENTITY_SHARE = 4
# Server threads kept free of streams, for unary calls (OpenSession, GetModelInfo, ...)
# and health checks: gRPC's synchronous server holds a thread for a stream's whole life.
UNARY_WORKERS = 8


@dataclass(frozen=True)
class BackboneSettings:
    # Local checkpoint directory (safetensors) of the model whose body this serves.
    model_path: Path
    # The name clients ask for; defaults to the directory name.
    model_id: str = ""
    # Smallest head and tail sessions may use: the backbone loads blocks [min_k, L - min_m).
    min_k: int = 1
    min_m: int = 1
    # Weights dtype: "float32", "bfloat16" or "float16"; "auto" keeps the checkpoint's.
    dtype: str = "auto"
    # The body's projections: "none" (as dtype says), "int8" or "nf4" (bitsandbytes),
    # quantized while loading (models/quantization.py); compute stays in dtype.
    quantization: str = "none"
    # "cpu", "cuda", "cuda:N"; "auto": the blocks over every visible GPU by free memory
    # (less max_cache_bytes + max_pending_bytes, shared out); or blocks per device, in
    # order: "cuda:0=16,cuda:1=14" (models/placement.py).
    device: str = "cpu"
    adapter_mode: str = "per-client"
    # Where session state (adapters, optimizer state) is checkpointed; none: memory only.
    state_dir: Path | None = None
    max_sessions: int = 64
    # Training and generation streams open at once (each holds a server thread); with the
    # diagnostics streams and UNARY_WORKERS they must fit the server's worker threads
    # ([server] max_workers; derived when not set).
    max_streams: int = 32
    # A stream on which nothing moved for this long is cancelled.
    stream_idle_timeout_s: float = 300.0
    max_batch_size: int = 64
    max_sequence_length: int = 4096
    # Bytes all sessions' KV caches may hold together.
    max_cache_bytes: int = 4 << 30
    # Per-identity quotas (one certificate identity, all its sessions together), besides
    # the global limits; 0: a quarter of the global limit (docs/backbone.md, "Quotas").
    max_sessions_per_identity: int = 0
    max_streams_per_identity: int = 0
    max_cache_bytes_per_identity: int = 0
    # Training forward passes awaiting their gradient: each keeps its autograd graph
    # (activations of every block) until its BACKWARD, ZERO_GRAD, the stream's end or the
    # session's. Per session, per identity (0: twice the per-session cap), and their
    # graphs' estimated bytes, all sessions together and per identity (0: a quarter).
    max_pending_passes: int = 16
    max_pending_passes_per_identity: int = 0
    max_pending_bytes: int = 4 << 30
    max_pending_bytes_per_identity: int = 0
    # A session nobody touched for this long is closed and its state deleted.
    idle_timeout_s: float = 3600.0
    encodings: tuple[str, ...] = field(default_factory=lambda: tuple(encoding_names()))
    # Identities (role aggregator) that may export and import the body adapters of
    # sessions opened for a federation (server-side adapter averaging): "name" may act
    # for any federation, "name:federation" only for that one (repeat the name for more).
    # An aggregator still reaches only sessions whose owner opened them for the federation
    # it names, and only for the owner it names (docs/backbone.md).
    aggregators: tuple[str, ...] = ()
    # The largest LoRA rank a session may ask for: a session's adapter memory grows with
    # it (per layer 2 x r x hidden size values, and their optimizer state).
    max_lora_rank: int = 256
    # Client-batch: the training passes of concurrent sessions run as one batched pass;
    # shared mode: and one optimizer step; per-client mode: one multi-adapter pass, each
    # session its own adapter and step (docs/backbone.md, "Client-batch").
    client_batch: bool = False
    # How long a merged step waits for more sessions once it could start.
    batch_window_ms: float = 5.0
    max_merged_sessions: int = 8
    # Continuous batching: concurrent sessions' generation steps (decode steps, and
    # prompts in chunks) run as one pass, each session with its own KV cache
    # (docs/backbone.md, "Continuous batching"); false: one session's step at a time.
    merge_generation: bool = True
    # New positions one generation pass may hold (rows x its longest step), less where
    # the device's free memory would not hold them; longer prompts run in chunks.
    max_pass_tokens: int = 4096
    # Sessions one generation pass may hold.
    max_pass_sessions: int = 32
    # The adaptive window: before a pass, wait for the steps of sessions whose next step
    # is due (their clients' turnaround, learnt), at most what a pass costs by itself
    # and at most this long; no wait when none is due or other work is queued.
    max_window_ms: float = 50.0
    # A merged step that waits this long for a member's next frame is given up: every
    # member gets ABORTED and redoes the step.
    batch_timeout_s: float = 60.0
    # Shared mode: whether clients may read the shared adapter (ExportAdapter on their
    # session). It is trained on every client's data, so off unless the deployment says.
    export_shared_adapter: bool = False

    def __post_init__(self) -> None:
        # Paths may arrive as strings from a config file.
        object.__setattr__(self, "model_path", Path(self.model_path))
        if self.state_dir is not None:
            object.__setattr__(self, "state_dir", Path(self.state_dir))
        if not self.model_id:
            object.__setattr__(self, "model_id", self.model_path.name)
        if self.min_k < 1 or self.min_m < 1:
            raise ValueError(f"min_k and min_m must be >= 1, got {self.min_k}, {self.min_m}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(
                f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}"
            )
        parse_device(self.device)  # ValueError naming what is wrong
        check_quantization(self.quantization)
        if self.adapter_mode not in ADAPTER_MODES:
            raise ValueError(
                f"adapter_mode must be one of {', '.join(ADAPTER_MODES)}, got {self.adapter_mode!r}"
            )
        for name, value in (
            ("max_sessions", self.max_sessions),
            ("max_streams", self.max_streams),
            ("max_batch_size", self.max_batch_size),
            ("max_sequence_length", self.max_sequence_length),
            ("max_cache_bytes", self.max_cache_bytes),
            ("max_pending_passes", self.max_pending_passes),
            ("max_pending_bytes", self.max_pending_bytes),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        share = {
            "max_sessions_per_identity": self.max_sessions,
            "max_streams_per_identity": self.max_streams,
            "max_cache_bytes_per_identity": self.max_cache_bytes,
            "max_pending_bytes_per_identity": self.max_pending_bytes,
        }
        for name, whole in share.items():
            self._identity_quota(name, max(1, whole // IDENTITY_SHARE), whole)
        self._identity_quota("max_pending_passes_per_identity", 2 * self.max_pending_passes)
        if self.max_pending_passes_per_identity < self.max_pending_passes:
            raise ValueError(
                "max_pending_passes_per_identity must be >= max_pending_passes "
                f"({self.max_pending_passes}), got {self.max_pending_passes_per_identity}"
            )
        if self.stream_idle_timeout_s <= 0:
            raise ValueError(
                f"stream_idle_timeout_s must be positive, got {self.stream_idle_timeout_s}"
            )
        if self.idle_timeout_s <= 0:
            raise ValueError(f"idle_timeout_s must be positive, got {self.idle_timeout_s}")
        if self.batch_window_ms < 0:
            raise ValueError(f"batch_window_ms must be >= 0, got {self.batch_window_ms}")
        if self.max_pass_tokens < 1:
            raise ValueError(f"max_pass_tokens must be >= 1, got {self.max_pass_tokens}")
        if self.max_pass_sessions < 1:
            raise ValueError(f"max_pass_sessions must be >= 1, got {self.max_pass_sessions}")
        if self.max_window_ms < 0:
            raise ValueError(f"max_window_ms must be >= 0, got {self.max_window_ms}")
        if self.max_merged_sessions < 1:
            raise ValueError(f"max_merged_sessions must be >= 1, got {self.max_merged_sessions}")
        if self.batch_timeout_s <= 0:
            raise ValueError(f"batch_timeout_s must be positive, got {self.batch_timeout_s}")
        self.aggregator_federations()  # validates the entries
        if self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        unknown = set(self.encodings) - set(encoding_names())
        if unknown:
            raise ValueError(f"unknown encodings {sorted(unknown)}; known: {encoding_names()}")

    def aggregator_federations(self) -> dict[str, frozenset[str]]:
        """aggregator identity -> the federations it may act for (empty: any)."""
        out: dict[str, set[str]] = {}
        anywhere: set[str] = set()
        for entry in self.aggregators:
            name, _, federation = entry.partition(":")
            if not name or (":" in entry and not federation):
                raise ValueError(
                    f"aggregators: {entry!r} is not 'identity' or 'identity:federation'"
                )
            out.setdefault(name, set())
            if federation:
                out[name].add(federation)
            else:
                anywhere.add(name)
        return {name: frozenset() if name in anywhere else frozenset(f) for name, f in out.items()}

    def _identity_quota(self, name: str, default: int, whole: int | None = None) -> None:
        """Resolve a per-identity quota left at 0 to ``default``; check it is >= 1 and at
        most ``whole``, the global limit."""
        value = getattr(self, name)
        if value == 0:
            value = default
            object.__setattr__(self, name, value)
        if value < 1:
            raise ValueError(f"{name} must be >= 1 (0: the default), got {value}")
        if whole is not None and value > whole:
            global_name = name.removesuffix("_per_identity")
            raise ValueError(
                f"{name} ({value}) cannot exceed {global_name} ({whole}): one identity "
                "never gets more than everyone together"
            )


def server_workers(config: Any) -> int:
    """The server's worker threads for a backbone config (``configs.BackboneConfig``):
    ``[server] max_workers`` if set, else enough for every stream the backbone and its
    diagnostics may hold open plus UNARY_WORKERS. A set value that leaves fewer than
    UNARY_WORKERS threads besides those streams is refused (ValueError)."""
    streams: int = config.backbone.max_streams + config.diagnostics.max_streams
    needed = streams + UNARY_WORKERS
    configured: int | None = config.server_max_workers
    if configured is None:
        return max(int(config.server.max_workers), needed)
    if configured < needed:
        raise ValueError(
            f"[server] max_workers ({configured}) must be at least "
            f"{needed}: [backbone] max_streams ({config.backbone.max_streams}) + "
            f"[diagnostics] max_streams ({config.diagnostics.max_streams}) streams may be "
            f"open at once, each holding a worker thread, and {UNARY_WORKERS} stay free "
            "for unary calls and health checks; raise max_workers or lower max_streams"
        )
    return configured
