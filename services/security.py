"""What every splitfed server runs for security: the authorization interceptor, and (with
a key manager configured in [security]) the revocation poller and certificate renewal."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from splitfed.clients.keys import CertificateRenewer, KeyManagerClient, RevocationPoller
from splitfed.security.authz import AuthorizationInterceptor, Policy, RevocationList
from splitfed.serving import SecuritySettings
from splitfed.tls import TLSConfig

logger = logging.getLogger(__name__)


@dataclass
class ServerSecurity:
    interceptor: AuthorizationInterceptor
    revocations: RevocationList
    keymanager: KeyManagerClient | None = None
    background: list[CertificateRenewer | RevocationPoller] = field(default_factory=list)

    def start(self) -> None:
        for task in self.background:
            task.start()

    def stop(self) -> None:
        for task in self.background:
            task.stop()
        if self.keymanager is not None:
            self.keymanager.close()


def server_security(
    policies: Mapping[str, Policy], tls: TLSConfig, settings: SecuritySettings
) -> ServerSecurity:
    """The interceptor for ``policies``; with ``settings.keymanager``, also a client of the
    key manager, a revocation poller and (if ``tls`` was read from a directory) renewal.

    Call it before the server serves: it installs the revocation list saved by the last
    run and polls the key manager once (no retries), so that a revoked certificate is
    refused from the first call even when the key manager is unreachable."""
    revocations = RevocationList()
    security = ServerSecurity(AuthorizationInterceptor(policies, revocations), revocations)
    if tls.insecure:
        logger.warning("[security] insecure mode: no identities, so authorization is off")
        security.interceptor = AuthorizationInterceptor(
            {}, revocations, public=frozenset({"*"}), authenticated=False
        )
        return security
    if not settings.keymanager:
        logger.info("[security] no key manager configured: no revocation list, no renewal")
        return security
    name = settings.keymanager_server_name
    security.keymanager = KeyManagerClient.connect(settings.keymanager, tls, server_name=name)
    cache = settings.revocation_cache_for(tls)
    if cache is None:
        logger.warning(
            "[security] no [server] tls_dir and no [security] revocation_cache: the revocation "
            "list is not kept across restarts"
        )
    poller = RevocationPoller(
        revocations,
        settings.keymanager,
        tls.reload,
        server_name=name,
        period_s=settings.revocation_poll_s,
        cache=cache,
    )
    # Before serving: the list saved by the last run, then the key manager's if it answers.
    poller.restore()
    poller.poll_now()
    security.background.append(poller)
    if settings.renew and tls.source_dir is not None:
        renewer = CertificateRenewer.reconnecting(security.keymanager, tls.source_dir, settings)
        security.background.append(renewer)
    return security
