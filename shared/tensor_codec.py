"""Tensors on the wire: raw little-endian bytes + dtype + shape + checksum. No pickle, ever.

The sender describes each tensor with a `TensorSpec` and streams its bytes in chunks of at most
`CHUNK_BYTES`. The receiver validates every spec *before* allocating (a header that claims a size
its shape and dtype do not give is rejected), preallocates one tensor per output for the whole
request, writes each chunk straight into it and checks the CRC when a prompt's bytes are complete.
A variable-length output (its spec says so) has each prompt's own shape: the receiver allocates it per
prompt and returns a list, which `shared.collate` batches as the output's layout says.
"""

from __future__ import annotations

import math
import sys
from itertools import accumulate
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass

import torch

from shared import published_memory as published
from shared.parallel_copy import copy_many, crc32
from shared.promptcast.v1 import encoder_pb2 as pb

CHUNK_BYTES = 1 << 20
# Hard ceiling for one prompt's tensor, far above FLUX.2-dev's 15 MiB, so a hostile header
# cannot make a client allocate gigabytes.
MAX_TENSOR_BYTES = 256 << 20
# A one-prompt answer is lent its arena (no copy) only if the arena is at most twice its bytes plus this.
LEND_SLACK = 1 << 20

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

# Cache statuses by name, as the server's domain reports them and the client returns them, and on the wire.
CACHE_STATUS = {"miss": pb.CACHE_STATUS_MISS, "memory": pb.CACHE_STATUS_MEMORY, "disk": pb.CACHE_STATUS_DISK,
                "redis": pb.CACHE_STATUS_REDIS}
CACHE_STATUS_NAMES = {value: name for name, value in CACHE_STATUS.items()} | {pb.CACHE_STATUS_UNSPECIFIED: "unknown"}
# `shared.collate` layouts on the wire.
COLLATE = {"stack": pb.COLLATE_STACK, "pad": pb.COLLATE_PAD, "list": pb.COLLATE_LIST}
COLLATE_NAMES = {value: name for name, value in COLLATE.items()}

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("promptcast's wire format is little-endian; this host is big-endian")


class PayloadError(ValueError):
    """A tensor header or payload that does not describe itself consistently."""


def checksum(data) -> str:
    return f"crc32:{crc32(data) & 0xFFFFFFFF:08x}"


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor."""
    tensor = tensor.detach().contiguous()
    if tensor.device.type != "cpu":
        raise ValueError("tensor_bytes needs a CPU tensor")
    # Flat first: a memoryview of an empty multi-dimensional array (a zero-length prompt) cannot be cast.
    return memoryview(tensor.view(torch.uint8).reshape(-1).numpy()).cast("B")


def iter_chunks(buffers: Sequence[memoryview], chunk_bytes: int = CHUNK_BYTES) -> Iterator[memoryview]:
    """Split each buffer into zero-copy pieces of at most `chunk_bytes`."""
    for data in buffers:
        for start in range(0, data.nbytes, chunk_bytes):
            yield data[start:start + chunk_bytes]


# `EncodeResponse.chunk`: field number and wire type 2 (length-delimited), as protobuf writes its tag.
_CHUNK_TAG = bytes([pb.EncodeResponse.DESCRIPTOR.fields_by_name["chunk"].number << 3 | 2])


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def chunk_message(piece: memoryview) -> bytes:
    """The serialized `EncodeResponse(chunk=piece)`, byte for byte what protobuf writes, built with one copy (protobuf
    would copy the piece into the message, then the message into its serialization)."""
    return b"".join((_CHUNK_TAG, _varint(piece.nbytes), piece))


@dataclass(frozen=True, eq=False)
class PackedEmbedding:
    """One prompt's tensors as they go on the wire, packed once and sent as often as asked: per tensor (name, dtype
    name, shape, byte length, checksum), and the serialized chunk messages that carry their bytes, in that order.

    The chunks own their bytes (nothing points back into the batch the tensors came from); `nbytes` is the tensors'
    bytes they carry (their framing adds 2-5 bytes a chunk); `tensors()` rebuilds the tensors from them (a copy)."""

    specs: tuple[tuple[str, str, tuple[int, ...], int, str], ...]
    chunks: tuple[bytes, ...]

    @property
    def nbytes(self) -> int:
        return sum(spec[3] for spec in self.specs)

    def tensor_specs(self, variable: Collection[str] = ()) -> list[pb.TensorSpec]:
        """The header's specs; `variable` names the variable-length outputs, whose specs say so."""
        return [pb.TensorSpec(name=name, dtype=dtype, shape=list(shape), byte_length=length, checksum=crc,
                              variable_length=name in variable)
                for name, dtype, shape, length, crc in self.specs]

    def tensors(self) -> dict[str, torch.Tensor]:
        chunks, out = iter(self.chunks), {}
        for name, dtype, shape, length, _ in self.specs:
            data = bytearray(length)
            filled = 0
            while filled < length:
                payload = decode_response(next(chunks))
                data[filled:filled + payload.nbytes] = payload
                filled += payload.nbytes
            out[name] = (torch.frombuffer(data, dtype=DTYPES[dtype]) if length else
                         torch.empty(0, dtype=DTYPES[dtype])).reshape(shape)
        return out


