"""The key manager service: enrollment, renewal, revocation, session keys, restarts, CLI."""

from __future__ import annotations

import datetime as dt
import json
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from helpers import wait_until
from prometheus_client import REGISTRY
from security_kit import KEK, SERVER_NAME, KeyManagerKit, keymanager_kit

from splitfed.cli import cli
from splitfed.clients.diagnostics import DiagnosticsClient
from splitfed.clients.keys import CertificateRenewer, RevocationPoller, enroll
from splitfed.errors import (
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from splitfed.protocol.diagnostics import SERVICE_NAME as DIAGNOSTICS
from splitfed.security.authz import AuthorizationInterceptor
from splitfed.security.ca import CertificateAuthority, generate_private_key, make_csr
from splitfed.services.diagnostics import binding as diagnostics_binding
from splitfed.services.diagnostics.servicer import POLICY as DIAGNOSTICS_POLICY
from splitfed.services.keymanager.authority import KeyAuthority, certificate_row
from splitfed.services.keymanager.kek import MIN_SCRYPT_N
from splitfed.services.security import ServerSecurity, server_security
from splitfed.serving import SecuritySettings
from splitfed.tls import CLOCK_SKEW, TLSConfig
from splitfed.transport import Server, create_channel, create_server


@pytest.fixture
def km(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[KeyManagerKit]:
    kit = keymanager_kit(tmp_path, monkeypatch)
    kit.start()
    yield kit
    kit.stop()


def test_state_directory_is_private_and_the_ca_key_encrypted(km: KeyManagerKit) -> None:
    assert stat.S_IMODE(km.state_dir.stat().st_mode) == 0o700
    key = km.state_dir / "ca-key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert b"ENCRYPTED PRIVATE KEY" in key.read_bytes()
    audit = km.servers.authority.store.audit_log()  # type: ignore[union-attr]
    assert [e.action for e in audit] == ["certificate.issue", "certificate.issue"]


def test_enrollment_end_to_end(km: KeyManagerKit) -> None:
    admin = km.admin()
    token, _ = admin.create_token("alice", "client")
    out = km.root / "alice"
    cert = enroll(km.enroll_address, km.ca_pem, token, "alice", out, server_name=SERVER_NAME)
    assert cert.subject.rfc4514_string() == "CN=alice,OU=client,O=splitfed"
    assert stat.S_IMODE((out / "key.pem").stat().st_mode) == 0o600
    # The new certificate works for mTLS calls.
    TLSConfig.from_dir(out).verify_own_certificate()
    # Used twice -> refused.
    with pytest.raises(UnauthenticatedError, match="already used"):
        enroll(km.enroll_address, km.ca_pem, token, "alice", km.root / "x", server_name=SERVER_NAME)
    # Expired -> refused.
    expired, _ = admin.create_token("bob", "client", ttl_s=1)
    km.servers.authority.store._db.execute(  # type: ignore[union-attr]
        "UPDATE tokens SET expires_at = 0"
    )
    with pytest.raises(UnauthenticatedError, match="expired"):
        enroll(km.enroll_address, km.ca_pem, expired, "bob", km.root / "y", server_name=SERVER_NAME)
    # A CSR for another identity -> refused, and the token stays usable.
    carol, _ = admin.create_token("carol", "client")
    with pytest.raises(PermissionDeniedError, match="issued for 'carol'"):
        enroll(
            km.enroll_address, km.ca_pem, carol, "mallory", km.root / "z", server_name=SERVER_NAME
        )
    enroll(km.enroll_address, km.ca_pem, carol, "carol", km.root / "z", server_name=SERVER_NAME)
    listed = {(c.identity, c.role) for c in admin.list_certificates()}
    assert {("alice", "client"), ("carol", "client")} <= listed
    admin.close()


def test_renewal_over_mtls(km: KeyManagerKit) -> None:
    alice = km.enroll("alice")
    before = x509.load_pem_x509_certificate((alice / "cert.pem").read_bytes())
    renewer = CertificateRenewer(alice, km.address, server_name=SERVER_NAME)
    assert not renewer.due()
    assert renewer.due(dt.datetime.now(dt.UTC) + dt.timedelta(hours=17))
    after = renewer.renew_now()
    assert after.serial_number != before.serial_number
    assert after.subject == before.subject
    assert (alice / "cert.pem").read_bytes() != before.public_bytes(Encoding.PEM)
    TLSConfig.from_dir(alice).verify_own_certificate()
    # A renewal CSR must name the caller itself.
    client = km.client(alice)
    with pytest.raises(PermissionDeniedError, match="own identity"):
        client.renew(make_csr(generate_private_key(), "bob"))
    client.close()


def test_revocation_and_session_keys_survive_a_restart(km: KeyManagerKit) -> None:
    alice, backbone = km.enroll("alice"), km.enroll("bb", "backbone")
    bb = km.client(backbone)
    key = bb.register_session("s-1", "client/alice")
    owner = km.client(alice)
    assert owner.session_key("s-1").secret == key.secret
    km.restart()
    bb, owner = km.client(backbone), km.client(alice)
    again = bb.session_key("s-1", key.key_id)
    assert again.secret == key.secret and again.nonce_prefix != key.nonce_prefix
    rotated = owner.rotate_session_key("s-1")
    assert rotated.key_id == 2 and bb.session_key("s-1", 2).secret == rotated.secret
    with pytest.raises(PermissionDeniedError):
        bb.rotate_session_key("s-1")  # only the owner rotates
    admin = km.admin()
    assert admin.revoke(identity="alice", reason="test") == 1
    km.restart()
    with pytest.raises(UnauthenticatedError, match="revoked"):
        km.client(alice).session_key("s-1")
    assert km.admin().revocations().version == 1
    bb = km.client(backbone)
    bb.end_session("s-1")
    with pytest.raises(PermissionDeniedError):
        bb.session_key("s-1")
    with pytest.raises(NotFoundError):
        km.admin().revoke(serial="ffff")


def test_keys_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    kek_file = tmp_path / "kek"
    state = tmp_path / "state"
    result = runner.invoke(
        cli,
        [
            "keys",
            "init",
            "--state-dir",
            str(state),
            "--kek-file",
            str(kek_file),
            "--admin-dir",
            str(tmp_path / "admin"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(kek_file.stat().st_mode) == 0o600
    # The KEK is stretched with production parameters (the slow part of this test).
    kdf = json.loads((state / "kdf.json").read_text())
    assert kdf["n"] >= MIN_SCRYPT_N and kdf["r"] >= 8
    loose = tmp_path / "loose-kek"
    loose.write_text(kek_file.read_text())
    loose.chmod(0o644)
    refused = runner.invoke(
        cli, ["keys", "init", "--state-dir", str(tmp_path / "s2"), "--kek-file", str(loose)]
    )
    assert refused.exit_code == 2 and f"chmod 600 {loose}" in refused.output
    again = runner.invoke(
        cli, ["keys", "init", "--state-dir", str(state), "--kek-file", str(kek_file)]
    )
    assert again.exit_code == 2 and "already holds" in again.output
    monkeypatch.setenv("SPLITFED_KEK", kek_file.read_text().strip())
    from splitfed.services.keymanager.settings import KeyManagerSettings

    kit = KeyManagerKit(tmp_path, KeyManagerSettings(state_dir=state))
    kit.start()
    try:
        common = [
            "--keymanager",
            kit.address,
            "--tls-dir",
            str(tmp_path / "admin"),
            "--server-name",
            SERVER_NAME,
        ]
        created = runner.invoke(
            cli, ["keys", "token", "create", "dave", "--role", "client", *common]
        )
        assert created.exit_code == 0, created.output
        token = created.stdout.splitlines()[0]
        enrolled = runner.invoke(
            cli,
            [
                "keys",
                "enroll",
                "--keymanager",
                kit.enroll_address,
                "--ca",
                str(state / "ca.pem"),
                "--token",
                token,
                "--identity",
                "dave",
                "--out",
                str(tmp_path / "dave"),
                "--server-name",
                SERVER_NAME,
            ],
        )
        assert enrolled.exit_code == 0, enrolled.output
        renewed = runner.invoke(
            cli,
            [
                "keys",
                "renew",
                "--keymanager",
                kit.address,
                "--tls-dir",
                str(tmp_path / "dave"),
                "--server-name",
                SERVER_NAME,
            ],
        )
        assert renewed.exit_code == 0, renewed.output
        listed = runner.invoke(cli, ["keys", "list", *common])
        assert listed.exit_code == 0 and listed.output.count("dave") == 2
        revoked = runner.invoke(cli, ["keys", "revoke", "dave", "--reason", "left", *common])
        assert revoked.exit_code == 0 and "revoked 2" in revoked.output
        denied = runner.invoke(
            cli,
            [
                "keys",
                "list",
                "--keymanager",
                kit.address,
                "--tls-dir",
                str(tmp_path / "dave"),
                "--server-name",
                SERVER_NAME,
            ],
        )
        assert denied.exit_code == 1 and "revoked" in denied.output
        # The way back in when no admin certificate can renew any more: a new admin
        # certificate straight from the state directory, with the KEK.
        ops = tmp_path / "ops"
        local = ["--state-dir", str(state), "--kek-file", str(kek_file), "--identity", "ops"]
        issued = runner.invoke(cli, ["keys", "admin", *local, "--out", str(ops)])
        assert issued.exit_code == 0, issued.output
        assert stat.S_IMODE((ops / "key.pem").stat().st_mode) == 0o600
        common[common.index("--tls-dir") + 1] = str(ops)
        listed = runner.invoke(cli, ["keys", "list", "--identity", "ops", *common])
        assert listed.exit_code == 0 and " admin " in listed.output, listed.output
    finally:
        kit.stop()


def test_denials_are_counted(km: KeyManagerKit) -> None:
    labels = {"service": "splitfed.v1.KeyManager", "method": "CreateToken", "reason": "role"}
    before = REGISTRY.get_sample_value("splitfed_authorization_denials_total", labels) or 0.0
    alice = km.client(km.enroll("alice"))
    with pytest.raises(PermissionDeniedError, match="may not call"):
        alice.create_token("bob", "client")
    after = REGISTRY.get_sample_value("splitfed_authorization_denials_total", labels)
    assert after == before + 1


def test_a_server_serves_its_renewed_certificate_without_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = CertificateAuthority.create("renewal CA")
    kit = keymanager_kit(tmp_path, monkeypatch, ca=ca)
    kit.start()
    server_dir = tmp_path / "server"
    # Valid for three more seconds (certificates start CLOCK_SKEW in the past), and on
    # record at the key manager (it renews only certificates it knows).
    issued = ca.issue(
        "bb", "backbone", dns_names=["localhost"], validity=CLOCK_SKEW + dt.timedelta(seconds=3)
    )
    issued.write(server_dir)
    assert kit.servers is not None
    kit.servers.authority.store.record_certificate(
        certificate_row(issued.cert_pem, "bb", "backbone"),
        issued.cert_pem,
        actor="test",
        action="certificate.issue",
    )
    server = create_server(
        [diagnostics_binding()],
        TLSConfig.from_dir(server_dir),
        interceptors=[AuthorizationInterceptor({DIAGNOSTICS: DIAGNOSTICS_POLICY})],
    ).start()
    renewer = CertificateRenewer(
        server_dir, kit.address, server_name=SERVER_NAME, renew_fraction=0.5, check_every_s=0.2
    )
    try:
        assert renewer.due()
        renewer.start()
        assert wait_until(lambda: renewer.renewals == 1, timeout_s=10)
        old_expiry = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=3)
        assert wait_until(lambda: dt.datetime.now(dt.UTC) > old_expiry, timeout_s=10)
        # A new connection after the old certificate expired: served the renewed one.
        client_tls = TLSConfig.from_dir(kit.enroll("alice"))
        with create_channel(server.address, client_tls, server_name="localhost") as channel:
            assert DiagnosticsClient(channel).who_am_i().identity == "alice"
    finally:
        renewer.stop()
        server.stop(0)
        kit.stop()


def test_the_key_manager_renews_its_own_certificate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kit = keymanager_kit(tmp_path, monkeypatch)
    server_dir = kit.state_dir / "server"
    authority = KeyAuthority(kit.state_dir, KEK.encode(), allow_weak_kdf=True)
    before = (server_dir / "cert.pem").read_bytes()
    assert not authority.renew_own(server_dir)
    assert authority.renew_own(server_dir, renew_fraction=1e-9)
    after = x509.load_pem_x509_certificate((server_dir / "cert.pem").read_bytes())
    assert (server_dir / "cert.pem").read_bytes() != before
    assert after.subject.rfc4514_string() == "CN=keymanager,OU=keymanager,O=splitfed"
    TLSConfig.from_dir(server_dir).verify_own_certificate()
    authority.close()
    kit.start()  # and serves with it
    admin = kit.admin()
    serials = {c.serial for c in admin.list_certificates("keymanager")}
    assert format(after.serial_number, "x") in serials and len(serials) == 2
    admin.close()
    kit.stop()


# --- issue 15: renewal racing revocation, lineage lifetime, need-to-know, restarts -------

DAY = 24 * 3600.0


def test_a_renewal_racing_a_revocation_issues_nothing(
    km: KeyManagerKit, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The renewal passes the interceptor's revocation check, then the admin revokes,
    then the key manager signs: the new certificate must not be issued."""
    alice = km.enroll("alice")
    assert km.servers is not None
    authority = km.servers.authority
    signing, revoked = threading.Event(), threading.Event()
    sign = authority._sign

    def sign_after_the_revocation(*args: Any, **kwargs: Any) -> bytes:
        signing.set()  # past the interceptor
        assert revoked.wait(10)
        return sign(*args, **kwargs)

    monkeypatch.setattr(authority, "_sign", sign_after_the_revocation)
    outcome: dict[str, object] = {}

    def renew() -> None:
        client = km.client(alice)
        try:
            outcome["certificate"] = client.renew(make_csr(generate_private_key(), "alice"))
        except Exception as exc:
            outcome["error"] = exc
        finally:
            client.close()

    renewal = threading.Thread(target=renew)
    renewal.start()
    assert signing.wait(10)
    admin = km.admin()
    assert admin.revoke(identity="alice", reason="stolen") == 1
    admin.close()
    revoked.set()
    renewal.join(10)
    assert "certificate" not in outcome
    assert isinstance(outcome.get("error"), UnauthenticatedError)
    assert "revoked" in str(outcome["error"])
    rows = authority.store.certificates("alice")
    assert len(rows) == 1 and rows[0].revoked_at is not None


def test_renewal_past_the_maximum_lifetime_needs_a_new_token(
    km: KeyManagerKit, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = km.enroll("alice")
    assert km.servers is not None
    later = time.time() + 30 * DAY + 60
    monkeypatch.setattr(km.servers.authority, "clock", lambda: later)
    with pytest.raises(PermissionDeniedError, match="new enrollment token"):
        CertificateRenewer(alice, km.address, server_name=SERVER_NAME).renew_now()
    args = ["--keymanager", km.address, "--tls-dir", str(alice), "--server-name", SERVER_NAME]
    renewed = CliRunner().invoke(cli, ["keys", "renew", *args])
    assert renewed.exit_code == 1 and "new enrollment token" in renewed.output
    assert len(km.servers.authority.store.certificates("alice")) == 1


def test_only_admins_learn_who_was_revoked_and_why(km: KeyManagerKit) -> None:
    carol = km.enroll("carol")
    serial = format(
        x509.load_pem_x509_certificate((carol / "cert.pem").read_bytes()).serial_number, "x"
    )
    admin = km.admin()
    admin.revoke(identity="carol", reason="laptop stolen in Lyon")
    for party in (km.enroll("alice"), km.enroll("bb", "backbone"), km.enroll("agg", "aggregator")):
        client = km.client(party)
        state = client.revocations()
        client.close()
        assert state.version == 1 and state.serials == {serial}
        assert [(r.identity, r.role, r.reason) for r in state.records] == [("", "", "")]
    (record,) = admin.revocations().records
    assert (record.identity, record.role, record.reason) == (
        "carol",
        "client",
        "laptop stolen in Lyon",
    )
    admin.close()


def test_a_restarted_service_refuses_a_revoked_certificate_before_any_poll(
    km: KeyManagerKit,
) -> None:
    """The service keeps the last revocation list it fetched; restarted while the key
    manager is down, it refuses the revoked certificate from its first call."""
    service = km.enroll("svc", "backbone", dns_names=("localhost",))
    alice, bob = km.enroll("alice"), km.enroll("bob")
    settings = SecuritySettings(
        keymanager=km.address, keymanager_server_name=SERVER_NAME, revocation_poll_s=30
    )

    def serve() -> tuple[ServerSecurity, Server]:
        tls = TLSConfig.from_dir(service)
        security = server_security({DIAGNOSTICS: DIAGNOSTICS_POLICY}, tls, settings)
        server = create_server([diagnostics_binding()], tls, interceptors=[security.interceptor])
        security.start()
        return security, server.start()

    def who_am_i(server: Server, party: Path) -> str:
        """The identity the service sees, or the status and details of its refusal."""
        tls = TLSConfig.from_dir(party)
        with create_channel(server.address, tls, server_name="localhost") as channel:
            try:
                return DiagnosticsClient(channel).who_am_i().identity
            except grpc.RpcError as err:
                return f"{err.code().name}: {err.details()}"

    security, server = serve()
    admin = km.admin()
    admin.revoke(identity="alice", reason="left")
    admin.close()
    poller = next(t for t in security.background if isinstance(t, RevocationPoller))
    poller.tick()  # the service learns of it from the key manager
    assert who_am_i(server, alice) == "UNAUTHENTICATED: certificate revoked"
    server.stop(0)
    security.stop()
    km.stop()  # and stays down
    security, server = serve()
    try:
        assert who_am_i(server, alice) == "UNAUTHENTICATED: certificate revoked"
        assert who_am_i(server, bob) == "bob"
    finally:
        server.stop(0)
        security.stop()
