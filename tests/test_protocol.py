"""The wire: stubs match the .proto, tensors travel as checked raw bytes in chunks of at most 1 MiB."""

import filecmp
import math
from pathlib import Path

import pytest
import torch

from shared import protogen
from shared.promptcast.v1 import encoder_pb2 as pb
from shared.tensor_codec import (CHUNK_BYTES, EmbeddingAssembler, PayloadError, decode_response, encode_embedding,
                                 pack_embedding, pack_tensors)

ROOT = Path(__file__).resolve().parent.parent


def test_committed_stubs_match_the_proto(tmp_path):
    generated = protogen.generate(tmp_path)
    assert generated, "protoc produced nothing"
    for path in generated:
        committed = ROOT / path.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is missing: run `python -m shared.protogen`"
        assert filecmp.cmp(path, committed, shallow=False), f"{committed} is stale: run `python -m shared.protogen`"


def _messages(tensors, index=0):
    return list(encode_embedding(index, "k" * 64, pb.CACHE_STATUS_MISS, tensors))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_roundtrip_in_chunks_of_at_most_1_mib(dtype):
    rows = [{"prompt_embeds": torch.randn(512, 4096).to(dtype), "pooled_prompt_embeds": torch.randn(768).to(dtype)}
            for _ in range(2)]
    assembler = EmbeddingAssembler(2)
    for index, row in enumerate(rows):
        messages = _messages(row, index)
        chunks = [m.chunk for m in messages if m.WhichOneof("payload") == "chunk"]
        assert max(len(c) for c in chunks) <= CHUNK_BYTES
        assert sum(len(c) for c in chunks) == sum(t.numel() * t.element_size() for t in row.values())
        for message in messages:
            assembler.feed(message)
    out = assembler.result()
    assert torch.equal(out["prompt_embeds"], torch.stack([r["prompt_embeds"] for r in rows]))
    assert torch.equal(out["pooled_prompt_embeds"], torch.stack([r["pooled_prompt_embeds"] for r in rows]))


@pytest.mark.parametrize("numel", [0, 1, 2**19 + 1, 2**21 + 7])
def test_an_entry_packed_once_sends_the_same_bytes_every_time_and_gives_its_tensors_back(numel):
    """The memory tier keeps entries packed: a hit adds only its header, and must put on the wire exactly the
    messages packing the tensors would."""
    tensors = {"prompt_embeds": torch.randn(numel).to(torch.bfloat16), "pooled_prompt_embeds": torch.randn(768)}
    packed = pack_tensors(tensors)
    assert packed.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
    for index in (0, 5):
        assert pack_embedding(index, "k" * 64, pb.CACHE_STATUS_MEMORY, packed, 0.5) == pack_embedding(
            index, "k" * 64, pb.CACHE_STATUS_MEMORY, tensors, 0.5)
    back = packed.tensors()
    assert set(back) == set(tensors) and all(back[n].dtype == tensors[n].dtype and torch.equal(back[n], tensors[n])
                                             for n in tensors)


@pytest.mark.parametrize("numel", [0, 1, 63, 64, 8191, 8192, 2**19, 2**19 + 1])
def test_packed_messages_are_the_bytes_protobuf_writes(numel):
    """The server frames chunks itself (one copy instead of protobuf's two): the bytes must be protobuf's own, and the
    client's view-decoder must give back exactly the payload."""
    tensor = torch.randn(numel).to(torch.bfloat16)
    packed = pack_embedding(3, "k" * 64, pb.CACHE_STATUS_MEMORY, {"prompt_embeds": tensor}, 0.25)
    parsed = [pb.EncodeResponse.FromString(m) for m in packed]
    assert [m.SerializeToString() for m in parsed] == packed
    assert parsed[0].header.index == 3 and parsed[0].header.tensors[0].byte_length == 2 * numel
    assert b"".join(m.chunk for m in parsed[1:]) == tensor.view(torch.uint8).numpy().tobytes()
    for raw, message in zip(packed[1:], parsed[1:]):
        view = decode_response(raw)
        assert isinstance(view, memoryview) and view.tobytes() == message.chunk
    assert decode_response(packed[0]) == parsed[0]


def test_a_chunk_message_with_more_fields_is_parsed_by_protobuf():
    """Anything but a bare chunk (here a chunk followed by a header field: protobuf's last-one-wins) goes to protobuf."""
    chunk = pb.EncodeResponse(chunk=b"abc").SerializeToString()
    header = pb.EncodeResponse(header=pb.EmbeddingHeader(index=1)).SerializeToString()
    message = decode_response(chunk + header)
    assert isinstance(message, pb.EncodeResponse) and message.WhichOneof("payload") == "header"
    assert decode_response(chunk).tobytes() == b"abc"


def test_header_claiming_wrong_size_is_rejected_before_allocating(monkeypatch):
    header = pb.EncodeResponse(header=pb.EmbeddingHeader(index=0, tensors=[pb.TensorSpec(
        name="prompt_embeds", dtype="bfloat16", shape=[512, 4096], byte_length=10, checksum="crc32:00000000")]))
    allocations = []
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: allocations.append(a) or real_empty(*a, **k))
    with pytest.raises(PayloadError, match="claims 10 bytes"):
        EmbeddingAssembler(1).feed(header)
    assert allocations == []