def pack_tensors(tensors: dict[str, torch.Tensor], chunk_bytes: int = CHUNK_BYTES) -> PackedEmbedding:
    """CRC32 and chunk one prompt's CPU tensors (both release the GIL for most of their time: threads run them in
    parallel)."""
    buffers = {name: tensor_bytes(t) for name, t in tensors.items()}
    specs = tuple((name, DTYPE_NAMES[t.dtype], tuple(t.shape), buffers[name].nbytes, checksum(buffers[name]))
                  for name, t in tensors.items())
    return PackedEmbedding(specs, tuple(map(chunk_message, iter_chunks(list(buffers.values()), chunk_bytes))))


def pack_embedding(index: int, key: str, status: int, tensors: dict[str, torch.Tensor] | PackedEmbedding,
                   server_seconds: float = 0.0, chunk_bytes: int = CHUNK_BYTES,
                   variable: Collection[str] = ()) -> list[bytes]:
    """One prompt's messages, serialized: its header, then its bytes in chunks. From tensors this is the CRC32 and a
    copy (`pack_tensors`), work for a thread; from a `PackedEmbedding` only the header is new. `variable` names the
    variable-length outputs, whose specs say so."""
    packed = tensors if isinstance(tensors, PackedEmbedding) else pack_tensors(tensors, chunk_bytes)
    return [embedding_header(index, key, status, packed, server_seconds, variable), *packed.chunks]


def embedding_header(index: int, key: str, status: int, packed: PackedEmbedding, server_seconds: float = 0.0,
                     variable: Collection[str] = (), shared_memory_offset: int | None = None,
                     shared_memory_name: str = "") -> bytes:
    """One prompt's serialized header; with `shared_memory_offset`, it says the bytes are in shared memory from there
    (and no chunks follow): the request's, or the server's object `shared_memory_name`."""
    header = pb.EmbeddingHeader(index=index, cache_key=key, cache_status=status, tensors=packed.tensor_specs(variable),
                                server_seconds=server_seconds)
    if shared_memory_offset is not None:
        header.in_shared_memory.offset = shared_memory_offset
        header.in_shared_memory.name = shared_memory_name
    return pb.EncodeResponse(header=header).SerializeToString()


def encode_embedding(index: int, key: str, status: int, tensors: dict[str, torch.Tensor],
                     server_seconds: float = 0.0, chunk_bytes: int = CHUNK_BYTES, variable: Collection[str] = ()
                     ) -> Iterator[pb.EncodeResponse]:
    """The messages for one prompt as protobuf objects (what `pack_embedding` serializes)."""
    for message in pack_embedding(index, key, status, tensors, server_seconds, chunk_bytes, variable):
        yield pb.EncodeResponse.FromString(message)


