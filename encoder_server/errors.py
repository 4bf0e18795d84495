"""Domain errors. Handlers raise these; `ErrorMappingInterceptor` turns them into gRPC statuses."""

import grpc


class EncoderServerError(Exception):
    code = grpc.StatusCode.INTERNAL


class InvalidInput(EncoderServerError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(EncoderServerError):
    code = grpc.StatusCode.NOT_FOUND


class Overloaded(EncoderServerError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class ModelNotReady(EncoderServerError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExpired(EncoderServerError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class EncodeFailed(EncoderServerError):
    """The encoder produced something that must not be sent (NaN/Inf)."""
    code = grpc.StatusCode.INTERNAL


class SourceError(EncoderServerError):
    """A `--model` source that cannot be loaded (missing folder, unknown family, hub unreachable)."""
    code = grpc.StatusCode.FAILED_PRECONDITION