def test_header_claiming_a_huge_tensor_is_rejected():
    shape = [1 << 20, 1 << 12]
    spec = pb.TensorSpec(name="x", dtype="float32", shape=shape, byte_length=math.prod(shape) * 4)
    with pytest.raises(PayloadError, match="over the"):
        EmbeddingAssembler(1).feed(pb.EncodeResponse(header=pb.EmbeddingHeader(index=0, tensors=[spec])))


def test_flipped_byte_fails_the_checksum():
    messages = _messages({"prompt_embeds": torch.randn(4, 8)})
    chunk = bytearray(messages[1].chunk)
    chunk[5] ^= 0x01
    messages[1] = pb.EncodeResponse(chunk=bytes(chunk))
    assembler = EmbeddingAssembler(1)
    with pytest.raises(PayloadError, match="checksum mismatch"):
        for message in messages:
            assembler.feed(message)


def test_extra_or_missing_bytes_are_rejected():
    messages = _messages({"prompt_embeds": torch.randn(4, 8)})
    assembler = EmbeddingAssembler(1)
    for message in messages:
        assembler.feed(message)
    with pytest.raises(PayloadError, match="more bytes"):
        assembler.feed(pb.EncodeResponse(chunk=b"\0"))
    short = EmbeddingAssembler(1)
    short.feed(messages[0])
    with pytest.raises(PayloadError, match="before prompts|before its bytes"):
        short.result()


def test_flux1_sized_embedding_crosses_default_grpc_limits(tiny_flux1, tmp_path):
    """A real server, default receive limits on both sides, a 4 MiB+ bf16 (512, 4096) embedding."""
    import shutil

    from transformers import T5Config, T5EncoderModel

    from denoiser_client import RemoteTextEncoder
    from encoder_server.server import BackgroundServer, ModelSpec, ServerConfig

    wide = tmp_path / "wide"
    shutil.copytree(tiny_flux1, wide)
    config = T5Config.from_pretrained(wide / "text_encoder_2")
    config.d_model, config.num_layers, config.num_heads, config.d_kv, config.d_ff = 4096, 1, 2, 8, 16
    torch.manual_seed(0)
    T5EncoderModel(config).to(torch.bfloat16).save_pretrained(wide / "text_encoder_2")
    with BackgroundServer(ServerConfig([ModelSpec(str(wide), name="wide")], port=0, dtype="bf16")) as server:
        with RemoteTextEncoder(server.address) as client:
            out, info = client.encode(["a fox", "a cat"], with_info=True)
    assert out["prompt_embeds"].shape == (2, 512, 4096) and out["prompt_embeds"].dtype == torch.bfloat16
    assert out["prompt_embeds"][0].numel() * 2 == 4 << 20
    assert info.bytes_received > 2 * (4 << 20)
    assert torch.isfinite(out["prompt_embeds"].float()).all()


def test_flux2_sized_embedding_streams_through_default_limits(tiny_flux1):
    """A (512, 15360) bf16 embedding (15 MiB, FLUX.2-dev's) through a real server and client
    with default gRPC limits, checksums verified. The encoder is the real tiny FLUX.1 one with its T5 output
    widened to FLUX.2-dev's width, since a 15360-wide Mistral does not fit a CI machine."""
    from denoiser_client import RemoteTextEncoder
    from encoder_server.families import family_class
    from encoder_server.server import BackgroundServer, ModelSpec, ServerConfig
    from shared.sources import resolve_source

    class WideEncoder(family_class("flux1")):
        def fingerprint_parts(self):  # other bytes, other cache keys
            return {**super().fingerprint_parts(), "widened_to": 15360}

        def encode(self, prompts, prompts_2, max_sequence_length):
            out = super().encode(prompts, prompts_2, max_sequence_length)
            t5 = out["prompt_embeds"]  # (B, L, 48) -> (B, L, 15360), deterministic in the prompt
            return {"prompt_embeds": t5.repeat(1, 1, 320).to(torch.bfloat16)}

    wide = WideEncoder("wide", resolve_source(str(tiny_flux1)), torch.device("cpu"), torch.float32)
    with BackgroundServer(ServerConfig([ModelSpec(str(tiny_flux1))], port=0), encoders=[wide]) as server:
        with RemoteTextEncoder(server.address) as client:
            out, info = client.encode(["a fox", "a cat"], with_info=True)
    expected = wide.encode(["a fox", "a cat"], None, 512)["prompt_embeds"]
    assert out["prompt_embeds"].shape == (2, 512, 15360)
    assert out["prompt_embeds"][0].numel() * 2 == 15 << 20
    assert torch.equal(out["prompt_embeds"], expected)
    assert info.bytes_received > 2 * (15 << 20)


def test_prompts_may_list_their_tensors_in_any_order():
    """A cache hit may hold its tensors in another order than a fresh encode; each spec names its bytes."""
    a = {"prompt_embeds": torch.randn(4, 8), "pooled_prompt_embeds": torch.randn(3)}
    b = {"pooled_prompt_embeds": torch.randn(3), "prompt_embeds": torch.randn(4, 8)}
    assembler = EmbeddingAssembler(2)
    for message in _messages(a, 0) + _messages(b, 1):
        assembler.feed(message)
    out = assembler.result()
    assert torch.equal(out["prompt_embeds"][1], b["prompt_embeds"])
    assert torch.equal(out["pooled_prompt_embeds"][0], a["pooled_prompt_embeds"])
