"""Tiny offline model folders: they load with plain diffusers, generate, encode prompts, and build reproducibly."""

import hashlib
import json
import os
import pathlib

import diffusers
import numpy as np
import pytest
import torch

from promptcast import tiny_models
from promptcast.tiny_models import FAMILIES, make_tiny_model

PIPELINES = {
    "flux1": diffusers.FluxPipeline,
    "flux2": diffusers.Flux2Pipeline,
    "flux2-klein": diffusers.Flux2KleinPipeline,
    "sd3": diffusers.StableDiffusion3Pipeline,
    "qwen-image": diffusers.QwenImagePipeline,
    "z-image": diffusers.ZImagePipeline,
    "wan": diffusers.WanPipeline,
}
FLUX = ("flux1", "flux2", "flux2-klein")
PROMPTS = [
    "a photo of a cat sitting on a wooden table",
    "",
    "Ünïcödé café, 東京の夜景 🐱🚀✨ — «quotes» & symbols: <>{}[]|\\",
    "an extremely long prompt about a lighthouse in a storm " * 60,
]
MAX_LEN = 64  # FLUX.2 puts its system message (about 30 tokens here) before the prompt


def digest(path) -> dict[str, str]:
    root = pathlib.Path(path)
    return {
        str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(root.rglob("*"))
        if f.is_file()
    }


@pytest.fixture(scope="module")
def model_dirs(tiny_models):
    return tiny_models


@pytest.fixture(scope="module")
def pipes(model_dirs):
    return {family: PIPELINES[family].from_pretrained(path) for family, path in model_dirs.items()}


def test_every_family_has_a_tiny_model():
    assert set(PIPELINES) == set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_generates_an_image(pipes, family):
    pipe = pipes[family]
    kwargs = dict(prompt="a red fox", height=32, width=32, num_inference_steps=2, max_sequence_length=MAX_LEN)
    if FAMILIES[family].media == "video":
        frames = pipe(**kwargs, num_frames=5, generator=torch.Generator().manual_seed(0), output_type="np").frames
        assert frames.shape == (1, 5, 32, 32, 3) and np.isfinite(frames).all()
        return
    image = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    array = pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert array.shape == (1, 32, 32, 3)
    assert np.isfinite(array).all()
    np.testing.assert_array_equal(np.asarray(image), (array[0] * 255).round().astype(np.uint8))


@pytest.mark.parametrize("family", FAMILIES)
def test_text_encoders_fit_the_transformer(pipes, family):
    """Each output's width, as the family record names it, is the transformer config value the handshake checks."""
    pipe = pipes[family]
    with torch.no_grad():
        if family == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt("a cat", None, None, do_classifier_free_guidance=False)
            outputs = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        elif family in FLUX:
            out = pipe.encode_prompt("a cat", max_sequence_length=MAX_LEN)
            outputs = {"prompt_embeds": out[0], **({"pooled_prompt_embeds": out[1]} if family == "flux1" else {})}
        elif family == "z-image":
            outputs = {"prompt_embeds": pipe.encode_prompt(["a cat"], do_classifier_free_guidance=False)[0][0]}
        elif family == "wan":
            outputs = {"prompt_embeds": pipe.encode_prompt("a cat", do_classifier_free_guidance=False)[0]}
        else:
            outputs = {"prompt_embeds": pipe.encode_prompt("a cat")[0]}
    assert set(outputs) == set(FAMILIES[family].embedding_widths)
    for name, key in FAMILIES[family].embedding_widths.items():
        assert outputs[name].shape[-1] == pipe.transformer.config[key], name
        assert torch.isfinite(outputs[name]).all()


def test_qwen_image_tokenizer_drops_exactly_the_system_turn(pipes):
    """QwenImagePipeline drops its template's first 34 tokens: with the real vocabulary, the system turn and the user
    turn's opening. The tiny vocabulary tokenizes that prefix into as many tokens."""
    pipe = pipes["qwen-image"]
    prefix = pipe.prompt_template_encode.split("{}")[0]
    ids = pipe.tokenizer(prefix).input_ids
    assert len(ids) == pipe.prompt_template_encode_start_idx == 34
    assert pipe.tokenizer.convert_ids_to_tokens(ids[-3:]) == ["<|im_start|>", "user", "Ċ"]
    assert "<|vision_start|>" in pipe.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a cat"}]}], tokenize=False)


