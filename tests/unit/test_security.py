"""The CA helper and TLS material checks."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from splitfed.security.ca import (
    CertificateAuthority,
    generate_private_key,
    make_csr,
    private_key_pem,
    validate_identity,
)
from splitfed.security.identity import identity_from_uri
from splitfed.tls import TLSConfig


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create("unit CA")


def test_issued_certificate_names_identity_and_role(ca: CertificateAuthority) -> None:
    issued = ca.issue("backbone-0", "backbone", dns_names=["b.example"], ip_addresses=["10.0.0.1"])
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "backbone-0"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    assert uris == ["spiffe://splitfed/backbone/backbone-0"]
    assert san.get_values_for_type(x509.DNSName) == ["b.example"]
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.issuer == ca.certificate.subject
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(ca.certificate)


def test_client_certificates_cannot_authenticate_servers(ca: CertificateAuthority) -> None:
    cert = x509.load_pem_x509_certificate(ca.issue("hospital-a", "client").cert_pem)
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(ValueError, match="only server roles get DNS names"):
        ca.issue("hospital-a", "client", dns_names=["backbone.splitfed.local"])


def test_csr_signing_uses_the_requested_identity_not_the_csr_subject(
    ca: CertificateAuthority,
) -> None:
    key = generate_private_key()
    cert_pem = ca.sign_csr(make_csr(key, "whatever"), "bank-b", "client")
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "bank-b"
    TLSConfig(ca.cert_pem, cert_pem, private_key_pem(key))  # the key matches the certificate


@pytest.mark.parametrize("bad", ["", "Upper", "-lead", "a/b", "x" * 64, "sp ace"])
def test_identity_names_are_validated(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid identity"):
        validate_identity(bad)


def test_unknown_role_is_refused(ca: CertificateAuthority) -> None:
    with pytest.raises(ValueError, match="invalid role 'root'"):
        ca.issue("x", "root")


def test_ca_key_round_trips_encrypted_at_rest(ca: CertificateAuthority) -> None:
    pem = ca.key_pem(b"kek")
    assert b"ENCRYPTED" in pem
    loaded = CertificateAuthority.load(ca.cert_pem, pem, b"kek")
    assert loaded.certificate == ca.certificate
    with pytest.raises((ValueError, TypeError)):
        CertificateAuthority.load(ca.cert_pem, pem, b"wrong")


def test_written_private_keys_are_owner_only(ca: CertificateAuthority, tmp_path: Path) -> None:
    ca.issue("hospital-a", "client").write(tmp_path / "a")
    assert stat.S_IMODE((tmp_path / "a" / "key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "a" / "cert.pem").stat().st_mode) == 0o644
    assert TLSConfig.from_dir(tmp_path / "a") is not None


def test_tls_config_errors_say_what_is_wrong(ca: CertificateAuthority, tmp_path: Path) -> None:
    a = ca.issue("a", "client")
    b = ca.issue("b", "client")
    assert a.key_pem is not None and b.key_pem is not None
    with pytest.raises(ValueError, match="does not belong to the certificate"):
        TLSConfig(ca.cert_pem, a.cert_pem, b.key_pem)
    with pytest.raises(ValueError, match="needs an explicit insecure=True"):
        TLSConfig(ca.cert_pem, a.cert_pem)
    with pytest.raises(ValueError, match="insecure mode takes no certificates"):
        TLSConfig(ca.cert_pem, insecure=True)
    with pytest.raises(ValueError, match="CA certificate is not a PEM certificate"):
        TLSConfig(b"junk", a.cert_pem, a.key_pem)
    with pytest.raises(ValueError, match="private key is not"):
        TLSConfig(ca.cert_pem, a.cert_pem, b"junk")
    with pytest.raises(ValueError, match=r"CA certificate file .*ca.pem does not exist"):
        TLSConfig.from_dir(tmp_path)
    assert "BEGIN" not in repr(TLSConfig(ca.cert_pem, a.cert_pem, a.key_pem))


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("spiffe://splitfed/client/hospital-a", ("hospital-a", "client")),
        ("spiffe://splitfed/backbone/b0", ("b0", "backbone")),
        ("spiffe://splitfed/wizard/x", None),
        ("https://splitfed/client/x", None),
        ("spiffe://splitfed/client/x/y", None),
    ],
)
def test_identity_from_uri(uri: str, expected: tuple[str, str] | None) -> None:
    identity = identity_from_uri(uri)
    assert (identity and (identity.name, identity.role)) == expected
