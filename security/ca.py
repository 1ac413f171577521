"""A small certificate authority for a splitfed deployment.

Every party (client, backbone, aggregator, key manager, admin) holds an ECDSA P-256 key
of its own and a short-lived certificate from the deployment CA. The certificate names
the party twice: the subject common name is its identity, and one URI SAN
``spiffe://<trust domain>/<role>/<identity>`` carries role and identity in a form that
servers read from the TLS peer (see :mod:`splitfed.security.identity`).

Tests and the demo mint whole deployments with :meth:`CertificateAuthority.issue`; the key
manager signs certificate requests with :meth:`CertificateAuthority.sign_csr`, so it never
sees a private key other than its own.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict, Unpack

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from splitfed.files import StrPath, atomic_write
from splitfed.tls import CLOCK_SKEW, PrivateKey, load_private_key, same_public_key

ROLES = frozenset({"client", "backbone", "aggregator", "keymanager", "admin"})
# Roles that run servers; only their certificates may authenticate a server.
SERVER_ROLES = frozenset({"backbone", "aggregator", "keymanager"})
DEFAULT_TRUST_DOMAIN = "splitfed"
DEFAULT_CERT_VALIDITY = dt.timedelta(hours=24)
DEFAULT_CA_VALIDITY = dt.timedelta(days=3650)

_IDENTITY_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


def validate_identity(identity: str) -> str:
    """Return ``identity`` if it is a valid party name, else raise ``ValueError``."""
    if not _IDENTITY_RE.match(identity):
        raise ValueError(
            f"invalid identity {identity!r}: use 1-63 characters of a-z, 0-9, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return identity


def validate_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"invalid role {role!r}: expected one of {', '.join(sorted(ROLES))}")
    return role


def spiffe_uri(trust_domain: str, role: str, identity: str) -> str:
    return f"spiffe://{trust_domain}/{role}/{identity}"


def generate_private_key() -> PrivateKey:
    """A fresh ECDSA P-256 key, generated where it will be used."""
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: PrivateKey, password: bytes | None = None) -> bytes:
    """PKCS#8 PEM, encrypted with ``password`` when one is given."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def make_csr(key: PrivateKey, identity: str) -> bytes:
    """A PEM certificate signing request for ``identity``, signed by ``key``."""
    validate_identity(identity)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def write_pem(path: StrPath, data: bytes, *, private: bool) -> None:
    """Write PEM data; private material is created with mode 0600 and never widened."""
    path = Path(path)
    with atomic_write(path, private=private) as out:
        out.write(data)


@dataclass(frozen=True)
class IssuedCertificate:
    """A leaf certificate with its key (when generated locally) and the CA chain."""

    identity: str
    role: str
    cert_pem: bytes
    chain_pem: bytes
    key_pem: bytes | None = None

    def write(self, directory: StrPath) -> None:
        """Write ``cert.pem``, ``ca.pem`` and (if present) ``key.pem`` into ``directory``."""
        directory = Path(directory)
        write_pem(directory / "cert.pem", self.cert_pem, private=False)
        write_pem(directory / "ca.pem", self.chain_pem, private=False)
        if self.key_pem is not None:
            write_pem(directory / "key.pem", self.key_pem, private=True)


class LeafOptions(TypedDict, total=False):
    """What a leaf certificate may carry besides its identity and role: server names (DNS
    names and IP addresses, server roles only) and a validity of ``validity`` (default
    :data:`DEFAULT_CERT_VALIDITY`) from ``not_before`` (default: now less the clock skew
    allowance)."""

    dns_names: Iterable[str]
    ip_addresses: Iterable[str]
    validity: dt.timedelta
    not_before: dt.datetime | None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """Digital signatures; for the CA also certificate and CRL signing."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


class CertificateAuthority:
    """The root of trust of one deployment: a self-signed ECDSA P-256 CA."""

    def __init__(
        self,
        certificate: x509.Certificate,
        key: PrivateKey,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
    ) -> None:
        if not same_public_key(certificate, key):
            raise ValueError("CA certificate and key do not match")
        self.certificate = certificate
        self._key = key
        self.trust_domain = trust_domain

    @classmethod
    def create(
        cls,
        name: str = "splitfed deployment CA",
        *,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        validity: dt.timedelta = DEFAULT_CA_VALIDITY,
    ) -> CertificateAuthority:
        key = generate_private_key()
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                x509.NameAttribute(NameOID.COMMON_NAME, name),
            ]
        )
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key, trust_domain)

    @classmethod
    def load(
        cls,
        cert_pem: bytes,
        key_pem: bytes,
        password: bytes | None = None,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
    ) -> CertificateAuthority:
        return cls(
            x509.load_pem_x509_certificate(cert_pem),
            load_private_key(key_pem, password),
            trust_domain,
        )

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def key_pem(self, password: bytes | None) -> bytes:
        """The CA key as PEM; pass a key-encryption password to store it at rest."""
        return private_key_pem(self._key, password)

    def sign_csr(
        self, csr_pem: bytes, identity: str, role: str, **options: Unpack[LeafOptions]
    ) -> bytes:
        """Sign a CSR for ``identity`` in ``role``; the CSR's own subject is ignored."""
        csr = x509.load_pem_x509_csr(csr_pem)
        if not csr.is_signature_valid:
            raise ValueError("certificate signing request has an invalid signature")
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise ValueError("certificate signing request must carry an EC public key")
        return self._sign(public_key, identity, role, **options)

    def issue(self, identity: str, role: str, **options: Unpack[LeafOptions]) -> IssuedCertificate:
        """Generate a key and certificate in one step (tests, the local demo)."""
        key = generate_private_key()
        cert_pem = self._sign(key.public_key(), identity, role, **options)
        return IssuedCertificate(identity, role, cert_pem, self.cert_pem, private_key_pem(key))

    def _sign(
        self,
        public_key: ec.EllipticCurvePublicKey,
        identity: str,
        role: str,
        *,
        dns_names: Iterable[str] = (),
        ip_addresses: Iterable[str] = (),
        validity: dt.timedelta = DEFAULT_CERT_VALIDITY,
        not_before: dt.datetime | None = None,
    ) -> bytes:
        validate_identity(identity)
        validate_role(role)
        dns_names, ip_addresses = list(dns_names), list(ip_addresses)
        if (dns_names or ip_addresses) and role not in SERVER_ROLES:
            raise ValueError(f"only server roles get DNS names or IP addresses, not {role!r}")
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if role in SERVER_ROLES:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        start = not_before if not_before is not None else _now() - CLOCK_SKEW
        sans: list[x509.GeneralName] = [
            x509.UniformResourceIdentifier(spiffe_uri(self.trust_domain, role, identity))
        ]
        sans += [x509.DNSName(name) for name in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
        cert = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.trust_domain),
                        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                        x509.NameAttribute(NameOID.COMMON_NAME, identity),
                    ]
                )
            )
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(usages),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)
