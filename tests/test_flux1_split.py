"""FLUX.1 through the split equals FLUX.1 in one process: embeddings bit for bit, images exactly."""

import pytest
import torch

from conftest import copy_model, no_grad_encode
from denoiser_client.pipeline import handshake, load_denoiser, remote_embeddings, run_pipeline

LONG = " ".join(["a very long prompt about a fox in a snowy forest at dusk with mountains"] * 20)
CASES = {
    "normal": (["a red fox sitting in the snow"], None),
    "empty": ([""], None),
    "unicode": (["一只狐狸 в снегу, café ☕ 🦊🌲"], None),
    "too_long": ([LONG], None),
    "list": (["a cat", "a dog on a skateboard", "", "🦊"], None),
    "prompt_2": (["a cat", "a dog"], ["a watercolor cat, T5 side", "an oil painting of a dog"]),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("max_sequence_length", [None, 32])
def test_embeddings_equal_diffusers_bit_for_bit(client, reference, case, max_sequence_length):
    prompts, prompts_2 = CASES[case]
    got = client.encode(prompts, "tiny-flux1", prompt_2=prompts_2, max_sequence_length=max_sequence_length)
    prompt_embeds, pooled, _ = no_grad_encode(reference, prompts, prompt_2=prompts_2,
                                              max_sequence_length=max_sequence_length or 512)
    assert got["prompt_embeds"].dtype == prompt_embeds.dtype and got["prompt_embeds"].device.type == "cpu"
    assert got["prompt_embeds"].shape == (len(prompts), max_sequence_length or 512, 48)
    assert torch.equal(got["prompt_embeds"], prompt_embeds)
    assert torch.equal(got["pooled_prompt_embeds"], pooled)


def test_over_long_prompt_is_truncated_like_diffusers(client):
    # Same first 32 tokens -> same embedding: the tail was cut, exactly as diffusers cuts it.
    a = client.encode(LONG, max_sequence_length=32)["prompt_embeds"]
    b = client.encode(LONG + " and a completely different ending", max_sequence_length=32)["prompt_embeds"]
    assert torch.equal(a, b)


def test_split_image_equals_plain_pipeline(client, reference, tiny_flux1):
    call = dict(num_inference_steps=2, width=64, height=64, guidance_scale=3.5, max_sequence_length=32,
                output_type="np")
    expected = reference("a red fox in the snow", generator=torch.Generator().manual_seed(7), **call).images
    pipe, family = load_denoiser(str(tiny_flux1))
    info = client.model_info("tiny-flux1")
    handshake(pipe, family, info)
    embeds = remote_embeddings(client, info.name, "a red fox in the snow", max_sequence_length=32)
    got = pipe(**embeds, generator=torch.Generator().manual_seed(7), **call).images
    assert got.shape == expected.shape == (1, 64, 64, 3)
    assert (got == expected).all()


def test_split_image_with_negative_prompt_and_true_cfg(client, reference, tiny_flux1):
    call = dict(num_inference_steps=2, width=32, height=32, true_cfg_scale=4.0, max_sequence_length=32,
                output_type="np")
    expected = reference("a fox", negative_prompt="blurry", generator=torch.Generator().manual_seed(3), **call).images
    pipe, _ = load_denoiser(str(tiny_flux1))
    embeds = remote_embeddings(client, "tiny-flux1", "a fox", negative_prompt="blurry", max_sequence_length=32)
    assert set(embeds) == {"prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds",
                           "negative_pooled_prompt_embeds"}
    assert (run_pipeline(pipe, embeds, generator=torch.Generator().manual_seed(3), **call)[0] == expected[0]).all()


def test_server_never_reads_transformer_or_vae(tiny_flux1, tmp_path):
    from encoder_server.families import get_encoder

    encoders_only = copy_model(tiny_flux1, tmp_path / "m", drop=("transformer", "vae", "scheduler"))
    encoder = get_encoder(str(encoders_only))
    assert encoder.pipe.transformer is None and encoder.pipe.vae is None
    assert set(encoder.encode(["x"], None, 16)) == {"prompt_embeds", "pooled_prompt_embeds"}


def test_denoiser_never_reads_text_encoders(tiny_flux1, tmp_path):
    no_text = copy_model(tiny_flux1, tmp_path / "m", drop=("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"))
    pipe, family = load_denoiser(str(no_text))
    assert family == "flux1"
    assert pipe.text_encoder is None and pipe.text_encoder_2 is None and pipe.tokenizer is None


def test_cache_status_and_keys(client):
    _, first = client.encode(["a fresh prompt for the cache test"], max_sequence_length=16, with_info=True)
    _, again = client.encode(["a fresh prompt for the cache test"], max_sequence_length=16, with_info=True)
    _, longer = client.encode(["a fresh prompt for the cache test"], max_sequence_length=32, with_info=True)
    assert first.cache_status == ["miss"] and again.cache_status == ["memory"]
    assert first.cache_keys == again.cache_keys and longer.cache_keys != first.cache_keys


def test_a_call_starts_no_thread_to_read_its_stream(client, monkeypatch):
    """The client reads each `Encode` stream on the calling thread: gRPC's default for a sync server-streaming call
    is a thread per call that drives it and hands every message over, two wake-ups a message."""
    import threading

    client.encode("warm the channel", max_sequence_length=16)
    started, start = [], threading.Thread.start
    monkeypatch.setattr(threading.Thread, "start", lambda self: started.append(self.name) or start(self))
    for i in range(3):
        client.encode(f"a fox number {i}", max_sequence_length=16)
    assert started == []