@pytest.mark.parametrize("family", FLUX)
def test_encode_prompt_handles_awkward_prompts(pipes, family):
    pipe = pipes[family]
    out = pipe.encode_prompt(PROMPTS, max_sequence_length=MAX_LEN)
    embeds = out[0]
    hidden = pipe.transformer.config.joint_attention_dim
    assert embeds.shape == (len(PROMPTS), MAX_LEN, hidden)  # the long prompt is truncated, the others padded
    assert torch.isfinite(embeds).all()
    assert not torch.equal(embeds[0], embeds[1])
    if family == "flux1":
        pooled = out[1]
        assert pooled.shape == (len(PROMPTS), pipe.transformer.config.pooled_projection_dim)
        assert torch.isfinite(pooled).all()


@pytest.mark.parametrize("family", FLUX)
def test_default_sequence_length_is_512(pipes, family):
    embeds = pipes[family].encode_prompt("a cat")[0]
    assert embeds.shape[:2] == (1, 512)


def test_configs_match_tokenizers_and_pipelines(pipes):
    flux1 = pipes["flux1"]
    assert flux1.tokenizer.model_max_length == 77
    assert flux1.text_encoder.config.vocab_size == len(flux1.tokenizer)
    assert flux1.text_encoder_2.config.vocab_size == len(flux1.tokenizer_2)
    assert flux1.transformer.config.joint_attention_dim == flux1.text_encoder_2.config.d_model
    assert flux1.transformer.config.pooled_projection_dim == flux1.text_encoder.config.hidden_size
    assert flux1.transformer.config.in_channels == 4 * flux1.vae.config.latent_channels

    flux2 = pipes["flux2"]
    text = flux2.text_encoder.config.text_config
    assert text.num_hidden_layers > 30  # hidden_states[30] is stacked
    assert text.vocab_size == len(flux2.tokenizer)
    assert flux2.transformer.config.joint_attention_dim == 3 * text.hidden_size

    klein = pipes["flux2-klein"]
    assert klein.text_encoder.config.num_hidden_layers > 27  # hidden_states[27] is stacked
    assert klein.text_encoder.config.vocab_size == len(klein.tokenizer)
    assert klein.transformer.config.joint_attention_dim == 3 * klein.text_encoder.config.hidden_size
    assert klein.config.is_distilled


def test_chat_templates_have_the_real_shape(pipes):
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    mistral = pipes["flux2"].tokenizer
    text = mistral.apply_chat_template(format_input(["a cat"], system_message="Be brief.")[0], tokenize=False)
    assert text == "<s>[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT][INST]a cat[/INST]"
    ids = mistral.apply_chat_template(format_input(["a cat"], system_message="Be brief.")[0])["input_ids"]
    assert mistral.convert_ids_to_tokens(ids[:2]) == ["<s>", "[SYSTEM_PROMPT]"]

    qwen = pipes["flux2-klein"].tokenizer
    messages = [{"role": "user", "content": "a cat"}]
    text = qwen.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert text == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert qwen.convert_ids_to_tokens(qwen(text).input_ids)[0] == "<|im_start|>"


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_bytes(model_dirs, tmp_path, family):
    again = make_tiny_model(tmp_path / "again", family, seed=0)
    assert digest(again) == digest(model_dirs[family])
    other = digest(make_tiny_model(tmp_path / "other", family, seed=1))
    changed = {name for name, sha in digest(again).items() if other[name] != sha}
    assert changed and all(name.endswith(".safetensors") for name in changed)


def test_reuse_does_not_rewrite(tmp_path):
    path = make_tiny_model(tmp_path / "m", "flux1")
    before = {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in path.rglob("*")}
    assert make_tiny_model(path, "flux1", seed=5) == path
    assert {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in path.rglob("*")} == before

    make_tiny_model(path, "flux1", seed=5, overwrite=True)
    assert (path / "model_index.json").stat().st_ino != before[path / "model_index.json"][0]
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp or old siblings left behind


def test_refuses_to_clobber_other_content(model_dirs, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        make_tiny_model(tmp_path / "notes", "flux1")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"

    path = model_dirs["flux2-klein"]
    with pytest.raises(FileExistsError):
        make_tiny_model(path, "flux1")  # a complete model, but of another family (refused before any write)
    assert json.loads((path / "model_index.json").read_text())["_class_name"] == "Flux2KleinPipeline"

    (tmp_path / "empty").mkdir()
    make_tiny_model(tmp_path / "empty", "flux1")  # an empty folder is fine to fill
    with pytest.raises(ValueError):
        make_tiny_model(tmp_path / "x", "sdxl")


def test_crash_leaves_nothing_to_reuse(tmp_path, monkeypatch):
    def crash(family, seed, out):
        out.mkdir()
        (out / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny_models, "_write", crash)
    with pytest.raises(RuntimeError):
        make_tiny_model(tmp_path / "m", "flux1")
    assert os.listdir(tmp_path) == []
