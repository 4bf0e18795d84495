"""Domain errors. Handlers raise these; the server's `CallScope` turns them into gRPC statuses and the HTTP gateway
into HTTP statuses: each class carries both, so the two transports answer every fault alike."""

import grpc


class EncoderServerError(Exception):
    code = grpc.StatusCode.INTERNAL
    http_status = 500


class InvalidInput(EncoderServerError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400


class RequestTooLarge(InvalidInput):
    """More prompts, longer prompts or a bigger body than the server's limits allow (HTTP 413)."""
    http_status = 413


class Unauthenticated(EncoderServerError):
    code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401


class NotFound(EncoderServerError):
    code = grpc.StatusCode.NOT_FOUND
    http_status = 404


class Overloaded(EncoderServerError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429


class ModelNotReady(EncoderServerError):
    code = grpc.StatusCode.UNAVAILABLE
    http_status = 503


class DeadlineExpired(EncoderServerError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504


class EncodeFailed(EncoderServerError):
    """The encoder produced something that must not be sent (NaN/Inf)."""
    code = grpc.StatusCode.INTERNAL
    http_status = 500


class SourceError(EncoderServerError):
    """A `--model` source that cannot be loaded (missing folder, unknown family, hub unreachable)."""
    code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 500
