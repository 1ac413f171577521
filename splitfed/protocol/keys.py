"""The contract of splitfed.v1.KeyManager (protos/splitfed/v1/keys.proto): the service,
its unauthenticated enrollment method, and the session key a grant carries."""

from __future__ import annotations

from dataclasses import dataclass

from splitfed.protocol.messages import from_message, to_message
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
        return to_message(self, keys_pb2.SessionKey)

    @classmethod
    def from_proto(cls, message: keys_pb2.SessionKey) -> SessionKeyGrant:
        return from_message(cls, message)
