"""The key manager process: an mTLS server and an enrollment server over one authority."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from splitfed.security.authz import AuthorizationInterceptor, RevocationList
from splitfed.security.tls import TLSConfig
from splitfed.services.keymanager.authority import SERVER_DIR, KeyAuthority
from splitfed.services.keymanager.servicer import ENROLL_METHOD, POLICY, SERVICE_NAME, binding
from splitfed.services.keymanager.settings import KeyManagerSettings
from splitfed.serving import ServerSettings
from splitfed.transport import Server, TransportOptions, create_server


@dataclass
class KeyManagerServers:
    authority: KeyAuthority
    main: Server
    enroll: Server
    revocations: RevocationList

    def start(self) -> KeyManagerServers:
        self.main.start()
        self.enroll.start()
        return self

    def stop(self, grace_s: float | None = 5.0) -> None:
        self.enroll.stop(grace_s)
        self.main.stop(grace_s)
        self.authority.close()

    @property
    def port(self) -> int:
        return self.main.port

    @property
    def address(self) -> str:
        return self.main.address


def server_tls(settings: KeyManagerSettings, server: ServerSettings) -> TLSConfig:
    """The [server] TLS material, defaulting to the certificate `keys init` made."""
    if server.tls_dir or server.ca or server.cert or server.key or server.insecure:
        return server.tls()
    return TLSConfig.from_dir(Path(settings.state_dir) / SERVER_DIR)


def build_servers(
    settings: KeyManagerSettings,
    server: ServerSettings,
    *,
    listen: str | None = None,
    enroll_listen: str | None = None,
) -> KeyManagerServers:
    tls = server_tls(settings, server)
    if tls.insecure:
        raise ValueError("the key manager always uses TLS; drop insecure from [server]")
    authority = KeyAuthority(
        settings.state_dir,
        settings.kek(),
        certificate_validity=dt.timedelta(seconds=settings.certificate_validity_s),
        token_ttl=dt.timedelta(seconds=settings.token_ttl_s),
        max_token_ttl=dt.timedelta(seconds=settings.max_token_ttl_s),
    )
    try:
        revocations = RevocationList()

        def refresh() -> None:
            version, rows = authority.store.revocations()
            revocations.update(version, [r.serial for r in rows])

        refresh()
        service = binding(authority, on_revoke=refresh)
        options = TransportOptions(chunk_bytes=server.chunk_bytes, max_workers=server.max_workers)
        main = create_server(
            [service],
            tls,
            address=listen or server.listen,
            options=options,
            interceptors=[AuthorizationInterceptor({SERVICE_NAME: POLICY}, revocations)],
        )
        enroll = create_server(
            [service],
            tls,
            address=enroll_listen or settings.enroll_listen,
            options=options,
            interceptors=[
                AuthorizationInterceptor(
                    {}, revocations, public=frozenset({ENROLL_METHOD}), authenticated=False
                )
            ],
            client_auth=False,
        )
    except BaseException:
        authority.close()
        raise
    return KeyManagerServers(authority, main, enroll, revocations)
