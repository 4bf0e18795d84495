"""One place that maps domain errors to gRPC status codes (and logs the unexpected ones)."""

from __future__ import annotations

import logging

import grpc
from grpc import aio

from encoder_server.errors import EncoderServerError

logger = logging.getLogger(__name__)


async def _abort(context: aio.ServicerContext, error: Exception, method: str):
    if isinstance(error, EncoderServerError):
        await context.abort(error.code, str(error))
    logger.exception("unexpected error in %s", method, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(error).__name__}: {error}")


class ErrorMappingInterceptor(aio.ServerInterceptor):
    """`InvalidInput` -> INVALID_ARGUMENT, `NotFound` -> NOT_FOUND, ..., anything else -> INTERNAL."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith("/promptcast."):
            return handler  # health and reflection handle their own errors
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                try:
                    return await inner(request, context)
                except aio.AbortError:
                    raise
                except Exception as e:  # noqa: BLE001
                    await _abort(context, e, method)

            return grpc.unary_unary_rpc_method_handler(unary_unary, handler.request_deserializer,
                                                       handler.response_serializer)
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def unary_stream(request, context):
                try:
                    async for message in inner_stream(request, context):
                        yield message
                except aio.AbortError:
                    raise
                except Exception as e:  # noqa: BLE001
                    await _abort(context, e, method)

            return grpc.unary_stream_rpc_method_handler(unary_stream, handler.request_deserializer,
                                                        handler.response_serializer)
        return handler
