"""Why a call to another service failed, in one line that names the cause and the fix.

Every client (the backbone's, the aggregator's, the key manager's, ``splitfed status``)
hands a failed call to :func:`call_failure` with what it knows of the other end (an
:class:`Endpoint`: the service, its address, the name its certificate must carry, this
party's TLS directory). What gRPC reports is read from the status code and the details
string that gRPC C-core and BoringSSL write:

    cause        details (gRPC 1.6x)                                    fix
    hostname     "Hostname Verification Check failed", "Peer name X     set server_name to a name
                 is not in peer certificate"                             of the certificate, or
                                                                        re-enroll the server
                                                                        with --dns / --ip
    unknown CA   "CERTIFICATE_VERIFY_FAILED: unable to get local        use the deployment's
                 issuer certificate" (or "self signed certificate")     ca.pem
    expired      "CERTIFICATE_VERIFY_FAILED: certificate has expired"   the server re-enrolls
    revoked      UNAUTHENTICATED "certificate revoked" (our            enroll again with a new
                 authorization interceptor)                             token
    closed       "Socket closed", "Connection reset" during the         the server refuses this
                 handshake                                              party's certificate
    unreachable  "Connection refused", "errors resolving"               start the service, check
                                                                        the address and port
    no answer    DEADLINE_EXCEEDED "Deadline Exceeded"                  the same

Anything else is no connection failure (:func:`classify` returns ``None``) and the
caller keeps its own mapping (:func:`splitfed.errors.error_from_rpc`). This party's own
certificate (expired, from another CA) is checked before it connects
(:meth:`splitfed.tls.TLSConfig.verify_own_certificate`), so those never get here.

:class:`ConnectionFailedError` is both a :class:`~splitfed.errors.SplitfedError` (the
CLI prints its message as ``error: ...``) and a :class:`grpc.RpcError` with the original
``code()`` and ``details()``: callers that wait out an unavailable service (the retry
policy, a federation member while the aggregator restarts) still recognise it.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import grpc
from cryptography import x509

from splitfed.errors import SplitfedError, UnauthenticatedError, rpc_status


class Cause(StrEnum):
    HOSTNAME = "hostname"
    UNKNOWN_CA = "unknown_ca"
    EXPIRED = "expired"
    REVOKED = "revoked"
    CLOSED = "closed"
    UNREACHABLE = "unreachable"
    NO_ANSWER = "no_answer"  # a deadline passed before the service answered

    @property
    def retryable(self) -> bool:
        """Whether waiting may help (a service restarting), as opposed to a fix by hand.
        A connection closed under a call is one: a service killed mid-stream says "Socket
        closed" or "Connection reset" as one refusing this party's certificate does."""
        return self in (Cause.UNREACHABLE, Cause.NO_ANSWER, Cause.CLOSED)


# Lowercased markers in the details, most specific first (an expired certificate's
# details also say CERTIFICATE_VERIFY_FAILED).
_MARKERS: tuple[tuple[Cause, tuple[str, ...]], ...] = (
    (Cause.HOSTNAME, ("hostname verification", "peer name", "no match found for server name")),
    (Cause.EXPIRED, ("certificate has expired", "certificate_expired")),
    (
        Cause.UNKNOWN_CA,
        (
            "unable to get local issuer",
            "self signed certificate",
            "self-signed certificate",
            "certificate_verify_failed",
            "unknown_ca",
            "unknown ca",
            "bad_certificate",
        ),
    ),
    (Cause.CLOSED, ("socket closed", "connection reset", "end of tcp stream")),
    (
        Cause.UNREACHABLE,
        (
            "connection refused",
            "errors resolving",
            "dns resolution failed",
            "name resolution",
            "no route to host",
            "network is unreachable",
            "failed to connect to remote host",
        ),
    ),
)


def classify(code: grpc.StatusCode | None, details: str) -> Cause | None:
    """The connection failure a call's status stands for, or ``None`` if it is none."""
    lowered = details.lower()
    if code is grpc.StatusCode.UNAUTHENTICATED:
        return Cause.REVOKED if "certificate revoked" in lowered else None
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        # A call that reached the service and ran out of time says nothing of TLS; only a
        # connection that never came up is named here (gRPC's bare "Deadline Exceeded").
        return Cause.NO_ANSWER if lowered in ("", "deadline exceeded") else None
    if code is not grpc.StatusCode.UNAVAILABLE:
        return None
    for cause, markers in _MARKERS:
        if any(marker in lowered for marker in markers):
            return cause
    return None


