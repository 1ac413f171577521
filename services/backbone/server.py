"""The backbone process: the shared body of a model, its diagnostics, and the security
around them, behind one gRPC server."""

from __future__ import annotations

from dataclasses import dataclass, replace

from splitfed.protocol.backbone import SERVICE
from splitfed.protocol.diagnostics import SERVICE_NAME as DIAGNOSTICS
from splitfed.services.backbone.crypto import BackboneKeys
from splitfed.services.backbone.servicer import POLICY, binding
from splitfed.services.backbone.settings import BackboneSettings
from splitfed.services.backbone.state import BackboneState
from splitfed.services.diagnostics import binding as diagnostics
from splitfed.services.diagnostics.servicer import POLICY as DIAGNOSTICS_POLICY
from splitfed.services.diagnostics.settings import DiagnosticsSettings
from splitfed.services.security import ServerSecurity, server_security
from splitfed.serving import SecuritySettings, ServedBy, ServerSettings
from splitfed.transport import Server, create_server


@dataclass
class BackboneServer(ServedBy):
    server: Server
    state: BackboneState
    security: ServerSecurity

    def start(self) -> BackboneServer:
        self.security.start()
        self.server.start()
        return self

    def stop(self, grace_s: float | None = 5.0) -> None:
        self.server.stop(grace_s)
        self.security.stop()
        self.state.close()


def build_server(
    settings: BackboneSettings,
    server: ServerSettings,
    security_settings: SecuritySettings,
    diagnostics_settings: DiagnosticsSettings,
    *,
    max_workers: int,
    listen: str | None = None,
) -> BackboneServer:
    """The backbone's server on ``listen`` (default: ``server.listen``) with
    ``max_workers`` threads (``settings.server_workers`` of its config)."""
    tls = server.tls()
    options = replace(server.options(), max_workers=max_workers)
    security = server_security(
        {SERVICE.full_name: POLICY, DIAGNOSTICS: DIAGNOSTICS_POLICY}, tls, security_settings
    )
    state = BackboneState(settings)
    try:
        keys = BackboneKeys(security.keymanager)
        services = [
            binding(state, options, keys),
            diagnostics(chunk_bytes=options.chunk_bytes, settings=diagnostics_settings),
        ]
        grpc_server = create_server(
            services,
            tls,
            address=listen or server.listen,
            options=options,
            interceptors=[security.interceptor],
        )
    except BaseException:
        state.close()
        security.stop()
        raise
    return BackboneServer(grpc_server, state, security)
