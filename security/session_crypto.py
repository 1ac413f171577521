"""One party's activation-encryption state for one session (see :mod:`.sealing`).

A :class:`SessionCrypto` caches the session's data keys (fetched from the key manager
by id), owns the party's :class:`~splitfed.security.sealing.Sealer` for its outgoing
direction, and makes an :class:`~splitfed.security.sealing.Opener` for each incoming
stream; all of them share the session's
:class:`~splitfed.security.sealing.ReplayWindow`, so a chunk opened on one stream is
refused on every other stream of the session. Rotation is driven by the client: it asks
the key manager for the next key and :meth:`rotate_to` it between steps; the backbone
:meth:`follow`\\ s, answering under the newest key the client used, and both drop keys
older than the one in use.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from splitfed.security.sealing import (
    TO_BACKBONE,
    TO_CLIENT,
    DataKey,
    FrameContext,
    Opener,
    ReplayWindow,
    Sealer,
)
from splitfed.wire import ChunkView, IncomingFrame, OutgoingFrame


class SessionCrypto:
    def __init__(
        self,
        session_id: str,
        outgoing: str,
        fetch: Callable[[int], DataKey],
        initial: DataKey | None = None,
    ) -> None:
        if outgoing not in (TO_BACKBONE, TO_CLIENT):
            raise ValueError(f"outgoing must be {TO_BACKBONE!r} or {TO_CLIENT!r}")
        self.session_id = session_id
        self.outgoing = outgoing
        self.incoming = TO_CLIENT if outgoing == TO_BACKBONE else TO_BACKBONE
        self._fetch = fetch
        self._lock = threading.Lock()
        self._keys: dict[int, DataKey] = {}
        self._sealer: Sealer | None = None
        # Counters opened on any incoming stream of the session (replays across streams).
        self.replay = ReplayWindow()
        if initial is not None:
            self._keys[initial.key_id] = initial
            self._sealer = Sealer(session_id, outgoing, initial)

    @property
    def key_id(self) -> int:
        """The key the next outgoing chunk is sealed under (fetching the current one)."""
        return self._sealer_now().key_id

    @property
    def cached_key_ids(self) -> list[int]:
        with self._lock:
            return sorted(self._keys)

    def key(self, key_id: int) -> DataKey:
        """Key ``key_id`` (0: the current one), from the cache or the key manager."""
        with self._lock:
            cached = self._keys.get(key_id)
        if cached is not None:
            return cached
        key = self._fetch(key_id)
        with self._lock:
            return self._keys.setdefault(key.key_id, key)

    def _sealer_now(self) -> Sealer:
        if self._sealer is None:
            key = self.key(0)
            with self._lock:
                if self._sealer is None:
                    self._sealer = Sealer(self.session_id, self.outgoing, key)
        return self._sealer

    def seal(
        self, frames: Iterable[OutgoingFrame], context: FrameContext
    ) -> Iterator[OutgoingFrame]:
        return self._sealer_now().seal_frames(frames, context)

    def opener(self) -> Opener:
        """An opener for one incoming stream (replay state shared with the others)."""
        return Opener(self.session_id, self.incoming, self.key, shared=self.replay)

    def open(self, opener: Opener, frame: IncomingFrame[Any]) -> ChunkView:
        return opener.open_frame(frame, FrameContext.from_message(frame.message))

    def rotate_to(self, key: DataKey) -> None:
        """Seal under ``key`` from now on (the client, after the key manager rotated)."""
        with self._lock:
            self._keys[key.key_id] = key
        sealer = self._sealer_now()
        if key.key_id > sealer.key_id:
            sealer.rotate(key)

    def follow(self, opener: Opener) -> None:
        """Answer under the newest key the peer used, and forget keys older than it:
        the peer switches keys between steps, so no frame in flight needs them."""
        newest = opener.newest_key_id
        if newest is None:
            return
        sealer = self._sealer_now()
        if newest > sealer.key_id:
            sealer.rotate(self.key(newest))
        if newest >= sealer.key_id:
            opener.retire_before(newest)
            # Frames of other streams sealed just before the rotation may still be in
            # flight under the previous key: the session keeps accepting it (once each).
            self.replay.retire_before(newest - 1)
            with self._lock:
                for key_id in [k for k in self._keys if k < newest]:
                    del self._keys[key_id]
