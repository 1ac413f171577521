"""Errors that handlers raise, and the one place that maps them to gRPC status codes.

Plain functions (codec, handlers, state) raise these Python exceptions and know nothing of
gRPC. Servicers wrap their methods with :func:`unary_errors` or :func:`stream_errors`,
which turn an exception into ``context.abort(code, message)``: a known error keeps its
message, a call to another service that failed because that service is down or slow
becomes UNAVAILABLE (the caller retries), anything else becomes INTERNAL with a generic
message and a logged traceback (a client never sees server internals).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import NoReturn, TypeVar

import grpc

logger = logging.getLogger(__name__)


class SplitfedError(Exception):
    """Base of all errors that carry a message meant for the caller."""


class InvalidArgumentError(SplitfedError, ValueError):
    """The request itself is wrong (malformed frame, bad field value)."""


class LimitExceededError(SplitfedError):
    """The request asks for more than a configured limit allows."""


class DataLossError(SplitfedError):
    """Data arrived corrupted or incomplete (checksum mismatch, stream ended early)."""


class NotFoundError(SplitfedError, LookupError):
    """The named object does not exist."""


class FailedPreconditionError(SplitfedError):
    """The system is not in a state where the request can run."""


class PermissionDeniedError(SplitfedError):
    """The caller is authenticated but may not do this."""


class UnauthenticatedError(SplitfedError):
    """The caller could not be identified."""


class AbortedError(SplitfedError):
    """The operation was abandoned for a reason outside the request (e.g. a session
    merged with it went away); redoing it from its start may succeed."""


# Most specific classes first is not needed: lookup walks the exception's MRO.
_STATUS_BY_ERROR: dict[type[BaseException], grpc.StatusCode] = {
    InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    LimitExceededError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DataLossError: grpc.StatusCode.DATA_LOSS,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    AbortedError: grpc.StatusCode.ABORTED,
}

_ERROR_BY_STATUS: dict[grpc.StatusCode, type[SplitfedError]] = {
    code: cls for cls, code in _STATUS_BY_ERROR.items() if issubclass(cls, SplitfedError)
}


# A call this service made to another one (e.g. the backbone fetching a session key from
# the key manager) that failed because that service is down or slow: the caller may retry.
_DEPENDENCY_DOWN = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and caller-facing message for an exception."""
    for cls in type(exc).__mro__:
        code = _STATUS_BY_ERROR.get(cls)
        if code is not None:
            return code, str(exc)
    if isinstance(exc, grpc.RpcError) and rpc_status(exc)[0] in _DEPENDENCY_DOWN:
        return (
            grpc.StatusCode.UNAVAILABLE,
            "a service this call depends on is unavailable (restarting?); retry",
        )
    return grpc.StatusCode.INTERNAL, "internal error; see the server log"


def rpc_status(err: grpc.RpcError) -> tuple[grpc.StatusCode | None, str]:
    """Status code and details of a failed call (``None`` if it carries no status)."""
    code = getattr(err, "code", None)
    details = getattr(err, "details", None)
    return (
        code() if callable(code) else None,
        (details() or "") if callable(details) else str(err),
    )


def error_from_rpc(err: grpc.RpcError) -> SplitfedError | None:
    """The Python error a failed call stands for, where its status maps to one."""
    code, details = rpc_status(err)
    cls = _ERROR_BY_STATUS.get(code) if code is not None else None
    return None if cls is None else cls(details)


def abort_with(context: grpc.ServicerContext, exc: BaseException, where: str) -> NoReturn:
    code, message = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        logger.error("[%s] unexpected error", where, exc_info=exc)
    elif isinstance(exc, grpc.RpcError):
        logger.warning("[%s] a call to another service failed: %s", where, rpc_status(exc)[1])
    else:
        logger.info("[%s] %s: %s", where, code.name, message)
    context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


Req = TypeVar("Req")
Resp = TypeVar("Resp")
Self = TypeVar("Self")


def unary_errors(
    method: Callable[[Self, Req, grpc.ServicerContext], Resp],
) -> Callable[[Self, Req, grpc.ServicerContext], Resp]:
    """Map exceptions of a unary-response servicer method to gRPC statuses."""
    where = method.__qualname__

    @functools.wraps(method)
    def wrapper(self: Self, request: Req, context: grpc.ServicerContext) -> Resp:
        try:
            return method(self, request, context)
        except Exception as exc:
            if isinstance(exc, grpc.RpcError) and not context.is_active():
                raise  # this call itself ended (cancelled, deadline): gRPC already knows
            abort_with(context, exc, where)

    return wrapper


def stream_errors(
    method: Callable[[Self, Req, grpc.ServicerContext], Iterator[Resp]],
) -> Callable[[Self, Req, grpc.ServicerContext], Iterator[Resp]]:
    """Map exceptions of a streaming-response servicer method to gRPC statuses."""
    where = method.__qualname__

    @functools.wraps(method)
    def wrapper(self: Self, request: Req, context: grpc.ServicerContext) -> Iterator[Resp]:
        try:
            yield from method(self, request, context)
        except Exception as exc:
            if isinstance(exc, grpc.RpcError) and not context.is_active():
                logger.info("[%s] call ended by the peer or its deadline", where)
                raise  # this call itself ended (cancelled, deadline): gRPC already knows
            abort_with(context, exc, where)

    return wrapper
