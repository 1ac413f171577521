"""Authorization: which identity may call which method, and revoked certificates.

Every splitfed server runs :class:`AuthorizationInterceptor`. For each call it reads the
verified peer certificate (mutual TLS), maps the SPIFFE URI in it to an identity and
role, refuses revoked certificates, and checks the method against the service's
:data:`Policy` (default deny). Object-level rules (a client touches only its own
sessions, a backbone only the keys of sessions it hosts) live with the objects, in the
handlers, and answer PERMISSION_DENIED as well.

Status codes: no usable identity or a revoked certificate -> UNAUTHENTICATED; a role not
allowed for the method -> PERMISSION_DENIED. (A missing, foreign or expired certificate
never gets this far: the TLS handshake fails and the caller sees UNAVAILABLE.)
Denials are logged and counted in ``splitfed_authorization_denials_total``.

Revocation applies to new calls at once and ends open streams: the interceptor checks
every message of a client stream, and :meth:`RevocationList.update` cancels the streams
of newly revoked certificates (the caller sees UNAUTHENTICATED). A server saves the list
it fetched (:meth:`RevocationList.save`) and loads it before serving after a restart
(:meth:`RevocationList.restore`), so it never serves with an empty list it did not get
from the key manager.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import grpc
from cryptography import x509
from prometheus_client import Counter

from splitfed.errors import UnauthenticatedError
from splitfed.files import StrPath, atomic_write
from splitfed.interceptors import Handler, HandlerInterceptor
from splitfed.security.identity import peer_identity

logger = logging.getLogger(__name__)

# method name -> roles that may call it, for one service.
Policy = Mapping[str, frozenset[str]]

ALL_ROLES = frozenset({"client", "backbone", "aggregator", "keymanager", "admin"})
# Services every authenticated party may use.
OPEN_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"})

DENIALS = Counter(
    "splitfed_authorization_denials",
    "Calls refused by the authorization interceptor, by service, method and reason.",
    ["service", "method", "reason"],
)


@functools.lru_cache(maxsize=1024)
def _serial_of(pem: bytes) -> str:
    return format(x509.load_pem_x509_certificate(pem).serial_number, "x")


def peer_serial(context: grpc.ServicerContext) -> str | None:
    """Serial number (lowercase hex) of the verified peer certificate, if any."""
    auth = cast(Mapping[str, list[bytes]], context.auth_context())
    pems = auth.get("x509_pem_cert")
    if not pems:
        return None
    try:
        return _serial_of(pems[0])
    except ValueError:
        return None


def peer_certificate_pem(context: grpc.ServicerContext) -> bytes | None:
    auth = cast(Mapping[str, list[bytes]], context.auth_context())
    pems = auth.get("x509_pem_cert")
    return pems[0] if pems else None


def _end_call(context: grpc.ServicerContext, message: str) -> None:
    """End a call from outside its handler thread with UNAUTHENTICATED.

    grpc's public API can only cancel a call from outside (the peer then sees CANCELLED);
    its core call object also takes a status, which the peer receives. Fall back to a
    plain cancel where that is not available.
    """
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    try:
        if call is not None:
            call.cancel(grpc.StatusCode.UNAUTHENTICATED.value[0], message)
            return
    except (TypeError, AttributeError, ValueError):
        pass
    context.cancel()


class RevocationList:
    """The revoked certificate serials a server refuses; shared by its interceptors."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._revoked: frozenset[str] = frozenset()
        self.version = 0
        # When the list was fetched from the key manager (None: never).
        self.fetched_at: float | None = None
        # serial -> open streaming calls made with that certificate
        self._open: dict[str, set[grpc.ServicerContext]] = {}

    def is_revoked(self, serial: str | None) -> bool:
        return serial is not None and serial in self._revoked

    def update(
        self, version: int, serials: Iterable[str], *, fetched_at: float | None = None
    ) -> int:
        """Install the key manager's list, fetched at ``fetched_at`` (default: now); end
        open streams of newly revoked certificates. Returns how many streams were ended."""
        revoked = frozenset(serials)
        with self._lock:
            new = revoked - self._revoked
            self._revoked = revoked
            self.fetched_at = time.time() if fetched_at is None else fetched_at
            if version != self.version:
                logger.info(
                    "[RevocationList] version %d: %d revoked certificate(s)", version, len(revoked)
                )
            self.version = version
            victims = [c for s in new for c in self._open.get(s, ())]
        for context in victims:
            logger.warning("[RevocationList] ending an open stream of a revoked certificate")
            _end_call(context, "certificate revoked")
        return len(victims)

    def save(self, path: StrPath) -> None:
        """Write the list (version, serials, fetch time) to ``path``: mode 0600, replaced
        atomically, so a crash leaves the old file or the new one."""
        path = Path(path)
        with self._lock:
            record = {
                "version": self.version,
                "fetched_at": self.fetched_at,
                "serials": sorted(self._revoked),
            }
        with atomic_write(path) as out:
            out.write(json.dumps(record).encode() + b"\n")

    def restore(self, path: StrPath) -> bool:
        """Install the list last saved to ``path``; False (with a warning if the file is
        there but unreadable) when there is none."""
        path = Path(path)
        try:
            record = json.loads(path.read_bytes())
            version, fetched_at, serials = (
                record["version"],
                record["fetched_at"],
                record["serials"],
            )
            if not (
                isinstance(version, int)
                and isinstance(fetched_at, (int, float))
                and isinstance(serials, list)
                and all(isinstance(s, str) for s in serials)
            ):
                raise ValueError("unexpected types")
        except FileNotFoundError:
            return False
        except (OSError, ValueError, TypeError, KeyError) as exc:
            logger.warning("[RevocationList] ignoring the saved list %s: %s", path, exc)
            return False
        self.update(version, serials, fetched_at=float(fetched_at))
        return True

    def track(self, serial: str, context: grpc.ServicerContext) -> Callable[[], None]:
        with self._lock:
            self._open.setdefault(serial, set()).add(context)

        def untrack() -> None:
            with self._lock:
                calls = self._open.get(serial)
                if calls is not None:
                    calls.discard(context)
                    if not calls:
                        del self._open[serial]

        return untrack


