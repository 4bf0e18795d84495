from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Collate(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COLLATE_STACK: _ClassVar[Collate]
    COLLATE_PAD: _ClassVar[Collate]
    COLLATE_LIST: _ClassVar[Collate]

class CacheStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CACHE_STATUS_UNSPECIFIED: _ClassVar[CacheStatus]
    CACHE_STATUS_MISS: _ClassVar[CacheStatus]
    CACHE_STATUS_MEMORY: _ClassVar[CacheStatus]
    CACHE_STATUS_DISK: _ClassVar[CacheStatus]
    CACHE_STATUS_REDIS: _ClassVar[CacheStatus]
COLLATE_STACK: Collate
COLLATE_PAD: Collate
COLLATE_LIST: Collate
CACHE_STATUS_UNSPECIFIED: CacheStatus
CACHE_STATUS_MISS: CacheStatus
CACHE_STATUS_MEMORY: CacheStatus
CACHE_STATUS_DISK: CacheStatus
CACHE_STATUS_REDIS: CacheStatus

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OutputSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape", "per_token", "fixed_tokens", "collate", "mask_name")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FIXED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COLLATE_FIELD_NUMBER: _ClassVar[int]
    MASK_NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    per_token: bool
    fixed_tokens: int
    collate: Collate
    mask_name: str
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., per_token: _Optional[bool] = ..., fixed_tokens: _Optional[int] = ..., collate: _Optional[_Union[Collate, str]] = ..., mask_name: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "family", "source", "fingerprint", "outputs", "default_max_sequence_length", "max_max_sequence_length", "max_prompts_per_call")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPTS_PER_CALL_FIELD_NUMBER: _ClassVar[int]
    name: str
    family: str
    source: str
    fingerprint: str
    outputs: _containers.RepeatedCompositeFieldContainer[OutputSpec]
    default_max_sequence_length: int
    max_max_sequence_length: int
    max_prompts_per_call: int
    def __init__(self, name: _Optional[str] = ..., family: _Optional[str] = ..., source: _Optional[str] = ..., fingerprint: _Optional[str] = ..., outputs: _Optional[_Iterable[_Union[OutputSpec, _Mapping]]] = ..., default_max_sequence_length: _Optional[int] = ..., max_max_sequence_length: _Optional[int] = ..., max_prompts_per_call: _Optional[int] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("model", "prompts", "prompts_2", "max_sequence_length", "shared_memory")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_2_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompts: _containers.RepeatedScalarFieldContainer[str]
    prompts_2: _containers.RepeatedScalarFieldContainer[str]
    max_sequence_length: int
    shared_memory: SharedMemoryTarget
    def __init__(self, model: _Optional[str] = ..., prompts: _Optional[_Iterable[str]] = ..., prompts_2: _Optional[_Iterable[str]] = ..., max_sequence_length: _Optional[int] = ..., shared_memory: _Optional[_Union[SharedMemoryTarget, _Mapping]] = ...) -> None: ...

class SharedMemoryTarget(_message.Message):
    __slots__ = ("name", "token", "reads_published")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    READS_PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    name: str
    token: bytes
    reads_published: bool
    def __init__(self, name: _Optional[str] = ..., token: _Optional[bytes] = ..., reads_published: _Optional[bool] = ...) -> None: ...

class SharedMemorySlice(_message.Message):
    __slots__ = ("offset", "name")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    offset: int
    name: str
    def __init__(self, offset: _Optional[int] = ..., name: _Optional[str] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape", "byte_length", "checksum", "variable_length")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    BYTE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    VARIABLE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    byte_length: int
    checksum: str
    variable_length: bool
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., byte_length: _Optional[int] = ..., checksum: _Optional[str] = ..., variable_length: _Optional[bool] = ...) -> None: ...

class EmbeddingHeader(_message.Message):
    __slots__ = ("index", "cache_key", "cache_status", "tensors", "server_seconds", "in_shared_memory")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    CACHE_KEY_FIELD_NUMBER: _ClassVar[int]
    CACHE_STATUS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    SERVER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    IN_SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    index: int
    cache_key: str
    cache_status: CacheStatus
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    server_seconds: float
    in_shared_memory: SharedMemorySlice
    def __init__(self, index: _Optional[int] = ..., cache_key: _Optional[str] = ..., cache_status: _Optional[_Union[CacheStatus, str]] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., server_seconds: _Optional[float] = ..., in_shared_memory: _Optional[_Union[SharedMemorySlice, _Mapping]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: EmbeddingHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[EmbeddingHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...
