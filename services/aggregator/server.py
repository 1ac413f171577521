"""The aggregator process: its federations, the gRPC server and the deadline ticker."""

from __future__ import annotations

from dataclasses import dataclass, replace

from splitfed.protocol.aggregator import SERVICE_NAME
from splitfed.protocol.diagnostics import SERVICE_NAME as DIAGNOSTICS
from splitfed.runtime import tune_allocator
from splitfed.services.aggregator.backbones import BackboneAdapters
from splitfed.services.aggregator.federation import Federation, federations
from splitfed.services.aggregator.servicer import POLICY, Ticker, binding
from splitfed.services.aggregator.settings import AggregatorSettings, stream_slots
from splitfed.services.diagnostics import binding as diagnostics
from splitfed.services.diagnostics.servicer import POLICY as DIAGNOSTICS_POLICY
from splitfed.services.diagnostics.settings import DiagnosticsSettings
from splitfed.services.security import ServerSecurity, server_security
from splitfed.serving import SecuritySettings, ServedBy, ServerSettings
from splitfed.transport import Server, create_server
from splitfed.wire import KiB

# What a connection's read buffer may grow to with lean_memory (docs/benchmarks.md).
LEAN_READ_BUFFER_BYTES = 256 * KiB


@dataclass
class AggregatorServer(ServedBy):
    server: Server
    federations: dict[str, Federation]
    ticker: Ticker
    security: ServerSecurity
    links: list[BackboneAdapters]

    def start(self) -> AggregatorServer:
        self.security.start()
        self.server.start()
        self.ticker.start()
        return self

    def stop(self, grace_s: float | None = 5.0) -> None:
        self.ticker.stop()
        self.server.stop(grace_s)
        self.security.stop()
        for link in self.links:
            link.close()


def build_server(
    settings: AggregatorSettings,
    server: ServerSettings,
    security_settings: SecuritySettings | None = None,
    *,
    listen: str | None = None,
    diagnostics_settings: DiagnosticsSettings | None = None,
) -> AggregatorServer:
    if settings.lean_memory:
        tune_allocator("lean")  # before the first channel or server allocates
    tls = server.tls()
    security = server_security(
        {SERVICE_NAME: POLICY, DIAGNOSTICS: DIAGNOSTICS_POLICY},
        tls,
        security_settings or SecuritySettings(),
    )
    echo = diagnostics_settings or DiagnosticsSettings()  # a link check's limits
    feds = federations(settings.federations, settings.state_dir)
    options = server.options()
    links: list[BackboneAdapters] = []
    for federation in feds.values():
        if federation.settings.server_adapters:
            link = BackboneAdapters(
                tls, server_name=federation.settings.backbone_server_name, options=options
            )
            federation.server_adapters = link
            links.append(link)
    server_options = (
        replace(options, max_read_buffer_bytes=LEAN_READ_BUFFER_BYTES, bdp_probe=False)
        if settings.lean_memory
        else options
    )
    grpc_server = create_server(
        [
            binding(feds, options.chunk_bytes, stream_slots(options.max_workers, echo.max_streams)),
            diagnostics(chunk_bytes=options.chunk_bytes, settings=echo),
        ],
        tls,
        address=listen or server.listen,
        options=server_options,
        interceptors=[security.interceptor],
    )
    return AggregatorServer(grpc_server, feds, Ticker(feds), security, links)