class AuthorizationInterceptor(HandlerInterceptor):
    """Refuses calls whose certificate is revoked or whose role the policy does not allow.

    ``policies`` maps a service's full name to its :data:`Policy`; methods of services not
    listed (besides health and reflection) are refused. ``public`` names methods
    (``/package.Service/Method``) that need no identity: the key manager's enrollment
    port, which has no client certificates, serves only those.
    """

    def __init__(
        self,
        policies: Mapping[str, Policy],
        revocations: RevocationList | None = None,
        *,
        public: frozenset[str] = frozenset(),
        authenticated: bool = True,
    ) -> None:
        self.policies = policies
        self.revocations = revocations or RevocationList()
        self.public = public
        self.authenticated = authenticated

    def wrap(self, handler: Handler, method: str) -> Handler:
        service, _, name = method.lstrip("/").rpartition("/")
        return _wrap(handler, functools.partial(self._check, method, service, name), self)

    def _deny(self, service: str, name: str, reason: str, who: object) -> None:
        DENIALS.labels(service=service, method=name, reason=reason).inc()
        logger.warning("[authz] denied %s to %s: %s", f"{service}/{name}", who, reason)

    def _check(
        self, method: str, service: str, name: str, context: grpc.ServicerContext
    ) -> str | None:
        """Abort the call unless allowed; returns the caller's certificate serial."""
        if method in self.public or "*" in self.public:
            return None
        if not self.authenticated:
            self._deny(service, name, "unauthenticated_port", "anonymous")
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{method} needs a client certificate")
        identity = peer_identity(context)
        serial = peer_serial(context)
        if identity is None or serial is None:
            self._deny(service, name, "no_identity", "anonymous")
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "the client certificate carries no splitfed identity",
            )
        assert identity is not None
        if self.revocations.is_revoked(serial):
            self._deny(service, name, "revoked", identity)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "certificate revoked")
        if service in OPEN_SERVICES:
            return serial
        roles = self.policies.get(service, {}).get(name)
        if roles is None or identity.role not in roles:
            self._deny(service, name, "role", identity)
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"role {identity.role!r} may not call {service}/{name}",
            )
        return serial

    def checked_requests(self, requests: Iterator[Any], serial: str | None) -> Iterator[Any]:
        """Requests of a client stream, refused as soon as the certificate is revoked."""
        for request in requests:
            if self.revocations.is_revoked(serial):
                raise UnauthenticatedError("certificate revoked")
            yield request


Check = Callable[[grpc.ServicerContext], str | None]


def _wrap(
    handler: grpc.RpcMethodHandler[Any, Any], check: Check, interceptor: AuthorizationInterceptor
) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler`` with ``check`` run first (and, for client streams, on every message)."""
    revocations = interceptor.revocations

    def streaming(context: grpc.ServicerContext, serial: str | None) -> Callable[[], None]:
        return revocations.track(serial, context) if serial else (lambda: None)

    if handler.unary_unary:
        inner_uu = handler.unary_unary

        def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
            check(context)
            return inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        inner_us = handler.unary_stream

        def unary_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            serial = check(context)
            untrack = streaming(context, serial)
            try:
                yield from inner_us(request, context)
            finally:
                untrack()

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary:
        inner_su = handler.stream_unary

        def stream_unary(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            serial = check(context)
            untrack = streaming(context, serial)
            try:
                return inner_su(interceptor.checked_requests(requests, serial), context)
            finally:
                untrack()

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, handler.request_deserializer, handler.response_serializer
        )
    inner_ss = handler.stream_stream
    assert inner_ss is not None

    def stream_stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        serial = check(context)
        untrack = streaming(context, serial)
        try:
            yield from inner_ss(interceptor.checked_requests(requests, serial), context)
        finally:
            untrack()

    return grpc.stream_stream_rpc_method_handler(
        stream_stream, handler.request_deserializer, handler.response_serializer
    )
