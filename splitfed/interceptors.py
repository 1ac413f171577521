"""The server interceptors' common part: look up the method's handler, wrap it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

import grpc

# The stubs make RpcMethodHandler generic; at run time it is a plain class.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class HandlerInterceptor(grpc.ServerInterceptor):
    """A server interceptor that wraps the handler of every method the server has
    (:meth:`wrap`); calls to unknown methods pass through untouched."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        return self.wrap(handler, handler_call_details.method)

    def wrap(self, handler: Handler, method: str) -> Handler:
        """``handler`` of ``method`` (``/package.Service/Method``) as this interceptor
        serves it."""
        raise NotImplementedError
