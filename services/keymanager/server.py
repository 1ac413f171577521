"""The key manager process: an mTLS server and an enrollment server over one authority."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from splitfed.periodic import Periodic
from splitfed.protocol.keys import ENROLL_METHOD, SERVICE_NAME
from splitfed.security.authz import AuthorizationInterceptor, RevocationList
from splitfed.services.keymanager.authority import SERVER_DIR, KeyAuthority
from splitfed.services.keymanager.servicer import POLICY, binding
from splitfed.services.keymanager.settings import KeyManagerSettings
from splitfed.serving import ServedBy, ServerSettings
from splitfed.tls import TLSConfig
from splitfed.transport import Server, TransportOptions, create_server


class SelfRenewer(Periodic):
    """Keeps the key manager's own server certificate fresh (it is its own CA)."""

    def __init__(self, authority: KeyAuthority, tls_dir: Path, check_every_s: float) -> None:
        super().__init__("keymanager-self-renewer", check_every_s)
        self.authority = authority
        self.tls_dir = tls_dir

    def tick(self) -> None:
        self.authority.renew_own(self.tls_dir)


@dataclass
class KeyManagerServers(ServedBy):
    """The mTLS server (``main``: the port and address of the process) and the
    enrollment server, over one authority."""

    authority: KeyAuthority
    main: Server
    enroll: Server
    revocations: RevocationList
    renewer: SelfRenewer | None = None

    def __post_init__(self) -> None:
        self.server = self.main

    def start(self) -> KeyManagerServers:
        self.main.start()
        self.enroll.start()
        if self.renewer is not None:
            self.renewer.start()
        return self

    def stop(self, grace_s: float | None = 5.0) -> None:
        if self.renewer is not None:
            self.renewer.stop()
        self.enroll.stop(grace_s)
        self.main.stop(grace_s)
        self.authority.close()


def server_tls(settings: KeyManagerSettings, server: ServerSettings) -> TLSConfig:
    """The [server] TLS material, defaulting to the certificate `keys init` made (what
    ``serve keymanager`` and ``config validate`` both load)."""
    if server.insecure:
        raise ValueError("the key manager always uses TLS; drop insecure from [server]")
    if server.tls_dir or server.ca or server.cert or server.key:
        return server.tls()
    return TLSConfig.from_dir(Path(settings.state_dir) / SERVER_DIR)


def build_servers(
    settings: KeyManagerSettings,
    server: ServerSettings,
    *,
    listen: str | None = None,
    enroll_listen: str | None = None,
    allow_weak_kdf: bool = False,
) -> KeyManagerServers:
    """The key manager's two servers over its state directory (``allow_weak_kdf``: tests
    only, see :mod:`.kek`)."""
    tls = server_tls(settings, server)
    authority = KeyAuthority(
        settings.state_dir,
        settings.kek(),
        certificate_validity=dt.timedelta(seconds=settings.certificate_validity_s),
        token_ttl=dt.timedelta(seconds=settings.token_ttl_s),
        max_token_ttl=dt.timedelta(seconds=settings.max_token_ttl_s),
        max_certificate_lifetime=dt.timedelta(seconds=settings.max_certificate_lifetime_s),
        allow_weak_kdf=allow_weak_kdf,
    )
    try:
        if tls.source_dir is not None and authority.renew_own(tls.source_dir):
            tls = tls.reload()  # an expired certificate would not even start
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
    renewer = None
    if tls.source_dir is not None:
        renewer = SelfRenewer(authority, tls.source_dir, settings.renew_check_s)
    return KeyManagerServers(authority, main, enroll, revocations, renewer)
