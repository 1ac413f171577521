"""Server-side adapters: the aggregator pulls the body adapters of a federation's sessions
from the backbones (``Backbone.ExportAdapter``), averages them weighted by the clients'
sample counts, and pushes the average back into every session (``ImportAdapter``).
With sessions on several backbone replicas this is server-hierarchical training: each
replica serves a group of clients with its own body adapters, averaged each round."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import grpc
import torch

from splitfed.clients.backbone import BackboneClient
from splitfed.models.adapters import average_adapters
from splitfed.security.tls import TLSConfig
from splitfed.transport import TransportOptions, create_channel

logger = logging.getLogger(__name__)


class BackboneAdapters:
    def __init__(
        self,
        tls: TLSConfig,
        *,
        server_name: str | None = None,
        options: TransportOptions | None = None,
    ) -> None:
        self.tls = tls
        self.server_name = server_name
        self.options = options or TransportOptions()
        self._channels: dict[str, tuple[grpc.Channel, BackboneClient]] = {}

    def _client(self, address: str) -> BackboneClient:
        if address not in self._channels:
            channel = create_channel(
                address, self.tls.reload(), server_name=self.server_name, options=self.options
            )
            self._channels[address] = (channel, BackboneClient(channel))
        return self._channels[address][1]

    def close(self) -> None:
        for channel, _ in self._channels.values():
            channel.close()
        self._channels.clear()

    def aggregate(
        self,
        contributors: Mapping[str, tuple[tuple[str, str], int]],
        sessions: list[tuple[str, ...]],
    ) -> dict[str, torch.Tensor]:
        states, weights = [], []
        for identity, ((address, session_id), samples) in sorted(contributors.items()):
            try:
                states.append(self._client(address).export_adapter(session_id))
                weights.append(float(samples))
            except Exception as exc:  # a backbone or session gone: leave it out
                logger.warning(
                    "[Aggregator] body adapter of %s (%s on %s) not available: %s",
                    identity,
                    session_id,
                    address,
                    exc,
                )
        if not states:
            return {}
        average = average_adapters(states, weights)
        for address, session_id in {(s[0], s[1]) for s in sessions}:
            try:
                self._client(address).import_adapter(session_id, average)
            except Exception as exc:
                logger.warning(
                    "[Aggregator] could not push the body adapter to %s on %s: %s",
                    session_id,
                    address,
                    exc,
                )
        logger.info(
            "[Aggregator] averaged %d body adapter(s), pushed to %d session(s)",
            len(states),
            len(sessions),
        )
        return average
