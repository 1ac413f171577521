"""Moving a session's adapter in and out (ExportAdapter / ImportAdapter), the one adapter
of shared mode as an admin addresses it, and who may move which."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from splitfed.errors import FailedPreconditionError, InvalidArgumentError, PermissionDeniedError
from splitfed.models.adapters import load_adapter_state
from splitfed.models.optim import OptimizerSettings
from splitfed.services.backbone.sessions import Session, SessionRegistry
from splitfed.services.backbone.settings import BackboneSettings
from splitfed.services.backbone.training import Training

# How an admin names the one adapter of shared mode in ExportAdapter / ImportAdapter.
SHARED_ADAPTER = "shared"


@dataclass(eq=False)
class AdapterIO:
    """Adapter import and export of the registry's sessions (``training``: whether a
    step is under way on an adapter)."""

    settings: BackboneSettings
    registry: SessionRegistry
    training: Training

    def export_adapter(self, session: Session) -> dict[str, torch.Tensor]:
        return {
            name: t.detach().to("cpu") for name, t in session.trainable.adapter_tensors().items()
        }

    def import_adapter(self, session: Session, tensors: Mapping[str, torch.Tensor]) -> int:
        """Replace the session's adapter tensors named in ``tensors``: all finite, none
        unknown. The shared adapter (:meth:`shared_adapter`) changes for every session,
        so not while one is in the middle of a step on it (its graph would break)."""
        own = session.trainable.adapter_tensors()
        unknown = sorted(set(tensors) - set(own))
        if unknown:
            raise InvalidArgumentError(f"the session's adapter has no tensor {unknown[0]!r}")
        for name in sorted(tensors):
            tensor = tensors[name]
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise InvalidArgumentError(
                    f"adapter tensor {name!r} is not finite (NaN or infinity); nothing was imported"
                )
        shared = session.session_id == SHARED_ADAPTER
        sharing = [s for s in self.registry.sessions() if s.trainable is session.trainable]
        batcher = self.training.batcher
        if shared and (
            any(s.in_step or self.training.pending_of(s)[0] for s in sharing)
            or (batcher is not None and batcher.queued_sessions)
        ):
            raise FailedPreconditionError(
                "the shared adapter is in the middle of a step (forward passes await their "
                "gradient or the step is not applied yet); import between steps"
            )
        try:
            load_adapter_state(session.body, tensors)
        except ValueError as exc:
            raise InvalidArgumentError(str(exc)) from None
        for each in sharing if shared else [session]:
            self.registry.checkpoint(each)
        return len(own)

    def shared_adapter(self) -> Session:
        """The one adapter of shared mode, as a session an admin addresses by the id
        :data:`SHARED_ADAPTER` (ExportAdapter/ImportAdapter); its ``step`` counts the
        optimizer steps the adapter applied. Nothing of it is stored apart: an import
        checkpoints the sessions that train it."""
        if self.settings.adapter_mode != "shared":
            raise FailedPreconditionError(
                "this backbone trains one adapter per session (adapter_mode per-client); "
                f"there is no shared adapter to address as {SHARED_ADAPTER!r}"
            )
        trainable = self.registry.shared_trainable
        if trainable is None:
            raise FailedPreconditionError(
                "no session has opened the shared adapter yet: its configuration comes "
                "from the first session"
            )
        return Session(
            session_id=SHARED_ADAPTER,
            owner="",
            k=self.settings.min_k,
            m=self.settings.min_m,
            adapter=trainable.adapter,
            optimizer_settings=OptimizerSettings(),
            encoding="raw",
            trainable=trainable,
            step=int(trainable.scheduler.last_epoch),
        )

    def check_adapter_access(self, session: Session, role: str, *, importing: bool) -> None:
        """Who may move a session's adapter: in shared mode the adapter is everyone's, so a
        client may neither replace it nor (unless ``export_shared_adapter``) read it;
        admins and aggregators may."""
        if self.settings.adapter_mode != "shared" or role in ("admin", "aggregator"):
            return
        if importing:
            raise PermissionDeniedError(
                "in adapter_mode shared every session trains one adapter: only an admin or an "
                "aggregator may replace it, not a client's ImportAdapter"
            )
        if not self.settings.export_shared_adapter:
            raise PermissionDeniedError(
                "in adapter_mode shared the adapter is trained on every client's data; "
                "clients may read it only where the operator sets [backbone] "
                "export_shared_adapter = true"
            )
