"""The training operations of a session's stream: forward passes that keep their graph
until the gradient comes, backward passes, optimizer steps and ZERO_GRAD, each in the
session's turn on the compute queue or, with client-batch, merged with other sessions'
(:class:`~splitfed.services.backbone.batching.ClientBatcher`); and the quotas on the
passes that await their gradient."""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import torch

from splitfed.errors import FailedPreconditionError, InvalidArgumentError, LimitExceededError
from splitfed.models.adapters import AdapterSettings
from splitfed.services.backbone.batching import ClientBatcher
from splitfed.services.backbone.bodies import SharedBody
from splitfed.services.backbone.compute import ComputeQueue
from splitfed.services.backbone.quotas import GraphCost, Usage
from splitfed.services.backbone.sessions import PendingPass, Session, SessionRegistry
from splitfed.services.backbone.settings import BackboneSettings


@dataclasses.dataclass(eq=False)
class Training:
    """Forward, backward and step of the registry's sessions; ``batcher`` (client-batch)
    or None."""

    settings: BackboneSettings
    shared: SharedBody
    registry: SessionRegistry
    queue: ComputeQueue
    batcher: ClientBatcher | None
    # Graph costs by (k, m, adapter without its seed): sessions alike cost alike.
    _graph_costs: dict[tuple[int, int, AdapterSettings], GraphCost] = dataclasses.field(
        default_factory=dict, init=False
    )

    # --- in a stream's thread --------------------------------------------------------

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
        """A forward pass in the session's turn on the compute queue; with client-batch,
        a training forward runs merged with other sessions' (``ClientBatcher``)."""
        if not train:
            return self.queue.run_for(
                session, partial(self._evaluate, hidden, mask, session), "forward"
            )
        if self.batcher is None:
            job = partial(self._forward, session, step, micro, hidden, mask)
            return self.queue.run_for(session, job, "forward")
        self.shared.check_inputs(hidden, mask, 0)
        if session.trainable.graph_cost is None:  # probe passes: on the compute queue
            self.queue.run_for(session, partial(self._graph_cost, session))
        nbytes = self._admit_pass(session, hidden.shape[0], hidden.shape[1])
        hidden, mask = self.shared.inputs(hidden, mask)
        return self.batcher.forward(session, step, micro, hidden, mask, graph_bytes=nbytes)

    def run_backward(
        self, session: Session, step: int, micro: int, grad: torch.Tensor
    ) -> torch.Tensor:
        if self.batcher is not None:
            return self.batcher.backward(session, step, micro, grad)
        return self.queue.run_for(
            session, partial(self._backward, session, step, micro, grad), "backward"
        )

    def run_step(
        self, session: Session, step: int, client_sq_norm: float, max_norm: float
    ) -> dict[str, Any]:
        if self.batcher is not None:
            replay = self._replay(session, step)
            if replay is not None:
                return replay
            return self.batcher.step(session, step, client_sq_norm, max_norm)
        return self.queue.run_for(
            session,
            partial(self._apply_step, session, step, client_sq_norm, max_norm),
            "step",
        )

    # --- quotas ----------------------------------------------------------------------

    def _graph_cost(self, session: Session) -> GraphCost:
        """The graph cost of the session's passes, fitted on first use (on the compute
        queue: it runs probe passes)."""
        trainable = session.trainable
        if trainable.graph_cost is None:
            key = (session.k, session.m, dataclasses.replace(trainable.adapter, seed=0))
            cost = self._graph_costs.get(key)
            if cost is None:
                cost = GraphCost.calibrate(trainable.body, self.shared.summary.hidden_size)
                self._graph_costs[key] = cost
            trainable.graph_cost = cost
        return trainable.graph_cost

    def pending_of(self, session: Session) -> tuple[int, int]:
        """(passes, estimated bytes) of ``session``'s forwards awaiting their gradient."""
        if self.batcher is not None:
            return self.batcher.pending_of(session)
        passes = list(session.pending.values())
        return len(passes), sum(p.nbytes for p in passes)

    def usage(self, owner: str | None = None) -> Usage:
        """What ``owner``'s sessions (None: all sessions) hold now."""
        sessions, stored = self.registry.held(owner)
        pending = [self.pending_of(s) for s in sessions]
        return Usage(
            sessions=len(sessions) + stored,
            pending_passes=sum(p for p, _ in pending),
            pending_bytes=sum(b for _, b in pending),
            cache_bytes=sum(s.cache_bytes for s in sessions),
        )

    def _admit_pass(self, session: Session, rows: int, tokens: int) -> int:
        """Check that one more training pass of ``rows`` x ``tokens`` fits every quota on
        passes awaiting their gradient; its estimated graph bytes."""
        s = self.settings
        assert session.trainable.graph_cost is not None
        nbytes = session.trainable.graph_cost.estimate(rows, tokens)
        passes, _ = self.pending_of(session)
        if passes >= s.max_pending_passes:
            raise LimitExceededError(
                f"{passes} forward passes of this session already await their gradient, the "
                "limit per session; send their BACKWARD (or ZERO_GRAD) before more FORWARDs"
            )
        largest = min(s.max_pending_bytes, s.max_pending_bytes_per_identity)
        if nbytes > largest:
            raise LimitExceededError(
                f"a training pass of {rows} x {tokens} tokens would hold about {nbytes} bytes "
                f"until its gradient; the backbone allows {largest}: send smaller micro-batches"
            )
        mine = self.usage(session.owner)
        if mine.pending_passes >= s.max_pending_passes_per_identity:
            raise LimitExceededError(
                f"{session.owner} has {mine.pending_passes} forward passes awaiting their "
                f"gradient, the limit per identity; send their BACKWARD first"
            )
        if mine.pending_bytes + nbytes > s.max_pending_bytes_per_identity:
            raise LimitExceededError(
                f"the passes of {session.owner} awaiting their gradient hold about "
                f"{mine.pending_bytes} bytes; {nbytes} more exceed the limit per identity "
                f"({s.max_pending_bytes_per_identity}): send their BACKWARD first"
            )
        total = self.usage().pending_bytes
        if total + nbytes > s.max_pending_bytes:
            raise LimitExceededError(
                f"passes awaiting their gradient in all sessions hold about {total} bytes; "
                f"{nbytes} more exceed the backbone's limit ({s.max_pending_bytes}); try later"
            )
        return nbytes

    # --- compute (run on the queue's worker) -------------------------------------------

    def _evaluate(self, hidden: torch.Tensor, mask: torch.Tensor, session: Session) -> torch.Tensor:
        """An evaluation forward: no graph kept, no step involved."""
        self.shared.check_inputs(hidden, mask, 0)
        hidden, mask = self.shared.inputs(hidden, mask)
        with torch.no_grad():
            result: torch.Tensor = session.body(hidden, mask)
            return result.detach()

    def _forward(
        self, session: Session, step: int, micro: int, hidden: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """A training forward whose graph waits for its gradient in ``session.pending``."""
        self.shared.check_inputs(hidden, mask, 0)
        hidden, mask = self.shared.inputs(hidden, mask)
        if (step, micro) in session.pending:
            raise FailedPreconditionError(
                f"step {step} micro-batch {micro} was already sent forward"
            )
        session.expect_next_step(step)
        self._graph_cost(session)
        nbytes = self._admit_pass(session, hidden.shape[0], hidden.shape[1])
        self.registry.claim_step(session)
        hidden.requires_grad_(True)
        with torch.enable_grad():
            output: torch.Tensor = session.body(hidden, mask)
        session.pending[(step, micro)] = PendingPass(hidden, output, nbytes)
        return output.detach()

    def _backward(
        self, session: Session, step: int, micro: int, grad: torch.Tensor
    ) -> torch.Tensor:
        pending = session.pending.pop((step, micro), None)
        if pending is None:
            raise FailedPreconditionError(
                f"no forward pass of step {step} micro-batch {micro} is waiting for its gradient"
            )
        hidden, output, _ = pending
        if grad.shape != output.shape:
            raise InvalidArgumentError(
                f"grad_h2 must have the shape of h2 {list(output.shape)}, got {list(grad.shape)}"
            )
        torch.autograd.backward(output, grad.to(device=output.device, dtype=output.dtype))
        assert hidden.grad is not None
        return hidden.grad.detach()

    def _replay(self, session: Session, step: int) -> dict[str, Any] | None:
        """The stored reply to a STEP the session already applied; None for a new step."""
        if step > session.step:
            return None
        if session.last_result is not None and step == session.step:
            return {**session.last_result, "already_applied": True}
        raise FailedPreconditionError(f"step {step} was applied long ago (now at {session.step})")

    def _apply_step(
        self, session: Session, step: int, client_sq_norm: float, max_norm: float
    ) -> dict[str, Any]:
        replay = self._replay(session, step)
        if replay is not None:
            return replay
        if step != session.step + 1:
            raise session.cannot_apply(step)
        if session.pending:
            raise FailedPreconditionError(
                f"{len(session.pending)} forward passes of step {step} still await their gradients"
            )
        result = session.applied(step, *session.trainable.step(client_sq_norm, max_norm))
        self.registry.checkpoint(session)
        return result

    def zero_grad(self, session: Session) -> None:
        session.pending.clear()
        session.in_step = False
        if self.batcher is not None:
            # Only this session's part: the shared gradient belongs to a merged step.
            self.batcher.discard(session)
            return
        session.trainable.optimizer.zero_grad(set_to_none=True)
