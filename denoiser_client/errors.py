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


def unavailable_hint(detail: str, tls: bool) -> str:
    """What to check when no server answered, from the last error's details."""
    lowered = detail.lower()
    if any(s in lowered for s in ("ssl", "tls", "handshake", "certificate")):
        return ("the TLS handshake failed: pass --tls-ca with the CA that signed the server's certificate "
                "(and --tls-cert/--tls-key if it requires client certificates)")
    if "unhealthy" in lowered:  # client-side health checks: the server answers NOT_SERVING
        return ("the server is up but not serving: still loading its models, draining, or its device is stuck "
                "(--gpu-timeout); retry shortly or add replicas")
    if tls:  # a server requiring client certificates just closes the socket on a client without one
        return ("is `promptcast serve` running there, and if it requires client certificates (mTLS), did you "
                "pass --tls-cert/--tls-key signed by its --tls-client-ca?")
    return "is `promptcast serve` running there (and, if it serves TLS, did you pass --tls-ca)?"
