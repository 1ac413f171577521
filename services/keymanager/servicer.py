"""gRPC servicer for splitfed.v1.KeyManager: converts messages, calls :class:`KeyAuthority`."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from splitfed.errors import InvalidArgumentError, UnauthenticatedError, unary_errors
from splitfed.protocol.keys import SERVICE
from splitfed.security.authz import Policy, peer_certificate_pem
from splitfed.security.identity import Identity, peer_identity
from splitfed.services.keymanager.authority import KeyAuthority
from splitfed.services.keymanager.store import CertificateRow
from splitfed.transport import ServiceBinding, service_binding
from splitfed.v1 import keys_pb2

_PARTIES = frozenset({"client", "backbone", "aggregator", "admin"})
POLICY: Policy = {
    "Renew": _PARTIES,
    "CreateToken": frozenset({"admin"}),
    "Revoke": frozenset({"admin"}),
    "ListCertificates": frozenset({"admin"}),
    "GetRevocations": frozenset({*_PARTIES, "keymanager"}),
    "RegisterSession": frozenset({"backbone"}),
    "GetSessionKey": frozenset({"client", "backbone"}),
    "RotateSessionKey": frozenset({"client"}),
    "EndSession": frozenset({"client", "backbone"}),
}


def _caller(context: grpc.ServicerContext) -> Identity:
    identity = peer_identity(context)
    if identity is None:  # the interceptor refuses these first
        raise UnauthenticatedError("no client certificate identity")
    return identity


def _record(row: CertificateRow) -> keys_pb2.CertificateRecord:
    return keys_pb2.CertificateRecord(
        serial=row.serial,
        identity=row.identity,
        role=row.role,
        not_before=int(row.not_before),
        not_after=int(row.not_after),
        revoked=row.revoked_at is not None,
        revoked_at=int(row.revoked_at or 0),
        reason=row.reason,
    )


class KeyManagerServicer:
    def __init__(
        self, authority: KeyAuthority, on_revoke: Callable[[], None] | None = None
    ) -> None:
        self.authority = authority
        self.on_revoke = on_revoke

    @unary_errors
    def Enroll(
        self, request: keys_pb2.EnrollRequest, context: grpc.ServicerContext
    ) -> keys_pb2.EnrollResponse:
        if not request.token:
            raise UnauthenticatedError("an enrollment token is required")
        grant = self.authority.enroll(request.token, request.csr_pem)
        return keys_pb2.EnrollResponse(certificate_pem=grant.certificate_pem, ca_pem=grant.ca_pem)

    @unary_errors
    def Renew(
        self, request: keys_pb2.RenewRequest, context: grpc.ServicerContext
    ) -> keys_pb2.RenewResponse:
        current = peer_certificate_pem(context)
        if current is None:
            raise UnauthenticatedError("renewal needs the current client certificate")
        grant = self.authority.renew(_caller(context), current, request.csr_pem)
        return keys_pb2.RenewResponse(certificate_pem=grant.certificate_pem, ca_pem=grant.ca_pem)

    @unary_errors
    def CreateToken(
        self, request: keys_pb2.CreateTokenRequest, context: grpc.ServicerContext
    ) -> keys_pb2.CreateTokenResponse:
        token, expires = self.authority.create_token(
            request.identity,
            request.role,
            _caller(context),
            ttl_s=request.ttl_s,
            dns_names=tuple(request.dns_names),
            ip_addresses=tuple(request.ip_addresses),
        )
        return keys_pb2.CreateTokenResponse(token=token, expires_at=int(expires))

    @unary_errors
    def Revoke(
        self, request: keys_pb2.RevokeRequest, context: grpc.ServicerContext
    ) -> keys_pb2.RevokeResponse:
        count = self.authority.revoke(
            _caller(context),
            identity=request.identity,
            serial=request.serial,
            reason=request.reason,
        )
        if self.on_revoke is not None:
            self.on_revoke()
        return keys_pb2.RevokeResponse(revoked=count)

    @unary_errors
    def ListCertificates(
        self, request: keys_pb2.ListCertificatesRequest, context: grpc.ServicerContext
    ) -> keys_pb2.ListCertificatesResponse:
        rows = self.authority.store.certificates(request.identity)
        return keys_pb2.ListCertificatesResponse(certificates=[_record(r) for r in rows])

    @unary_errors
    def GetRevocations(
        self, request: keys_pb2.GetRevocationsRequest, context: grpc.ServicerContext
    ) -> keys_pb2.GetRevocationsResponse:
        version, rows = self.authority.store.revocations()
        if _caller(context).role == "admin":
            records = [_record(r) for r in rows]
        else:
            # Need to know: which certificates to refuse, not whose they were or why.
            records = [keys_pb2.CertificateRecord(serial=r.serial) for r in rows]
        return keys_pb2.GetRevocationsResponse(version=version, revoked=records)

    @unary_errors
    def RegisterSession(
        self, request: keys_pb2.RegisterSessionRequest, context: grpc.ServicerContext
    ) -> keys_pb2.RegisterSessionResponse:
        key = self.authority.register_session(_caller(context), request.session_id, request.owner)
        return keys_pb2.RegisterSessionResponse(key=key.to_proto())

    @unary_errors
    def GetSessionKey(
        self, request: keys_pb2.GetSessionKeyRequest, context: grpc.ServicerContext
    ) -> keys_pb2.GetSessionKeyResponse:
        key = self.authority.session_key(_caller(context), request.session_id, request.key_id)
        return keys_pb2.GetSessionKeyResponse(key=key.to_proto())

    @unary_errors
    def RotateSessionKey(
        self, request: keys_pb2.RotateSessionKeyRequest, context: grpc.ServicerContext
    ) -> keys_pb2.RotateSessionKeyResponse:
        key = self.authority.rotate(_caller(context), request.session_id)
        return keys_pb2.RotateSessionKeyResponse(key=key.to_proto())

    @unary_errors
    def EndSession(
        self, request: keys_pb2.EndSessionRequest, context: grpc.ServicerContext
    ) -> keys_pb2.EndSessionResponse:
        if not request.session_id:
            raise InvalidArgumentError("session_id is required")
        self.authority.end_session(_caller(context), request.session_id)
        return keys_pb2.EndSessionResponse()


def binding(authority: KeyAuthority, on_revoke: Callable[[], None] | None = None) -> ServiceBinding:
    return service_binding(SERVICE, KeyManagerServicer(authority, on_revoke))
