"""Variable-length outputs on the wire: per-prompt shapes, one batching rule per layout, and old clients unharmed."""

from __future__ import annotations

import grpc
import pytest
import torch
from google.protobuf.unknown_fields import UnknownFieldSet

import legacy_wire
from shared.collate import LIST, PAD, STACK, Layout, batch_of, collate, rows_of
from shared.promptcast.v1 import encoder_pb2 as pb
from shared.tensor_codec import EmbeddingAssembler, PayloadError, encode_embedding, pack_embedding


def _stream(rows, variable=()):
    return [m for i, row in enumerate(rows)
            for m in encode_embedding(i, f"{i:064x}", pb.CACHE_STATUS_MISS, row, variable=variable)]


def test_each_prompt_keeps_its_own_length():
    rows = [{"prompt_embeds": torch.randn(n, 8)} for n in (5, 1, 12, 0)]
    assembler = EmbeddingAssembler(len(rows))
    for message in _stream(rows, variable={"prompt_embeds"}):
        assembler.feed(message)
    out = assembler.result()["prompt_embeds"]
    assert isinstance(out, list) and [t.shape[0] for t in out] == [5, 1, 12, 0]
    assert all(torch.equal(a, r["prompt_embeds"]) for a, r in zip(out, rows))


def test_variable_outputs_may_differ_on_their_first_axis_only():
    rows = [{"prompt_embeds": torch.randn(3, 8)}, {"prompt_embeds": torch.randn(3, 9)}]
    assembler = EmbeddingAssembler(2)
    with pytest.raises(PayloadError, match="prompt 1: tensor specs differ"):
        for message in _stream(rows, variable={"prompt_embeds"}):
            assembler.feed(message)
    # An output that does not say it varies must keep the first prompt's shape, as before.
    assembler = EmbeddingAssembler(2)
    with pytest.raises(PayloadError, match="prompt 1: tensor specs differ"):
        for message in _stream([{"prompt_embeds": torch.randn(3, 8)}, {"prompt_embeds": torch.randn(4, 8)}]):
            assembler.feed(message)


def test_a_variable_header_claiming_a_wrong_size_is_rejected_before_allocating(monkeypatch):
    spec = pb.TensorSpec(name="prompt_embeds", dtype="float32", shape=[7, 8], byte_length=3, variable_length=True)
    allocations = []
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: allocations.append(a) or real_empty(*a, **k))
    with pytest.raises(PayloadError, match="claims 3 bytes"):
        EmbeddingAssembler(1).feed(pb.EncodeResponse(header=pb.EmbeddingHeader(index=0, tensors=[spec])))
    assert allocations == []


def test_collate_pads_with_a_mask_lists_or_stacks_by_layout():
    a, b = torch.randn(2, 4), torch.randn(5, 4)
    layouts = {"prompt_embeds": Layout(PAD, mask="prompt_embeds_mask")}
    out = collate({"prompt_embeds": [a, b]}, layouts, prefix="negative_")
    assert set(out) == {"negative_prompt_embeds", "negative_prompt_embeds_mask"}
    embeds, mask = out["negative_prompt_embeds"], out["negative_prompt_embeds_mask"]
    assert embeds.shape == (2, 5, 4) and mask.dtype == torch.long
    assert torch.equal(embeds[0, :2], a) and (embeds[0, 2:] == 0).all() and torch.equal(embeds[1], b)
    assert mask.tolist() == [[1, 1, 0, 0, 0], [1] * 5]
    listed = collate({"prompt_embeds": [a, b]}, {"prompt_embeds": Layout(LIST)})["prompt_embeds"]
    assert isinstance(listed, list) and listed[1] is b
    stacked = collate({"pooled": [torch.ones(3), torch.zeros(3)]}, {})
    assert stacked["pooled"].shape == (2, 3)
    with pytest.raises(ValueError, match="different shapes"):
        collate({"prompt_embeds": [a, b]}, {"prompt_embeds": Layout(STACK)})
    with pytest.raises(ValueError, match="needs collate='pad'"):
        Layout(LIST, mask="m")


def test_rows_and_batches_round_trip():
    batch = {"prompt_embeds": [torch.randn(2, 4), torch.randn(3, 4)], "pooled": torch.randn(2, 6)}
    rows = rows_of(batch)
    assert len(rows) == 2 and torch.equal(rows[1]["pooled"], batch["pooled"][1])
    again = collate(batch_of(rows), {"prompt_embeds": Layout(LIST)})
    assert torch.equal(again["pooled"], batch["pooled"]) and again["prompt_embeds"][1] is batch["prompt_embeds"][1]
    with pytest.raises(ValueError, match="different numbers of prompts"):
        rows_of({"a": [torch.ones(1)], "b": torch.ones(2, 1)})


def test_one_shape_messages_are_those_old_clients_parse_byte_for_byte():
    """Nothing new is written for one-shape outputs: an old client's messages re-serialize to the same bytes, so no
    field it does not know was sent."""
    old = legacy_wire.messages()
    tensors = {"prompt_embeds": torch.randn(16, 48), "pooled_prompt_embeds": torch.randn(32)}
    for message in pack_embedding(0, "a" * 64, pb.CACHE_STATUS_MEMORY, tensors, 0.5, 1024):
        parsed = old["EncodeResponse"].FromString(message)
        assert parsed.SerializeToString() == message and not len(UnknownFieldSet(parsed))
    info = pb.ModelInfo(name="m", outputs=[pb.OutputSpec(name="prompt_embeds", dtype="float32", shape=[512, 48],
                                                         per_token=True)])
    assert old["ModelInfo"].FromString(info.SerializeToString()).SerializeToString() == info.SerializeToString()


def test_an_old_client_still_decodes_a_flux_server(flux1_server, reference):
    """The pre-change assembler, on the pre-change messages, against today's server."""
    from conftest import no_grad_encode

    old = legacy_wire.messages()
    with grpc.insecure_channel(flux1_server.address) as channel:
        encode = channel.unary_stream("/promptcast.v1.TextEncoder/Encode",
                                      request_serializer=old["EncodeRequest"].SerializeToString,
                                      response_deserializer=old["EncodeResponse"].FromString)
        list_models = channel.unary_unary("/promptcast.v1.TextEncoder/ListModels",
                                          request_serializer=old["ListModelsRequest"].SerializeToString,
                                          response_deserializer=old["ListModelsResponse"].FromString)
        (model,) = list_models(old["ListModelsRequest"](), timeout=30).models
        assert [o.name for o in model.outputs] == ["prompt_embeds", "pooled_prompt_embeds"]
        assembler = legacy_wire.EmbeddingAssembler(2)
        prompts = ["an old client's fox", ""]
        for message in encode(old["EncodeRequest"](model="tiny-flux1", prompts=prompts, max_sequence_length=32),
                              timeout=60):
            assert not len(UnknownFieldSet(message))
            assembler.feed(message)
    out = assembler.result()
    prompt_embeds, pooled, _ = no_grad_encode(reference, prompts, max_sequence_length=32)
    assert torch.equal(out["prompt_embeds"], prompt_embeds) and torch.equal(out["pooled_prompt_embeds"], pooled)
