"""Who is calling: the identity and role in the peer's certificate."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import grpc

from splitfed.security.ca import ROLES


@dataclass(frozen=True)
class Identity:
    name: str
    role: str
    trust_domain: str

    def __str__(self) -> str:
        return f"{self.role}/{self.name}"


def identity_from_uri(uri: str) -> Identity | None:
    """Parse ``spiffe://<trust domain>/<role>/<identity>``; ``None`` if it is not one."""
    parts = urlsplit(uri)
    if parts.scheme != "spiffe" or not parts.netloc:
        return None
    segments = parts.path.strip("/").split("/")
    if len(segments) != 2 or segments[0] not in ROLES or not segments[1]:
        return None
    return Identity(name=segments[1], role=segments[0], trust_domain=parts.netloc)


def peer_identity(context: grpc.ServicerContext) -> Identity | None:
    """The identity in the verified client certificate of this call, if there is one."""
    # grpc returns a list of values per key (the typeshed stub says bytes).
    auth = cast(Mapping[str, Sequence[bytes]], context.auth_context())
    for value in auth.get("x509_subject_alternative_name", ()):
        identity = identity_from_uri(value.decode(errors="replace"))
        if identity is not None:
            return identity
    return None
