"""What the client raises. Every error carries the gRPC `code` (or None when no call was made)
and a message that names the value, the limit and the fix; a raw `grpc.RpcError` never escapes."""

from __future__ import annotations

import grpc


class PromptcastError(Exception):
    """Base class of every promptcast client error."""

    code: grpc.StatusCode | None = None

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidArgument(PromptcastError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(PromptcastError):
    code = grpc.StatusCode.NOT_FOUND


class ServerUnavailable(PromptcastError):
    code = grpc.StatusCode.UNAVAILABLE


class ServerOverloaded(PromptcastError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(PromptcastError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(PromptcastError):
    code = grpc.StatusCode.UNAUTHENTICATED


class EncodeError(PromptcastError):
    """The server failed to encode (INTERNAL), e.g. it refused NaN/Inf embeddings."""

    code = grpc.StatusCode.INTERNAL


class PayloadError(PromptcastError):
    """The stream's bytes do not match their headers (size, checksum, order)."""

    code = grpc.StatusCode.DATA_LOSS


class IncompatibleModel(PromptcastError):
    """The server's embeddings do not fit the local transformer (found at the handshake)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class OutOfGpuMemory(PromptcastError):
    """The node ran out of GPU memory in a pipeline call; the message names the memory plan and the next to try."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


_BY_CODE = {cls.code: cls for cls in (InvalidArgument, ModelNotFound, ServerUnavailable, ServerOverloaded,
                                      DeadlineExceeded, Unauthenticated, EncodeError)}


def from_rpc_error(error: grpc.RpcError, target: str) -> PromptcastError:
    """Turn a `grpc.RpcError` into the matching `PromptcastError`."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    if code == grpc.StatusCode.UNAVAILABLE:
        details = f"encoder server {target} is unavailable: {details}"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        details = f"encoder server {target} did not answer within the deadline: {details}"
    return _BY_CODE.get(code, PromptcastError)(details, code)
