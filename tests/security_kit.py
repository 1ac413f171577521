"""A key manager in this process, on 127.0.0.1, over a fresh state directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from splitfed.clients.keys import KeyManagerClient, enroll
from splitfed.security.ca import CertificateAuthority
from splitfed.services.keymanager.authority import CA_CERT, init_authority
from splitfed.services.keymanager.kek import ScryptParams
from splitfed.services.keymanager.server import KeyManagerServers, build_servers
from splitfed.services.keymanager.settings import KeyManagerSettings
from splitfed.serving import ServerSettings
from splitfed.tls import TLSConfig

KEK = "test-key-encryption-key-0123456789"
SERVER_NAME = "localhost"
# Below the production floor, so that tests open state directories in milliseconds; only
# reachable through the test-only allow_weak_kdf (services/keymanager/kek.py).
TEST_KDF = ScryptParams(n=1 << 10)


@dataclass
class KeyManagerKit:
    root: Path
    settings: KeyManagerSettings
    servers: KeyManagerServers | None = None

    @property
    def state_dir(self) -> Path:
        return self.settings.state_dir

    @property
    def ca_pem(self) -> bytes:
        return (self.state_dir / CA_CERT).read_bytes()

    def start(self, listen: str = "127.0.0.1:0", enroll_listen: str = "127.0.0.1:0") -> None:
        self.servers = build_servers(
            self.settings,
            ServerSettings(),
            listen=listen,
            enroll_listen=enroll_listen,
            allow_weak_kdf=True,
        ).start()

    def stop(self) -> None:
        if self.servers is not None:
            self.servers.stop(grace_s=0.5)
            self.servers = None

    def restart(self) -> None:
        assert self.servers is not None
        main, enrollment = self.servers.main.address, self.servers.enroll.address
        self.stop()
        self.start(main, enrollment)

    @property
    def address(self) -> str:
        assert self.servers is not None
        return self.servers.main.address

    @property
    def enroll_address(self) -> str:
        assert self.servers is not None
        return self.servers.enroll.address

    def admin(self) -> KeyManagerClient:
        return self.client(self.root / "admin")

    def client(self, tls_dir: Path) -> KeyManagerClient:
        return KeyManagerClient.connect(
            self.address, TLSConfig.from_dir(tls_dir), server_name=SERVER_NAME
        )

    def enroll(self, identity: str, role: str = "client", **token_args: object) -> Path:
        """A party enrolled through a token: its directory with key, cert and CA."""
        admin = self.admin()
        try:
            token, _ = admin.create_token(identity, role, **token_args)  # type: ignore[arg-type]
        finally:
            admin.close()
        out = self.root / "parties" / identity
        enroll(self.enroll_address, self.ca_pem, token, identity, out, server_name=SERVER_NAME)
        return out


def keymanager_kit(
    root: Path, monkeypatch: pytest.MonkeyPatch, ca: CertificateAuthority | None = None
) -> KeyManagerKit:
    monkeypatch.setenv("SPLITFED_KEK", KEK)
    init_authority(
        root / "km",
        KEK.encode(),
        ca=ca,
        admin_dir=root / "admin",
        kdf=TEST_KDF,
        allow_weak_kdf=True,
    )
    return KeyManagerKit(root, KeyManagerSettings(state_dir=root / "km"))
