"""Server-side adapters: the aggregator pulls the body adapters of a round's contributors'
sessions from the backbones (``Backbone.ExportAdapter``), averages them weighted by the
clients' sample counts, and pushes the average back into those sessions
(``ImportAdapter``). With sessions on several backbone replicas this is
server-hierarchical training: each replica serves a group of clients with its own body
adapters, averaged each round.

A session id names a capability, so nothing is taken on trust: the aggregator accepts an
upload's session only after its backbone confirmed that the session is the uploader's,
opened for this federation (``CheckSession``), and every export and import names the
federation and the expected owner, which the backbone checks again. Session ids are
logged redacted."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import grpc
import torch

from splitfed.clients.backbone import BackboneClient
from splitfed.errors import PermissionDeniedError, SplitfedError
from splitfed.logs import redact
from splitfed.models.adapters import average_adapters
from splitfed.tls import TLSConfig
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

    def verify(self, session: tuple[str, str], owner: str, federation: str) -> None:
        address, session_id = session
        try:
            self._client(address).check_session(session_id, federation, owner)
        except PermissionDeniedError:
            logger.warning(
                "[Aggregator] %s named session %s on %s, which is not its own session of %s",
                owner,
                redact(session_id),
                address,
                federation,
            )
            raise PermissionDeniedError(
                f"the backbone {address} does not confirm that the named session is yours "
                f"and opened for federation {federation!r}; name your own session"
            ) from None
        except (SplitfedError, grpc.RpcError) as exc:
            logger.warning("[Aggregator] could not check a session on %s: %s", address, exc)
            raise PermissionDeniedError(
                f"the backbone {address} could not confirm the named session; retry later"
            ) from None

    def aggregate(
        self, contributors: Mapping[str, tuple[tuple[str, str], int]], federation: str
    ) -> dict[str, torch.Tensor]:
        states, weights, pulled = [], [], []
        for identity, ((address, session_id), samples) in sorted(contributors.items()):
            try:
                client = self._client(address)
                states.append(
                    client.export_adapter(session_id, federation=federation, owner=identity)
                )
                weights.append(float(samples))
                pulled.append((identity, address, session_id))
            except Exception as exc:  # a backbone or session gone: leave it out
                logger.warning(
                    "[Aggregator] body adapter of %s (%s on %s) not available: %s",
                    identity,
                    redact(session_id),
                    address,
                    exc,
                )
        if not states:
            return {}
        average = average_adapters(states, weights)
        for identity, address, session_id in pulled:
            try:
                self._client(address).import_adapter(
                    session_id, average, federation=federation, owner=identity
                )
            except Exception as exc:
                logger.warning(
                    "[Aggregator] could not push the body adapter to %s (%s on %s): %s",
                    identity,
                    redact(session_id),
                    address,
                    exc,
                )
        logger.info(
            "[Aggregator] averaged %d body adapter(s) of %s, pushed back to their sessions",
            len(states),
            federation,
        )
        return average
