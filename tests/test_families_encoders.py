"""The encoders of SD3, Qwen-Image, Z-Image and Wan: what they load, what their fingerprints hold."""

from __future__ import annotations

import json
import shutil

import diffusers
import pytest
import torch
from safetensors.torch import load_file, save_file

from encoder_server.families import get_encoder
from shared.cache_keys import embedding_key, model_fingerprint

CLASSES = {"sd3": "StableDiffusion3Encoder", "qwen-image": "QwenImageEncoder", "z-image": "ZImageEncoder",
           "wan": "WanEncoder"}


@pytest.fixture(scope="module")
def encoders(tiny_models):
    return {family: get_encoder(str(tiny_models[family])) for family in CLASSES}


@pytest.mark.parametrize("family", CLASSES)
def test_get_encoder_picks_family_from_model_index(encoders, family):
    assert type(encoders[family]).__name__ == CLASSES[family] and encoders[family].family == family


def test_qwen_image_holds_the_language_model_only(encoders, tiny_models):
    full = diffusers.QwenImagePipeline.from_pretrained(tiny_models["qwen-image"]).text_encoder
    encoder = encoders["qwen-image"]
    names = {name for name, _ in encoder.text_encoder.named_modules()}
    assert not any("visual" in n or "lm_head" in n for n in names)
    assert len(encoder.text_model.layers) == full.config.text_config.num_hidden_layers
    assert sum(p.numel() for p in encoder.text_encoder.parameters()) < sum(p.numel() for p in full.parameters())


def test_z_image_stops_before_the_last_layer(encoders, tiny_models):
    full = diffusers.ZImagePipeline.from_pretrained(tiny_models["z-image"]).text_encoder
    encoder = encoders["z-image"]
    assert len(encoder.text_model.layers) == full.config.num_hidden_layers - 1 == encoder.hidden_states_layers[0]
    assert isinstance(encoder.text_model.norm, torch.nn.Identity)  # only the last layer's output was normed


def test_qwen_image_loads_the_in_memory_checkpoint_layout(encoders, tiny_models, tmp_path):
    """transformers saves Qwen2.5-VL as `model.*` + `visual.*`; checkpoints saved from memory hold
    `model.language_model.*` + `model.visual.*`. Both load, to the same bytes."""
    folder = tmp_path / "qwen"
    folder.mkdir()
    shutil.copy(tiny_models["qwen-image"] / "model_index.json", folder)
    for sub in ("text_encoder", "tokenizer"):
        shutil.copytree(tiny_models["qwen-image"] / sub, folder / sub)
    path = folder / "text_encoder" / "model.safetensors"
    state = load_file(path)
    renamed = {("model.language_model." + k[len("model."):] if k.startswith("model.") else
                "model." + k if k.startswith("visual.") else k): v for k, v in state.items()}
    assert any(k.startswith("model.language_model.layers.") for k in renamed)
    save_file(renamed, path, metadata={"format": "pt"})
    prompts = ["a red fox", "a lighthouse in a storm"]
    got = get_encoder(str(folder)).encode(prompts, None, 32)["prompt_embeds"]
    want = encoders["qwen-image"].encode(prompts, None, 32)["prompt_embeds"]
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_z_image_never_changes_the_callers_list(encoders):
    prompts = ["a red fox"]
    encoders["z-image"].encode(prompts, None, 32)
    assert prompts == ["a red fox"]  # ZImagePipeline._encode_prompt templates its list in place: it gets a copy


@pytest.mark.parametrize("family,changes", [
    ("qwen-image", {"prompt_template_encode": "<|im_start|>user\n{}<|im_end|>\n", "prompt_template_encode_start_idx": 3}),
    ("qwen-image", {"prompt_template_encode_start_idx": 33}),
    ("z-image", {"hidden_states_layers": (1,)}),
])
def test_fingerprint_follows_template_dropped_tokens_and_layers(encoders, family, changes):
    encoder = encoders[family]
    before = model_fingerprint(encoder.fingerprint_parts())
    target = encoder.pipe if family == "qwen-image" else encoder
    saved = {name: getattr(target, name) for name in changes}
    try:
        for name, value in changes.items():
            setattr(target, name, value)
        assert model_fingerprint(encoder.fingerprint_parts()) != before
    finally:
        for name, value in saved.items():
            setattr(target, name, value)
    assert model_fingerprint(encoder.fingerprint_parts()) == before


def test_fingerprints_hold_what_changes_the_bytes(encoders):
    qwen = encoders["qwen-image"].fingerprint_parts()
    assert qwen["dropped_tokens"] == 34 and "{}" in qwen["prompt_template"] and qwen["tokenizer_max_length"] == 1024
    assert (qwen["default_max_sequence_length"], qwen["max_sequence_length_limit"]) == (512, 1024)
    z_image = encoders["z-image"].fingerprint_parts()
    assert z_image["hidden_states_layers"] == [2] and z_image["chat_template"] and z_image["enable_thinking"]
    sd3 = encoders["sd3"].fingerprint_parts()
    assert (sd3["clip_tokens"], sd3["default_max_sequence_length"], sd3["max_sequence_length_limit"]) == (77, 256, 512)
    assert "ftfy" in encoders["wan"].fingerprint_parts()
    fingerprints = {e.fingerprint for e in encoders.values()}
    assert len(fingerprints) == len(encoders)
    # The length is the request's half of a key.
    fingerprint = encoders["wan"].fingerprint
    assert embedding_key(fingerprint, 226, "a fox", None) != embedding_key(fingerprint, 512, "a fox", None)


def test_sd3_refuses_a_clip_tokenizer_of_another_length(tiny_models, tmp_path):
    from encoder_server.errors import SourceError

    folder = tmp_path / "sd3"
    shutil.copytree(tiny_models["sd3"], folder)
    config = folder / "tokenizer" / "tokenizer_config.json"
    document = json.loads(config.read_text())
    document["model_max_length"] = 64
    config.write_text(json.dumps(document))
    with pytest.raises(SourceError, match="model_max_length 64; SD3 transformers take 77"):
        get_encoder(str(folder))


@pytest.mark.parametrize("family", ["flux1", "wan"])
def test_the_server_answers_diffusers_execution_device_lookup_without_walking_its_encoders(tiny_models, family,
                                                                                           monkeypatch):
    """FLUX.1's and Wan's `encode_prompt` look up each text encoder's execution device on every call, walking all its
    submodules twice for offloading hooks; a server's encoders never have any. Same bytes, no walk."""
    import importlib
    from types import SimpleNamespace

    module = importlib.import_module({"flux1": "diffusers.pipelines.flux.pipeline_flux",
                                      "wan": "diffusers.pipelines.wan.pipeline_wan"}[family])
    encoder = get_encoder(str(tiny_models[family]))
    expected = encoder.encode(["a walked fox"], None, 32)
    node_side = torch.nn.Sequential(torch.nn.Linear(2, 2))
    node_side[0]._hf_hook = SimpleNamespace(execution_device="meta")  # a node's offloaded module: hooks decide

    def no_walk(self):
        raise AssertionError(f"walked {type(self).__name__}")

    with monkeypatch.context() as patched:
        patched.setattr(torch.nn.Module, "modules", no_walk)
        got = encoder.encode(["a walked fox"], None, 32)
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    assert module.get_module_execution_device(node_side) == torch.device("meta")
