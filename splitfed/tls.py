"""TLS material for servers and channels: mutual TLS by default, plaintext only on request."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from splitfed.files import StrPath

logger = logging.getLogger(__name__)

PrivateKey = ec.EllipticCurvePrivateKey

# Tolerates small clock differences between parties.
CLOCK_SKEW = dt.timedelta(minutes=5)


def load_private_key(pem: bytes, password: bytes | None = None) -> PrivateKey:
    key = serialization.load_pem_private_key(pem, password=password)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("expected an EC private key")
    return key


def same_public_key(certificate: x509.Certificate, key: PrivateKey) -> bool:
    """Whether ``key`` is the private half of ``certificate``'s public key."""
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return certificate.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{what} file {path} does not exist") from None
    except OSError as exc:
        raise ValueError(f"cannot read {what} file {path}: {exc.strerror}") from None


@dataclass(frozen=True, repr=False)
class TLSConfig:
    """Certificates of one party: the deployment CA, its own chain and private key.

    ``insecure=True`` turns TLS off entirely (plaintext HTTP/2, no identities); it exists
    for debugging on loopback and logs a warning wherever it is used.
    """

    ca_cert: bytes | None = None
    cert_chain: bytes | None = None
    private_key: bytes | None = None
    insecure: bool = False
    # Where the material was read from (``from_dir``); servers then pick up renewed
    # certificates written there without a restart (see :meth:`server_credentials`).
    source_dir: Path | None = None

    def __post_init__(self) -> None:
        material = (self.ca_cert, self.cert_chain, self.private_key)
        if self.insecure:
            if any(m is not None for m in material):
                raise ValueError("insecure mode takes no certificates; drop them or insecure=True")
            return
        if any(m is None for m in material):
            raise ValueError(
                "mutual TLS needs the CA certificate, a certificate chain and a private key "
                "(ca.pem, cert.pem, key.pem); plaintext needs an explicit insecure=True"
            )
        assert self.ca_cert is not None and self.cert_chain is not None
        assert self.private_key is not None
        try:
            x509.load_pem_x509_certificates(self.ca_cert)
        except ValueError:
            raise ValueError("CA certificate is not a PEM certificate") from None
        try:
            leaf = x509.load_pem_x509_certificates(self.cert_chain)[0]
        except ValueError:
            raise ValueError("certificate chain is not a PEM certificate") from None
        try:
            key = load_private_key(self.private_key)
        except (ValueError, TypeError):
            raise ValueError("private key is not an unencrypted PEM EC private key") from None
        if not same_public_key(leaf, key):
            raise ValueError("private key does not belong to the certificate")

    def __repr__(self) -> str:  # never print key material
        return "TLSConfig(insecure=True)" if self.insecure else "TLSConfig(mtls)"

    @classmethod
    def from_files(cls, ca_cert: StrPath, cert_chain: StrPath, private_key: StrPath) -> TLSConfig:
        ca_cert = Path(ca_cert)
        cert_chain = Path(cert_chain)
        private_key = Path(private_key)
        return cls(
            ca_cert=_read(ca_cert, "CA certificate"),
            cert_chain=_read(cert_chain, "certificate"),
            private_key=_read(private_key, "private key"),
        )

    @classmethod
    def from_dir(cls, directory: StrPath) -> TLSConfig:
        """Load ``ca.pem``, ``cert.pem`` and ``key.pem`` from one directory."""
        directory = Path(directory)
        loaded = cls.from_files(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
        return dataclasses.replace(loaded, source_dir=directory)

    def reload(self) -> TLSConfig:
        """The material as it is now in :attr:`source_dir` (itself if not from a directory)."""
        return self if self.source_dir is None else TLSConfig.from_dir(self.source_dir)

    def _fingerprint(self) -> tuple[float, ...]:
        assert self.source_dir is not None
        return tuple(
            (self.source_dir / name).stat().st_mtime for name in ("ca.pem", "cert.pem", "key.pem")
        )

    @classmethod
    def plaintext(cls) -> TLSConfig:
        return cls(insecure=True)

    def verify_own_certificate(self, now: dt.datetime | None = None) -> None:
        """Fail early and clearly if peers would refuse this party's certificate.

        Checks that the leaf certificate is within its validity period and was issued by
        a CA in ``ca_cert`` (or by the next certificate of the chain). Without this, a
        server that refuses the certificate under TLS 1.3 only closes the connection,
        which a client cannot tell from a network fault.
        """
        if self.insecure:
            return
        assert self.ca_cert is not None and self.cert_chain is not None
        chain = x509.load_pem_x509_certificates(self.cert_chain)
        leaf = chain[0]
        when = now or dt.datetime.now(dt.UTC)
        if when > leaf.not_valid_after_utc:
            raise ValueError(
                f"certificate {leaf.subject.rfc4514_string()} expired at "
                f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC; renew it before expiry "
                "next time (`splitfed keys renew`), now enroll again with a new token "
                "(`splitfed keys enroll`)"
            )
        if when < leaf.not_valid_before_utc - CLOCK_SKEW:
            raise ValueError(
                f"certificate {leaf.subject.rfc4514_string()} is not valid before "
                f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC; check the clock"
            )
        for issuer in [*chain[1:], *x509.load_pem_x509_certificates(self.ca_cert)]:
            try:
                leaf.verify_directly_issued_by(issuer)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return
        raise ValueError(
            f"certificate {leaf.subject.rfc4514_string()} was not issued by the deployment "
            "CA in the CA certificate file; enroll again with this deployment"
        )

    def server_credentials(self, *, client_auth: bool = True) -> grpc.ServerCredentials:
        """Credentials that demand and verify a client certificate from the deployment CA
        (``client_auth=False``: server-authenticated TLS only, for enrollment).

        Material read with :meth:`from_dir` is re-read for new connections when its files
        change, so a renewed certificate takes effect without a restart.
        """
        assert self.private_key is not None and self.cert_chain is not None
        if self.source_dir is None:
            return grpc.ssl_server_credentials(
                [(self.private_key, self.cert_chain)],
                root_certificates=self.ca_cert if client_auth else None,
                require_client_auth=client_auth,
            )
        state = {"seen": self._fingerprint()}

        def configuration(tls: TLSConfig) -> grpc.ServerCertificateConfiguration:
            assert tls.private_key is not None and tls.cert_chain is not None
            return grpc.ssl_server_certificate_configuration(
                [(tls.private_key, tls.cert_chain)],
                root_certificates=tls.ca_cert if client_auth else None,
            )

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            try:
                seen = self._fingerprint()
                if seen == state["seen"]:
                    return None
                fresh = self.reload()
            except (OSError, ValueError) as exc:  # mid-write or broken: keep the old one
                logger.warning("[TLSConfig] not reloading %s: %s", self.source_dir, exc)
                return None
            state["seen"] = seen
            logger.info("[TLSConfig] reloaded the certificate in %s", self.source_dir)
            return configuration(fresh)

        # The fetcher returns None for "unchanged" (grpc's stub types it too narrowly).
        fetcher = cast(Callable[[], grpc.ServerCertificateConfiguration], fetch)
        return grpc.dynamic_ssl_server_credentials(
            configuration(self), fetcher, require_client_authentication=client_auth
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials that present this party's certificate and verify the server's."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_cert,
            private_key=self.private_key,
            certificate_chain=self.cert_chain,
        )


def warn_plaintext(where: str) -> None:
    logger.warning(
        "[%s] TLS is OFF (insecure mode): traffic is plaintext and peers are not "
        "authenticated; use only for local debugging",
        where,
    )
