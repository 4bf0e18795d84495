"""The client as released before variable-length outputs: its wire messages and its assembler, frozen.

`messages()` rebuilds the `promptcast.v1` messages that client was generated from: today's descriptor without the
fields added since (in a separate descriptor pool, so both coexist in one process). `EmbeddingAssembler` is that
client's class, verbatim. Tests feed a new server's bytes through both to prove old clients keep working.
"""

from __future__ import annotations

import torch
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from shared.promptcast.v1 import encoder_pb2 as pb
from shared.tensor_codec import DTYPE_NAMES, PayloadError, checksum, tensor_bytes, validate_spec

# What was added to promptcast.v1 for variable-length outputs (message -> fields), and the enum.
ADDED_FIELDS = {"OutputSpec": {"fixed_tokens", "collate", "mask_name"}, "TensorSpec": {"variable_length"}}
ADDED_ENUMS = {"Collate"}


def messages():
    """`{name: message class}` of the wire as the old client knew it."""
    proto = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(proto)
    proto.name = "legacy/" + proto.name
    for message in proto.message_type:
        keep = [f for f in message.field if f.name not in ADDED_FIELDS.get(message.name, ())]
        assert len(message.field) - len(keep) == len(ADDED_FIELDS.get(message.name, ())), message.name
        del message.field[:]
        message.field.extend(keep)
    enums = [e for e in proto.enum_type if e.name not in ADDED_ENUMS]
    del proto.enum_type[:]
    proto.enum_type.extend(enums)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return {m.name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"promptcast.v1.{m.name}"))
            for m in proto.message_type}


class EmbeddingAssembler:
    """Reassembles an `Encode` stream into one preallocated tensor per output.

    Feed it every `EncodeResponse` in order; `result()` returns `{name: tensor (B, *shape)}`.
    Chunks are copied once, from the message straight into their final place.
    """

    def __init__(self, num_prompts: int, max_bytes: int = 256 << 20):
        self.num_prompts = num_prompts
        self.max_bytes = max_bytes
        self.tensors: dict[str, torch.Tensor] = {}
        self.headers = [None] * num_prompts
        self._targets = []
        self._target = 0
        self._offset = 0
        self._current = None

    def feed(self, message) -> None:
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

    def _start(self, header) -> None:
        self._finish_current()
        if header.index >= self.num_prompts or self.headers[header.index] is not None:
            raise PayloadError(f"unexpected header for prompt index {header.index}")
        if not self.tensors:
            for spec in header.tensors:
                dtype = validate_spec(spec, self.max_bytes)
                self.tensors[spec.name] = torch.empty((self.num_prompts, *spec.shape), dtype=dtype)
        for spec in header.tensors:
            validate_spec(spec, self.max_bytes)
        # Same tensors as the first prompt's, in any order (each spec says which bytes follow).
        if sorted((s.name, s.dtype, list(s.shape)) for s in header.tensors) != sorted(
            (name, DTYPE_NAMES[t.dtype], list(t.shape[1:])) for name, t in self.tensors.items()
        ):
            raise PayloadError(f"prompt {header.index}: tensor specs differ from the first prompt's")
        self._current = header
        self._targets = [(spec, tensor_bytes(self.tensors[spec.name][header.index])) for spec in header.tensors]
        self._target, self._offset = 0, 0
        self._skip_empty_targets()

    def _skip_empty_targets(self) -> None:
        while self._target < len(self._targets) and self._offset == self._targets[self._target][1].nbytes:
            self._verify(*self._targets[self._target])
            self._target, self._offset = self._target + 1, 0

    def _write(self, chunk) -> None:
        if self._current is None or self._target >= len(self._targets):
            raise PayloadError("received more bytes than the header announced")
        spec, view = self._targets[self._target]
        end = self._offset + len(chunk)
        if end > view.nbytes:
            raise PayloadError(f"tensor {spec.name!r} of prompt {self._current.index}: chunk overruns "
                               f"its {view.nbytes} bytes")
        view[self._offset:end] = chunk
        self._offset = end
        self._skip_empty_targets()

    def _verify(self, spec, view: memoryview) -> None:
        if checksum(view) != spec.checksum:
            raise PayloadError(f"tensor {spec.name!r} of prompt {self._current.index}: checksum mismatch "
                               f"(got {checksum(view)}, header says {spec.checksum})")

    def _finish_current(self) -> None:
        if self._current is not None:
            if self._target < len(self._targets):
                raise PayloadError(f"prompt {self._current.index}: stream moved on before its bytes were complete")
            self.headers[self._current.index] = self._current
            self._current = None

    def result(self) -> dict[str, torch.Tensor]:
        self._finish_current()
        missing = [i for i, h in enumerate(self.headers) if h is None]
        if missing:
            raise PayloadError(f"stream ended before prompts {missing} arrived")
        return self.tensors
