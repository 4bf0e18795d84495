"""Server interceptors, and the one way they wrap a handler.

`wrap_handler(handler, scope)` rebuilds a handler of the same kind whose call runs inside `scope(request, context)`,
an async context manager. What the scope yields may have a `sent(message)` method, called for every message a
streaming handler sends (yields, or writes with `context.write`). Error mapping, call counting, metrics and the token
check are each such a scope.

A scope ends when the handler does, whatever way it ends: a handler that writes is awaited to its end, and a
generator handler's inner generator is closed with it (`aclosing`), not left for the garbage collector.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
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
        async with scope(request, context) as call:
            sent = getattr(call, "sent", None)
            if sent is not None and kind.endswith("_stream"):
                context = _CountingContext(context, sent)
            return await inner(request, context)

    async def stream(request, context):
        async with scope(request, context) as call:
            sent = getattr(call, "sent", None)
            async with contextlib.aclosing(inner(request, context)) as messages:
                async for message in messages:
                    if sent is not None:
                        sent(message)
                    yield message

    # A streaming handler that writes (a coroutine function) stays one: gRPC then awaits it instead of iterating it.
    generator = kind.endswith("_stream") and inspect.isasyncgenfunction(inner)
    factory = getattr(grpc, f"{kind}_rpc_method_handler")
    return factory(stream if generator else respond, handler.request_deserializer, handler.response_serializer)


class _CountingContext:
    """A servicer context whose `write` also reports each message sent (to a scope's `sent`)."""

    def __init__(self, context, sent):
        self._context, self._sent = context, sent

    def __getattr__(self, name):
        return getattr(self._context, name)

    async def write(self, message) -> None:
        await self._context.write(message)
        self._sent(message)


async def abort(context: aio.ServicerContext, code: grpc.StatusCode, details: str):
    """End the call with this status (raises `AbortError`). A call that has already ended on the client's side (its
    deadline passed, it was cancelled, its connection cut) cannot take a status any more: it ends as cancelled."""
    try:
        await context.abort(code, details)
    except aio.AbortError:
        raise
    except aio.BaseError as e:  # gRPC's core refused to send the status: there is no call left to send it to
        raise asyncio.CancelledError(f"the call ended before its status {code.name} could be sent "
                                     f"({type(e).__name__})") from None


async def _abort(context: aio.ServicerContext, error: Exception, method: str):
    if isinstance(error, EncoderServerError):
        await abort(context, error.code, str(error))
    logger.exception("unexpected error in %s", method, exc_info=error)
    await abort(context, grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(error).__name__}: {error}")


class ClientGoneFilter(logging.Filter):
    """gRPC logs an error with a traceback when it cannot send a promptcast call's final status (the handler has
    returned) because the client has already gone: it cancelled, or its connection was cut, just after the last
    message. That is the client's doing, not a fault of the server: such a record becomes one INFO line saying so.
    Every other record passes unchanged (a failed write is the handler's to handle, and stays an error if it is not)."""

    PREFIX = "ExecuteBatchError raised in core by servicer method [" + PROMPTCAST_METHODS

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if (isinstance(record.msg, str) and record.msg.startswith(self.PREFIX) and error is not None
                and "SendStatusFromServerOperation" in str(error) and "SendMessageOperation" not in str(error)):
            method = record.msg[len("ExecuteBatchError raised in core by servicer method ["):].rstrip("]")
            record.msg, record.args = "%s: the client went away before the call's status could be sent", (method,)
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info = record.exc_text = None
        return True

    @classmethod
    def install(cls) -> None:
        grpc_logger = logging.getLogger("grpc._cython.cygrpc")
        if not any(isinstance(f, cls) for f in grpc_logger.filters):
            grpc_logger.addFilter(cls())


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
    """Counts the promptcast calls being handled, and holds the task of each: what a graceful drain waits for."""

    def __init__(self):
        self.active = 0
        self.tasks: set[asyncio.Task] = set()  # gRPC's task of each call in flight; done once its status is sent

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(PROMPTCAST_METHODS):
            return handler
        return wrap_handler(handler, self._counted)

    @contextlib.asynccontextmanager
    async def _counted(self, request, context):
        task = asyncio.current_task()
        if task is not None and task not in self.tasks:
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        self.active += 1
        try:
            yield None
        finally:
            self.active -= 1
