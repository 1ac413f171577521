"""Session data keys on the backbone: registration with the key manager, and the
:class:`~splitfed.security.session_crypto.SessionCrypto` of each encrypted session."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

from splitfed.errors import FailedPreconditionError
from splitfed.logs import short_id
from splitfed.security.sealing import TO_CLIENT, DataKey
from splitfed.security.session_crypto import SessionCrypto

logger = logging.getLogger(__name__)


class KeyGrant(Protocol):
    @property
    def key_id(self) -> int: ...
    @property
    def secret(self) -> bytes: ...
    @property
    def nonce_prefix(self) -> bytes: ...


class KeySource(Protocol):
    """What the backbone needs of the key manager (``clients.keys.KeyManagerClient``)."""

    def register_session(self, session_id: str, owner: str) -> KeyGrant: ...
    def session_key(self, session_id: str, key_id: int = 0) -> KeyGrant: ...
    def end_session(self, session_id: str) -> None: ...


def data_key(grant: KeyGrant) -> DataKey:
    return DataKey(grant.key_id, grant.secret, grant.nonce_prefix)


class BackboneKeys:
    """The encrypted sessions' key state; ``source=None``: encryption unavailable."""

    def __init__(self, source: KeySource | None) -> None:
        self.source = source
        self._lock = threading.Lock()
        self._sessions: dict[str, SessionCrypto] = {}

    @property
    def available(self) -> bool:
        return self.source is not None

    def _require(self) -> KeySource:
        if self.source is None:
            raise FailedPreconditionError(
                "this backbone has no key manager ([security] keymanager), so it cannot "
                "encrypt activations; open the session without encryption or ask the operator"
            )
        return self.source

    def register(self, session_id: str, owner: str) -> SessionCrypto:
        """Register a new encrypted session with the key manager; its key 1 comes back."""
        source = self._require()
        key = data_key(source.register_session(session_id, owner))
        crypto = SessionCrypto(session_id, TO_CLIENT, self._fetcher(session_id), key)
        with self._lock:
            self._sessions[session_id] = crypto
        return crypto

    def _fetcher(self, session_id: str) -> Callable[[int], DataKey]:
        source = self._require()
        return lambda key_id: data_key(source.session_key(session_id, key_id))

    def for_session(self, session_id: str) -> SessionCrypto:
        """The session's crypto state; after a restart its keys come from the key manager."""
        with self._lock:
            crypto = self._sessions.get(session_id)
            if crypto is None:
                self._require()
                crypto = SessionCrypto(session_id, TO_CLIENT, self._fetcher(session_id))
                self._sessions[session_id] = crypto
            return crypto

    def end(self, session_id: str) -> None:
        """Forget a closed or expired session; the key manager destroys its keys."""
        with self._lock:
            self._sessions.pop(session_id, None)
        if self.source is None:
            return
        try:
            self.source.end_session(session_id)
        except Exception as exc:  # best effort: the key manager may be down right now
            logger.warning(
                "[BackboneKeys] could not end the keys of %s: %s", short_id(session_id), exc
            )