@dataclass(frozen=True)
class Endpoint:
    """What a client knows of the other end of its calls."""

    service: str  # "backbone", "aggregator", "key manager"
    address: str  # host:port
    server_name: str | None = None  # the name its certificate must carry (None: the host)
    tls_dir: Path | None = None  # this party's ca.pem, cert.pem and key.pem

    @property
    def expected_name(self) -> str:
        return self.server_name or self.address.rpartition(":")[0].strip("[]")

    @property
    def ca_file(self) -> str:
        if self.tls_dir is not None:
            return str(self.tls_dir / "ca.pem")
        return "this party's CA certificate (ca.pem, or --ca)"


def is_ip_address(name: str) -> bool:
    """Whether ``name`` is an IP literal (a certificate then needs it as an IP SAN)."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def server_certificate_names(address: str, timeout_s: float = 2.0) -> list[str] | None:
    """The DNS names and IP addresses in the certificate the server at ``address``
    presents (read without verifying it), or ``None`` if it cannot be read."""
    host, _, port = address.rpartition(":")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s) as raw,
            context.wrap_socket(raw) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        if der is None:
            return None
        cert = x509.load_der_x509_certificate(der)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return None
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return [*san.get_values_for_type(x509.DNSName), *ips]


def explain(
    cause: Cause,
    endpoint: Endpoint,
    *,
    names: Callable[[str], list[str] | None] = server_certificate_names,
) -> str:
    """The one line for ``cause`` at ``endpoint``: what went wrong and what to do."""
    where = f"the {endpoint.service} at {endpoint.address}"
    if cause is Cause.HOSTNAME:
        expected = endpoint.expected_name
        kind, flag = ("IP address", "--ip") if is_ip_address(expected) else ("name", "--dns")
        carried = names(endpoint.address)
        has = f" (it has: {', '.join(carried)})" if carried else ""
        choose = "one of those names" if carried else "a name it carries"
        if endpoint.service.startswith("key manager"):
            remake = f"make its certificate with `splitfed keys init ... {flag} {expected}`"
        else:
            remake = (
                f"re-enroll the {endpoint.service} with a token from "
                f"`splitfed keys token create ... {flag} {expected}`"
            )
        return (
            f"the certificate of {where} does not carry the {kind} {expected!r}{has}: set "
            f"server_name to {choose}, or {remake}"
        )
    if cause is Cause.UNKNOWN_CA:
        return (
            f"the certificate of {where} was not issued by the CA in {endpoint.ca_file}: the "
            "two parties hold different CAs; use the deployment's ca.pem (the one `splitfed "
            "keys enroll` writes to its --out directory, or ca.pem in the --state-dir of "
            "`splitfed keys init`)"
        )
    if cause is Cause.EXPIRED:
        return (
            f"the certificate of {where} has expired: its operator enrolls it again with a new "
            "token (`splitfed keys token create`, `splitfed keys enroll`); `splitfed keys "
            "renew` works only before expiry"
        )
    if cause is Cause.REVOKED:
        return (
            f"{where} refuses this party's certificate: it was revoked; enroll again with a "
            "new token (an admin runs `splitfed keys token create`, then `splitfed keys enroll`)"
        )
    if cause is Cause.CLOSED:
        return (
            f"{where} closed the connection during the TLS handshake: it refuses this "
            f"party's certificate (issued by another CA, or expired: check "
            f"`splitfed status`) or {endpoint.address} is no splitfed mTLS port"
        )
    if cause is Cause.NO_ANSWER:
        return (
            f"{where} did not answer in time: check that the service runs, that the "
            "address and port are right and that nothing between drops the connection"
        )
    return (
        f"nothing answers at {endpoint.address} (the {endpoint.service}): check that the "
        "service runs and that the address and port are right"
    )


class ConnectionFailedError(SplitfedError, grpc.RpcError):
    """A call that could not reach its service or agree on TLS with it. The message
    names the cause and the fix; ``code()`` and ``details()`` are the original call's."""

    def __init__(self, message: str, cause: Cause, err: grpc.RpcError) -> None:
        super().__init__(message)
        self.cause = cause
        code, self._details = rpc_status(err)
        self._code = code or grpc.StatusCode.UNKNOWN

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def call_failure(
    err: grpc.RpcError,
    endpoint: Endpoint | None,
    *,
    names: Callable[[str], list[str] | None] = server_certificate_names,
) -> SplitfedError | None:
    """The error to raise for ``err`` where it is a connection or TLS failure (a revoked
    certificate: an :class:`~splitfed.errors.UnauthenticatedError`); ``None`` otherwise,
    or where nothing is known of the other end."""
    if isinstance(err, SplitfedError):  # already explained (a client called by another)
        return err
    code, details = rpc_status(err)
    cause = classify(code, details)
    if cause is None or endpoint is None:
        return None
    message = explain(cause, endpoint, names=names)
    if cause is Cause.REVOKED:
        return UnauthenticatedError(message)
    return ConnectionFailedError(message, cause, err)
