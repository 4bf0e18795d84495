"""Server interceptors, and the one way they wrap a handler.

`wrap_handler(handler, scope)` rebuilds a handler of the same kind whose call runs inside `scope(request, context)`,
an async context manager. What the scope yields may have a `sent(message)` method, called for every message a
streaming handler yields. Error mapping, call counting, metrics and the token check are each such a scope.
"""

from __future__ import annotations

import contextlib
import logging

import grpc
from grpc import aio

from encoder_server.errors import EncoderServerError

logger = logging.getLogger(__name__)

PROMPTCAST_METHODS = "/promptcast."


def wrap_handler(handler: grpc.RpcMethodHandler, scope) -> grpc.RpcMethodHandler:
    """`handler`, with every call run inside `scope(request, context)` (see the module docstring)."""
    kind = next(k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
                if getattr(handler, k) is not None)
    inner = getattr(handler, kind)

    async def respond(request, context):
        async with scope(request, context):
            return await inner(request, context)

    async def stream(request, context):
        async with scope(request, context) as call:
            sent = getattr(call, "sent", None)
            async for message in inner(request, context):
                if sent is not None:
                    sent(message)
                yield message

    factory = getattr(grpc, f"{kind}_rpc_method_handler")
    return factory(stream if kind.endswith("_stream") else respond, handler.request_deserializer,
                   handler.response_serializer)


async def _abort(context: aio.ServicerContext, error: Exception, method: str):
    if isinstance(error, EncoderServerError):
        await context.abort(error.code, str(error))
    logger.exception("unexpected error in %s", method, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(error).__name__}: {error}")


class ErrorMappingInterceptor(aio.ServerInterceptor):
    """`InvalidInput` -> INVALID_ARGUMENT, `NotFound` -> NOT_FOUND, ..., anything else -> INTERNAL (logged)."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(PROMPTCAST_METHODS):
            return handler  # health and reflection handle their own errors

        @contextlib.asynccontextmanager
        async def mapped(request, context):
            try:
                yield None
            except aio.AbortError:
                raise
            except Exception as e:  # noqa: BLE001 - every error gets a status, the unexpected ones a log line
                await _abort(context, e, method)

        return wrap_handler(handler, mapped)


class CallCounter(aio.ServerInterceptor):
    """Counts the promptcast calls being handled: what a graceful drain waits for."""

    def __init__(self):
        self.active = 0

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(PROMPTCAST_METHODS):
            return handler
        return wrap_handler(handler, self._counted)

    @contextlib.asynccontextmanager
    async def _counted(self, request, context):
        self.active += 1
        try:
            yield None
        finally:
            self.active -= 1
