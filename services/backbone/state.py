"""The backbone's state, composed of its parts: the shared frozen body (bodies.py), the
session registry (sessions.py), the compute queue (compute.py), client-batch
(batching.py), training (training.py), generation (generation.py), continuous batching
of generation (decoding.py) and adapter transfers (adapters_io.py). Dependencies run one
way: bodies <- sessions <- batching <- training <- adapters_io, sessions <- generation <-
decoding, and this module over all. No gRPC in here; the
handlers call the methods :class:`BackboneState` exposes."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch

from splitfed.metrics import Live
from splitfed.models.placement import utilisation
from splitfed.services.backbone.adapters_io import AdapterIO
from splitfed.services.backbone.batching import ClientBatcher
from splitfed.services.backbone.bodies import SharedBody
from splitfed.services.backbone.compute import ComputeQueue
from splitfed.services.backbone.decoding import GenerationBatcher
from splitfed.services.backbone.generation import Generation
from splitfed.services.backbone.metrics import (
    BACKBONE_KV_CACHE_BYTES,
    BACKBONE_SESSIONS,
    DEVICE_UTILISATION,
)
from splitfed.services.backbone.sessions import Session, SessionRegistry
from splitfed.services.backbone.settings import BackboneSettings
from splitfed.services.backbone.store import DirectoryStore, MemoryStore, SessionStore
from splitfed.services.backbone.training import Training

# The backbones of this process, read when metrics are scraped.
LIVE: Live[BackboneState] = Live()


class BackboneState:
    """Everything a backbone serves, behind plain methods; handlers call these."""

    def __init__(self, settings: BackboneSettings, store: SessionStore | None = None) -> None:
        self.settings = settings
        self.shared = SharedBody(settings)
        if store is None:
            store = DirectoryStore(settings.state_dir) if settings.state_dir else MemoryStore()
        self.store = store
        self.queue = ComputeQueue()
        self.registry = SessionRegistry(settings, self.shared, store)
        # Client-batch: training passes of concurrent sessions run merged.
        self.batcher = (
            ClientBatcher(settings, self.queue, self.registry.checkpoint)
            if settings.client_batch
            else None
        )
        if self.batcher is not None:
            # A session that closes or expires leaves its round first.
            self.registry.on_drop.append(self.batcher.discard)
            self.registry.on_drop.append(self.batcher.forget)
        self.training = Training(settings, self.shared, self.registry, self.queue, self.batcher)
        self.generation = Generation(settings, self.shared, self.registry)
        # Continuous batching: concurrent sessions' generation steps run merged.
        self.decoder = (
            GenerationBatcher(settings, self.shared, self.queue, self.generation)
            if settings.merge_generation
            else None
        )
        if self.decoder is not None:
            self.registry.on_drop.append(self.decoder.discard)
        self.adapters = AdapterIO(settings, self.registry, self.training)
        # Called with each session that closes or expires (e.g. to end its keys).
        self.on_drop = self.registry.on_drop
        # What the handlers call, by part.
        self.open_session = self.registry.open_session
        self.get_session = self.registry.get_session
        self.get_federated_session = self.registry.get_federated_session
        self.close_session = self.registry.close_session
        self.sessions = self.registry.sessions
        self.checkpoint = self.registry.checkpoint
        self.expire_idle = self.registry.expire_idle
        self.usage = self.training.usage
        self.run_backward = self.training.run_backward
        self.run_step = self.training.run_step
        self.zero_grad = self.training.zero_grad
        self.reset_cache = self.generation.reset_cache
        self.trim_cache = self.generation.trim_cache
        self.export_adapter = self.adapters.export_adapter
        self.import_adapter = self.adapters.import_adapter
        self.shared_adapter = self.adapters.shared_adapter
        self.check_adapter_access = self.adapters.check_adapter_access
        LIVE.add(self)

    def close(self) -> None:
        LIVE.discard(self)
        self.registry.close()
        if self.decoder is not None:
            self.decoder.close()
        self.queue.close()

    def run_forward(
        self,
        session: Session,
        step: int,
        micro: int,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        *,
        train: bool,
    ) -> torch.Tensor:
        """A training forward (training.py), or an evaluation forward: merged with other
        sessions' prompts where continuous batching is on."""
        if not train and self.decoder is not None:
            return self.decoder.evaluate(session, hidden, mask)
        return self.training.run_forward(session, step, micro, hidden, mask, train=train)

    def generate(self, session: Session, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """h2 of a generation step of ``session`` after its KV cache: merged with other
        sessions' steps (continuous batching), or in the session's own turn."""
        if self.decoder is not None:
            return self.decoder.generate(session, hidden, mask)
        return self.queue.run_for(
            session, partial(self.generation.generate, session, hidden, mask), "generate"
        )

    @contextmanager
    def stream(self, session: Session, *, training: bool) -> Iterator[int]:
        """Mark a stream of ``session`` open (it does not expire meanwhile). A new
        training stream discards the unfinished step of an earlier one: the client
        redoes that step from its first micro-batch. Yields the stream's generation."""
        generation = self.registry.stream_opened(session, training=training)
        if training and self.batcher is not None:
            self.batcher.attach(session)
        try:
            if training:
                self.queue.run_for(session, lambda: self.zero_grad(session))
            yield generation
        finally:
            if training and self.batcher is not None:
                self.batcher.detach(session, generation)
            if training and session.in_step and generation == session.generation:
                # The stream ended mid-step: the step is discarded (the client redoes it
                # on its next stream), so it no longer holds the shared adapter.
                self.queue.run_for(session, lambda: self.zero_grad(session))
            self.registry.stream_closed(session)


BACKBONE_SESSIONS.set_function(lambda: LIVE.total(lambda b: len(b.sessions())))
BACKBONE_KV_CACHE_BYTES.set_function(
    lambda: LIVE.total(lambda b: sum(s.cache_bytes for s in b.sessions()))
)


def _utilisation() -> float:
    """The busiest GPU of this process's backbones (NaN where none reports one)."""
    found = [u for b in LIVE if (u := utilisation(b.shared.input_device)) is not None]
    return max(found) if found else math.nan


DEVICE_UTILISATION.set_function(_utilisation)
