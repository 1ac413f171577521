"""The contract of splitfed.v1.KeyManager (protos/splitfed/v1/keys.proto): the service,
its unauthenticated enrollment method, and the session key a grant carries."""

from __future__ import annotations

from dataclasses import dataclass

from splitfed.v1 import keys_pb2

SERVICE = keys_pb2.DESCRIPTOR.services_by_name["KeyManager"]
SERVICE_NAME = SERVICE.full_name
# The one call a party without a certificate makes (with a one-time token).
ENROLL_METHOD = f"/{SERVICE_NAME}/Enroll"


@dataclass(frozen=True, repr=False)
class SessionKeyGrant:
    """One data key of an encrypted session (RegisterSession, GetSessionKey,
    RotateSessionKey)."""

    session_id: str
    key_id: int
    secret: bytes
    nonce_prefix: bytes

    def __repr__(self) -> str:  # never print key material
        return f"SessionKeyGrant({self.session_id!r}, key_id={self.key_id})"

    def to_proto(self) -> keys_pb2.SessionKey:
        return keys_pb2.SessionKey(
            session_id=self.session_id,
            key_id=self.key_id,
            secret=self.secret,
            nonce_prefix=self.nonce_prefix,
        )

    @classmethod
    def from_proto(cls, message: keys_pb2.SessionKey) -> SessionKeyGrant:
        return cls(message.session_id, message.key_id, message.secret, message.nonce_prefix)