def decode_response(data: bytes) -> pb.EncodeResponse | memoryview:
    """A client's response deserializer: a chunk message comes back as a zero-copy view of its payload (the assembler
    copies it once, into its tensor), anything else as a parsed `EncodeResponse`."""
    if data[:1] == _CHUNK_TAG:
        length, offset, shift = 0, 1, 0
        while offset < len(data) and offset < 11:
            byte = data[offset]
            length |= (byte & 0x7F) << shift
            offset += 1
            shift += 7
            if not byte & 0x80:
                if offset + length == len(data):
                    return memoryview(data)[offset:]
                break
    return pb.EncodeResponse.FromString(data)


def validate_spec(spec: pb.TensorSpec, max_bytes: int = MAX_TENSOR_BYTES) -> torch.dtype:
    """Check that a spec is self-consistent and sane; return its torch dtype. Allocates nothing."""
    if spec.dtype not in DTYPES:
        raise PayloadError(f"tensor {spec.name!r}: unknown dtype {spec.dtype!r} (expected one of {sorted(DTYPES)})")
    if any(d < 0 for d in spec.shape):
        raise PayloadError(f"tensor {spec.name!r}: negative dimension in shape {list(spec.shape)}")
    dtype = DTYPES[spec.dtype]
    expected = math.prod(spec.shape) * dtype.itemsize
    if spec.byte_length != expected:
        raise PayloadError(f"tensor {spec.name!r}: header claims {spec.byte_length} bytes but shape "
                           f"{list(spec.shape)} of {spec.dtype} needs {expected}")
    if expected > max_bytes:
        raise PayloadError(f"tensor {spec.name!r}: {expected} bytes is over the {max_bytes}-byte limit")
    return dtype


def _signature(dtype: str, shape, variable: bool) -> tuple:
    """What two prompts' specs of one output must share: a variable-length one's first axis may differ."""
    return dtype, tuple(shape[1:]) if variable else tuple(shape), variable


