"""The one place where exceptions become gRPC status codes, and where the bearer token is checked.

Handlers raise plain Python exceptions (rewards/core.py); `StatusInterceptor` wraps every method and
turns them into statuses, so no servicer code knows about status codes:

    MalformedRequest -> INVALID_ARGUMENT   QueueFull        -> RESOURCE_EXHAUSTED
    Unauthenticated  -> UNAUTHENTICATED    ShuttingDown     -> UNAVAILABLE
    DeadlineExpired  -> DEADLINE_EXCEEDED  anything else    -> INTERNAL (logged with its traceback)

With a token configured, every call must carry `authorization: Bearer <token>` metadata, compared in
constant time (hmac.compare_digest). Health checks stay open, so load balancers and probes need no secret;
they reveal only SERVING or not.
"""

from __future__ import annotations

import hmac
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from rewards.core import DeadlineExpired, MalformedRequest, QueueFull, ShuttingDown

log = logging.getLogger(__name__)


class Unauthenticated(PermissionError):
    """The call carries no bearer token, or the wrong one."""


_CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (MalformedRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ShuttingDown, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExpired, grpc.StatusCode.DEADLINE_EXCEEDED),
]
_OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Maps handler exceptions to statuses and, when `token` is set, requires it on every call."""

    def __init__(self, token: bytes | None = None) -> None:
        self._expected = b"Bearer " + token if token else None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_OPEN_PREFIXES):
            return handler
        denied = self._check(details.invocation_metadata)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, denied),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream(handler.stream_stream, denied),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, denied),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return grpc.stream_unary_rpc_method_handler(
            _wrap_unary(handler.stream_unary, denied),
            handler.request_deserializer,
            handler.response_serializer,
        )

    def _check(self, metadata: Any) -> Unauthenticated | None:
        if self._expected is None:
            return None
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        if not values:
            return Unauthenticated("missing bearer token: send metadata 'authorization: Bearer <token>'")
        got = values[0].encode() if isinstance(values[0], str) else bytes(values[0])
        if not hmac.compare_digest(got, self._expected):
            return Unauthenticated("invalid bearer token")
        return None


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    if isinstance(exc, grpc.aio.AbortError):  # the handler aborted itself with a status already
        raise exc
    for kind, code in _CODES:
        if isinstance(exc, kind):
            await context.abort(code, str(exc))
    log.error("unhandled error in a reward service call", exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")


def _wrap_unary(inner: Callable[..., Any], denied: Unauthenticated | None) -> Callable[..., Any]:
    async def behaviour(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if denied is not None:
                raise denied
            return await inner(request, context)
        except Exception as exc:
            await _abort(context, exc)

    return behaviour


def _wrap_stream(inner: Callable[..., Any], denied: Unauthenticated | None) -> Callable[..., Any]:
    async def behaviour(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            if denied is not None:
                raise denied
            result = inner(request, context)
            if inspect.isasyncgen(result):
                async for response in result:
                    yield response
            else:  # a handler that writes with context.write() and returns
                await result
        except Exception as exc:
            await _abort(context, exc)

    return behaviour
