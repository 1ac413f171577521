"""Generation: a session's KV cache, its prefill and decode passes (run on the compute
queue) and the quotas on the bytes every cache holds."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitfed.errors import InvalidArgumentError, LimitExceededError
from splitfed.services.backbone.bodies import SharedBody
from splitfed.services.backbone.sessions import Session, SessionRegistry
from splitfed.services.backbone.settings import BackboneSettings


@dataclass(eq=False)
class Generation:
    """The KV caches of the registry's sessions."""

    settings: BackboneSettings
    shared: SharedBody
    registry: SessionRegistry

    def generate(self, session: Session, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """A step of ``session`` alone (on the compute queue, in its turn)."""
        hidden, mask = self.admit(session, hidden, mask)
        assert session.cache is not None
        with torch.no_grad():
            try:
                output: torch.Tensor = session.body(hidden, mask, session.cache)
            finally:
                self.settle(session)
        return output

    def admit(
        self, session: Session, hidden: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Check a step of ``session`` against its cache and the KV-cache quotas (on the
        compute queue), reserve the bytes its cache will hold after it (until
        :meth:`settle`) and give the session a cache; returns h1 and its mask on the
        body's device."""
        cache = session.cache if session.cache is not None else session.body.new_cache()
        self.shared.check_inputs(hidden, mask, cache.length)
        rows = cache.batch if cache.length else None
        if rows is not None and rows != hidden.shape[0]:
            raise InvalidArgumentError(
                f"the session's KV cache holds {rows} rows, this step has {hidden.shape[0]}: "
                "every step of a generation has the batch of its prefill; reset the cache "
                "(GENERATE_OP_RESET) to start another"
            )
        new_bytes = (
            hidden.shape[0]
            * (cache.length + hidden.shape[1])
            * self.shared.per_position_cache_bytes(session.body)
        )
        others = [s for s in self.registry.sessions() if s is not session]
        everyone = sum(s.cache_bytes for s in others) + new_bytes
        if everyone > self.settings.max_cache_bytes:
            raise LimitExceededError(
                f"KV caches would hold {everyone} bytes; the limit is "
                f"{self.settings.max_cache_bytes}: reset a cache or try later"
            )
        mine = sum(s.cache_bytes for s in others if s.owner == session.owner) + new_bytes
        if mine > self.settings.max_cache_bytes_per_identity:
            raise LimitExceededError(
                f"the KV caches of {session.owner} would hold {mine} bytes; the limit per "
                f"identity is {self.settings.max_cache_bytes_per_identity}: reset a cache "
                "(GENERATE_OP_RESET) or close a session"
            )
        session.cache = cache
        session.cache_bytes = max(session.cache_bytes, new_bytes)
        return self.shared.inputs(hidden, mask)

    def settle(self, session: Session) -> None:
        """Count the bytes the session's cache holds after a step (done or failed)."""
        session.cache_bytes = session.cache.nbytes() if session.cache is not None else 0

    def reset_cache(self, session: Session) -> None:
        session.cache = None
        session.cache_bytes = 0

    def trim_cache(self, session: Session, length: int) -> int:
        if session.cache is None:
            if length:
                raise InvalidArgumentError("the session has no cache to trim")
            return 0
        try:
            session.cache.trim(length)
        except ValueError as exc:
            raise InvalidArgumentError(str(exc)) from None
        session.cache_bytes = session.cache.nbytes()
        return session.cache.length