class EmbeddingAssembler:
    """Reassembles an `Encode` stream into one preallocated tensor per output.

    Feed it every `EncodeResponse` in order; `result()` returns `{name: tensor (B, *shape)}`, and for a
    variable-length output `{name: [B tensors, each of its prompt's shape]}`. Chunks are copied once, from the
    message straight into their final place, and checksummed as they arrive (while the bytes are still in the CPU's
    cache, and while the next ones are on their way); a tensor's CRC is compared with its header's when its last byte
    is in.

    With `lend`, a call of one prompt whose bytes the server wrote into the call's arena gets tensors over the arena
    itself (`Arena.lend`), checked the same way, with no copy at all.
    """

    def __init__(self, num_prompts: int, max_bytes: int = MAX_TENSOR_BYTES, shared=None, lend: bool = False):
        self.num_prompts = num_prompts
        self.max_bytes = max_bytes
        self.shared = shared  # the call's `shared.shared_memory.Arena`, if it offered one
        self.lend = lend and shared is not None and num_prompts == 1
        self.shared_bytes = 0  # bytes read from it
        self.largest_prompt = 0  # the most bytes one prompt's tensors took: what the next call's arena is sized by
        self.tensors: dict[str, torch.Tensor | list[torch.Tensor | None]] = {}
        self.headers: list[pb.EmbeddingHeader | None] = [None] * num_prompts
        self._first: dict[str, tuple[str, tuple[int, ...], bool]] = {}  # name -> the first prompt's dtype, shape, flag
        self._targets: list[tuple[pb.TensorSpec, memoryview]] = []
        self._target = 0
        self._offset = 0
        self._crc = 0
        self._current: pb.EmbeddingHeader | None = None

    def feed(self, message: pb.EncodeResponse | memoryview) -> None:
        """One message of the stream: an `EncodeResponse`, or a chunk's payload as `decode_response` gives it."""
        if isinstance(message, memoryview):
            self._write(message)
            return
        kind = message.WhichOneof("payload")
        if kind == "header":
            self._start(message.header)
        elif kind == "chunk":
            self._write(message.chunk)
        else:
            raise PayloadError("empty message in the embedding stream")

    def _start(self, header: pb.EmbeddingHeader) -> None:
        self._finish_current()
        if header.index >= self.num_prompts or self.headers[header.index] is not None:
            raise PayloadError(f"unexpected header for prompt index {header.index}")
        dtypes = {spec.name: validate_spec(spec, self.max_bytes) for spec in header.tensors}
        if self.lend and header.HasField("in_shared_memory") and self._lent(header, dtypes):
            return
        if not self._first:
            self._first = {s.name: (s.dtype, tuple(s.shape), s.variable_length) for s in header.tensors}
            for spec in header.tensors:
                if not spec.variable_length:
                    self.tensors[spec.name] = torch.empty((self.num_prompts, *spec.shape), dtype=dtypes[spec.name])
                else:
                    self.tensors[spec.name] = [None] * self.num_prompts
        # Same tensors as the first prompt's, in any order (each spec says which bytes follow); a variable-length one
        # may differ from it on its first axis only.
        if sorted((s.name, _signature(s.dtype, s.shape, s.variable_length)) for s in header.tensors) != sorted(
            (name, _signature(*first)) for name, first in self._first.items()
        ):
            raise PayloadError(f"prompt {header.index}: tensor specs differ from the first prompt's")
        self._current = header
        for spec in header.tensors:
            if spec.variable_length:  # this prompt's own tensor, allocated now that its size is checked
                self.tensors[spec.name][header.index] = torch.empty(tuple(spec.shape), dtype=dtypes[spec.name])
        self._targets = [(spec, tensor_bytes(self.tensors[spec.name][header.index])) for spec in header.tensors]
        self._target, self._offset, self._crc = 0, 0, 0
        self._skip_empty_targets()
        total = sum(spec.byte_length for spec in header.tensors)
        self.largest_prompt = max(self.largest_prompt, total)
        if header.HasField("in_shared_memory"):
            self._read_shared(header.in_shared_memory, total)

    def _lent(self, header: pb.EmbeddingHeader, dtypes: dict[str, torch.dtype]) -> bool:
        """The one prompt's tensors over its bytes in shared memory, no copy; False (copy them instead) if they are in
        an arena much larger than they are (a small answer must not hold a large arena), in a server's slab under
        tensors lent before and still alive (they would share their bytes), or one would start off its dtype's
        alignment."""
        where, total = header.in_shared_memory, sum(spec.byte_length for spec in header.tensors)
        starts = list(accumulate((spec.byte_length for spec in header.tensors[:-1]), initial=where.offset))
        if any(start % dtypes[spec.name].itemsize for spec, start in zip(header.tensors, starts)):
            return False
        if not where.name and self.shared.size > 2 * total + LEND_SLACK:
            return False
        for fresh in (False, True):  # a slab's bytes that fail their check may be ones the caller wrote: map it anew
            mapped = self._slab(where.name, where.offset, total, fresh) if where.name else None
            if mapped is not None and published.SLABS.lent_at(mapped, where.offset):
                return False
            try:
                tensors = {spec.name: self._lend(spec, dtypes[spec.name], start, mapped, where.offset, header.index)
                           for spec, start in zip(header.tensors, starts)}
                break
            except PayloadError:
                if mapped is None or fresh:
                    raise
        for spec in header.tensors:
            tensor = tensors[spec.name]
            self.tensors[spec.name] = ([tensor.reshape(tuple(spec.shape))] if spec.variable_length else
                                       tensor.reshape((1, *spec.shape)))
        self._first = {s.name: (s.dtype, tuple(s.shape), s.variable_length) for s in header.tensors}
        self.headers[header.index] = header
        self.largest_prompt = max(self.largest_prompt, total)
        self.shared_bytes += total
        return True

    def _lend(self, spec: pb.TensorSpec, dtype: torch.dtype, start: int, mapped, entry: int, index: int
              ) -> torch.Tensor:
        try:
            data = (published.SLABS.lend(mapped, start, spec.byte_length, entry) if mapped is not None
                    else self.shared.lend(start, spec.byte_length))
        except ValueError as e:
            raise PayloadError(f"prompt {index}: {e}") from None
        self._verify(spec, crc32(data), index)
        return torch.from_numpy(data).view(dtype)

    def _slab(self, name: str, offset: int, length: int, fresh: bool = False):
        """The server's slab `name`, mapped, checked to hold `length` bytes from `offset`."""
        mapped = published.SLABS.mapping(name, fresh)
        try:
            published.check(mapped, name, offset, length)
        except ValueError as e:
            raise PayloadError(f"prompt {self._current.index if self._current else 0}: {e}") from None
        return mapped

    def _read_shared(self, where: pb.SharedMemorySlice, total: int) -> None:
        """The prompt's bytes from shared memory (the call's arena, or a server's slab), checked as chunks are."""
        if self.shared is None:
            raise PayloadError(f"prompt {self._current.index}: the header points into shared memory, but this call "
                               "offered none")
        for fresh in (False, True):
            try:
                end = where.offset + total
                view = (memoryview(self._slab(where.name, where.offset, total, fresh))[where.offset:end]
                        if where.name else self.shared.view(where.offset, total))
            except ValueError as e:
                raise PayloadError(f"prompt {self._current.index}: {e}") from None
            try:
                self._target, self._offset, self._crc = 0, 0, 0
                self._skip_empty_targets()
                start = 0
                for spec, _ in self._targets:
                    if spec.byte_length:
                        self._write(view[start:start + spec.byte_length])
                        start += spec.byte_length
                break
            except PayloadError:
                if not where.name or fresh:  # a slab's bytes the caller may have written: read a fresh mapping
                    raise
            finally:
                view.release()
        self.shared_bytes += total

    def _skip_empty_targets(self) -> None:
        while self._target < len(self._targets) and self._offset == self._targets[self._target][1].nbytes:
            self._verify(self._targets[self._target][0], self._crc, self._current.index)
            self._target, self._offset, self._crc = self._target + 1, 0, 0

    def _write(self, chunk: bytes | memoryview) -> None:
        if self._current is None or self._target >= len(self._targets):
            raise PayloadError("received more bytes than the header announced")
        spec, view = self._targets[self._target]
        end = self._offset + len(chunk)  # a chunk's view from `decode_response` is flat bytes: len is nbytes
        if end > view.nbytes:
            raise PayloadError(f"tensor {spec.name!r} of prompt {self._current.index}: chunk overruns "
                               f"its {view.nbytes} bytes")
        copy_many([(view[self._offset:end], chunk)])  # a shared-memory prompt's bytes in one piece: several threads
        self._crc = crc32(chunk, self._crc)
        self._offset = end
        self._skip_empty_targets()

    @staticmethod
    def _verify(spec: pb.TensorSpec, crc: int, index: int) -> None:
        got = f"crc32:{crc & 0xFFFFFFFF:08x}"
        if got != spec.checksum:
            raise PayloadError(f"tensor {spec.name!r} of prompt {index}: checksum mismatch "
                               f"(got {got}, header says {spec.checksum})")

    def _finish_current(self) -> None:
        if self._current is not None:
            if self._target < len(self._targets):
                raise PayloadError(f"prompt {self._current.index}: stream moved on before its bytes were complete")
            self.headers[self._current.index] = self._current
            self._current = None

    def result(self) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        self._finish_current()
        missing = [i for i, h in enumerate(self.headers) if h is None]
        if missing:
            raise PayloadError(f"stream ended before prompts {missing} arrived")
        return self.tensors
