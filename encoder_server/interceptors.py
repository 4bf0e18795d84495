"""The server's one interceptor, `CallScope`: what every promptcast call gets, around its handler.

A call is counted and its task held (what a graceful drain waits for), timed, counted and logged
(`ServerMetrics.call`; refused calls too), its bearer token checked when the server has a token file, and any error
its handler raises turned into a status (`InvalidInput` -> INVALID_ARGUMENT, ..., anything else INTERNAL, logged).
Health and reflection pass through untouched: they handle their own errors, and probes send no token.

gRPC asks a server's interceptors for a handler on every call. `CallScope` wraps each method's handler once and
hands out the same wrapper after that, and does all of the above in it with plain calls: one handler layer, not
one per concern. On a same-host memory hit, a chain of one interceptor per concern (each rebuilding the handler,
each an async context manager) cost a third of the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging

import grpc
from grpc import aio

from encoder_server.errors import EncoderServerError
from encoder_server.metrics import request_id

logger = logging.getLogger(__name__)

PROMPTCAST_METHODS = "/promptcast."
_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


class CallScope(aio.ServerInterceptor):
    """Counting, metrics and the log line, the token check (`auth`, a `TokenAuth`) and error mapping for every
    promptcast call; `active` and `tasks` are the calls being handled now."""

    def __init__(self, metrics, auth=None):
        self.metrics, self.auth = metrics, auth
        self.active = 0
        self.tasks: set[asyncio.Task] = set()  # gRPC's task of each call in flight; done once its status is sent
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(PROMPTCAST_METHODS):
            return handler
        known = self._wrapped.get(method)
        if known is None or known[0] is not handler:  # a handler registered anew: wrapped anew
            known = self._wrapped[method] = (handler, self._wrap(handler, method))
        return known[1]

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        kind = next(k for k in _KINDS if getattr(handler, k) is not None)
        inner, streams = getattr(handler, kind), kind.endswith("_stream")
        name = method.rsplit("/", 1)[-1]

        async def respond(request, context):
            self.active += 1
            try:
                with self._recorded(name, request, context) as call:
                    try:
                        if self.auth is not None and (reason := self._refusal(method, context)):
                            await abort(context, grpc.StatusCode.UNAUTHENTICATED, reason)  # the handler never runs
                        return await inner(request, _CountingContext(context, call.sent) if streams else context)
                    except aio.AbortError:
                        raise
                    except Exception as e:  # noqa: BLE001 - every error gets a status, the unexpected ones logged
                        await _abort(context, e, method)
            finally:
                self.active -= 1

        async def stream(request, context):  # a handler that yields its messages
            self.active += 1
            try:
                with self._recorded(name, request, context) as call:
                    try:
                        if self.auth is not None and (reason := self._refusal(method, context)):
                            await abort(context, grpc.StatusCode.UNAUTHENTICATED, reason)
                        # closed with the call, not whenever the garbage collector gets to it
                        async with contextlib.aclosing(inner(request, context)) as messages:
                            async for message in messages:
                                call.sent(message)
                                yield message
                    except aio.AbortError:
                        raise
                    except Exception as e:  # noqa: BLE001
                        await _abort(context, e, method)
            finally:
                self.active -= 1

        # A streaming handler that writes (a coroutine function) stays one: gRPC then awaits it instead of iterating it.
        generator = streams and inspect.isasyncgenfunction(inner)
        factory = getattr(grpc, f"{kind}_rpc_method_handler")
        return factory(stream if generator else respond, handler.request_deserializer, handler.response_serializer)

    def _recorded(self, name: str, request, context):
        task = asyncio.current_task()
        if task is not None and task not in self.tasks:
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        rid = request_id(context.invocation_metadata())
        context.set_trailing_metadata((("x-request-id", rid),))
        return self.metrics.call(name, rid, getattr(request, "model", ""), len(getattr(request, "prompts", ())),
                                 context.peer(), code=lambda: _code_name(context))

    def _refusal(self, method: str, context) -> str | None:
        presented = [value for key, value in context.invocation_metadata() or () if key == "authorization"]
        reason = self.auth.refusal(presented[0] if presented else None)
        if reason is not None:
            logger.warning("refused %s: %s", method, reason)
        return reason


class _CountingContext:
    """A servicer context whose `write` also reports each message sent (to the call's record)."""

    def __init__(self, context, sent):
        self._context, self._sent = context, sent

    def __getattr__(self, name):
        return getattr(self._context, name)

    async def write(self, message) -> None:
        await self._context.write(message)
        self._sent(message)


def _code_name(context) -> str | None:
    """The code a call's abort set, if any."""
    code = context.code()
    if code is None:
        return None
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


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
