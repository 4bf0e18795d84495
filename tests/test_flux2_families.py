"""FLUX.2-dev and klein encoders: bit-identical to diffusers' `encode_prompt`, from a truncated text model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from encoder_server.errors import InvalidInput, SourceError
from encoder_server.families import get_encoder

FAMILIES = {"flux2": ("Flux2Pipeline", "Flux2Encoder", 31), "flux2-klein": ("Flux2KleinPipeline", "Flux2KleinEncoder", 28)}
PROMPTS = {
    "normal": ["a photo of a cat sitting on a wooden table next to a cup of coffee"],
    "empty": [""],
    "unicode": ["naïve café in 東京 at night, ünïcödé ✨ 🐱‍👤🚀"],
    "batch": ["a red fox in the snow", "", "an astronaut riding a horse 🐴", "a lighthouse in a storm, watercolor"],
}
OVERLONG = "a futuristic city at night with neon signs and flying cars " * 20


@pytest.fixture(scope="module")
def tiny_dirs(tiny_models):
    return {family: tiny_models[family] for family in FAMILIES}


@pytest.fixture(scope="module")
def encoders(tiny_dirs):
    return {family: get_encoder(str(path)) for family, path in tiny_dirs.items()}


@pytest.fixture(scope="module")
def pipelines(tiny_dirs):
    import diffusers

    return {family: getattr(diffusers, FAMILIES[family][0]).from_pretrained(path) for family, path in tiny_dirs.items()}


def reference(pipe, prompts, max_sequence_length):
    with torch.inference_mode():
        return pipe.encode_prompt(prompts, device=torch.device("cpu"), max_sequence_length=max_sequence_length)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_get_encoder_picks_family_from_model_index(encoders, family):
    assert type(encoders[family]).__name__ == FAMILIES[family][1]
    assert encoders[family].family == family


@pytest.mark.parametrize("case", PROMPTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_embeds_bit_identical_to_diffusers(encoders, pipelines, family, case):
    out = encoders[family].encode(PROMPTS[case], None, 48)
    assert set(out) == {"prompt_embeds"}
    assert torch.equal(out["prompt_embeds"], reference(pipelines[family], PROMPTS[case], 48))


@pytest.mark.parametrize("family", FAMILIES)
def test_overlong_prompt_is_truncated_like_diffusers(encoders, pipelines, family):
    assert len(encoders[family].tokenizer(OVERLONG).input_ids) > 64  # so truncation really happens
    out = encoders[family].encode([OVERLONG, "short"], None, 64)["prompt_embeds"]
    assert out.shape[1] == 64
    assert torch.equal(out, reference(pipelines[family], [OVERLONG, "short"], 64))


@pytest.mark.parametrize("family", FAMILIES)
def test_default_length_outputs_match_spec(encoders, pipelines, family):
    encoder = encoders[family]
    (spec,) = encoder.outputs
    prompts = PROMPTS["batch"][:2]
    out = encoder.encode(prompts, None, encoder.default_max_sequence_length)["prompt_embeds"]
    assert (spec.name, spec.dtype, spec.shape) == ("prompt_embeds", out.dtype, tuple(out.shape[1:]))
    assert out.shape == (2, 512, 3 * encoder.text_model.config.hidden_size)
    assert torch.equal(out, reference(pipelines[family], prompts, 512))


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_matches_diffusers_bf16(tiny_dirs, family):
    import diffusers

    encoder = get_encoder(str(tiny_dirs[family]), dtype=torch.bfloat16)
    pipe = getattr(diffusers, FAMILIES[family][0]).from_pretrained(tiny_dirs[family], dtype=torch.bfloat16)
    out = encoder.encode(PROMPTS["batch"], None, 32)["prompt_embeds"]
    assert out.dtype == encoder.outputs[0].dtype == torch.bfloat16
    assert torch.equal(out, reference(pipe, PROMPTS["batch"], 32))


@pytest.mark.parametrize("family", FAMILIES)
def test_text_model_stops_at_last_used_layer(encoders, pipelines, family):
    encoder, full = encoders[family], pipelines[family].text_encoder
    assert len(encoder.text_model.layers) == max(encoder.hidden_states_layers)
    assert full.config.get_text_config().num_hidden_layers == FAMILIES[family][2] > max(encoder.hidden_states_layers)
    names = {name for name, _ in encoder.text_encoder.named_modules()}
    assert not any("lm_head" in n or "vision_tower" in n or "multi_modal_projector" in n for n in names)
    assert sum(p.numel() for p in encoder.text_encoder.parameters()) < sum(p.numel() for p in full.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_loader_reads_only_the_tensors_it_keeps(tiny_dirs, monkeypatch, family):
    import transformers.modeling_utils as modeling_utils

    read = []
    real_safe_open = modeling_utils.safe_open

    class RecordingSlice:
        def __init__(self, key, real):
            self.key, self.real = key, real

        def __getitem__(self, index):  # what transformers calls to materialise a tensor
            read.append(self.key)
            return self.real[index]

        def __getattr__(self, name):
            return getattr(self.real, name)

    class RecordingFile:
        def __init__(self, *args, **kwargs):
            self.real = real_safe_open(*args, **kwargs)

        def get_slice(self, key):
            return RecordingSlice(key, self.real.get_slice(key))

        def __getattr__(self, name):
            return getattr(self.real, name)

    monkeypatch.setattr(modeling_utils, "safe_open", RecordingFile)
    encoder = get_encoder(str(tiny_dirs[family]))
    last = max(encoder.hidden_states_layers)
    assert read, "transformers no longer loads through safe_open slices: update this test"
    layer_ids = {int(key.split("layers.")[1].split(".")[0]) for key in read if "layers." in key}
    assert layer_ids == set(range(last))
    assert not [key for key in read if "lm_head" in key or "vision_tower" in key or "multi_modal" in key]


def _copy_encoder_folders(src, dst):
    dst.mkdir()
    shutil.copy(src / "model_index.json", dst)
    for sub in ("text_encoder", "tokenizer"):
        shutil.copytree(src / sub, dst / sub)
    return dst


def test_flux2_loads_in_memory_layout_sharded_checkpoint(tiny_dirs, pipelines, tmp_path):
    # transformers writes `language_model.model.*`; checkpoints saved otherwise hold `model.language_model.*`.
    folder = _copy_encoder_folders(tiny_dirs["flux2"], tmp_path / "flux2")
    te = folder / "text_encoder"
    state = load_file(te / "model.safetensors")
    renamed = {k.replace("language_model.model.", "model.language_model.", 1): v for k, v in state.items()}
    assert renamed.keys() != state.keys()
    (te / "model.safetensors").unlink()
    keys = sorted(renamed)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for shard, shard_keys in shards.items():
        save_file({k: renamed[k] for k in shard_keys}, te / shard, metadata={"format": "pt"})
    weight_map = {k: shard for shard, shard_keys in shards.items() for k in shard_keys}
    (te / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out = get_encoder(str(folder)).encode(PROMPTS["batch"], None, 32)["prompt_embeds"]
    assert torch.equal(out, reference(pipelines["flux2"], PROMPTS["batch"], 32))


def test_missing_layer_weights_raise_source_error(tiny_dirs, tmp_path):
    folder = _copy_encoder_folders(tiny_dirs["flux2-klein"], tmp_path / "klein")
    path = folder / "text_encoder" / "model.safetensors"
    state = load_file(path)
    save_file({k: v for k, v in state.items() if not k.startswith("model.layers.5.")}, path, metadata={"format": "pt"})
    with pytest.raises(SourceError, match="layers.5"):
        get_encoder(str(folder))


@pytest.mark.parametrize("family", FAMILIES)
def test_prompts_2_is_rejected_before_any_work(encoders, family):
    from encoder_server.service import EmbeddingService

    service = EmbeddingService()
    service.add(encoders[family])
    assert not encoders[family].takes_prompt_2
    with pytest.raises(InvalidInput, match="prompts_2 was given.*has one text encoder"):
        service.validate(encoders[family], ["a cat"], ["a dog"], 32)


@pytest.mark.parametrize("family", FAMILIES)
def test_fingerprint_covers_layers_template_and_lengths(encoders, family):
    encoder = encoders[family]
    parts = encoder.fingerprint_parts()
    assert parts["hidden_states_layers"] == list(encoder.hidden_states_layers)
    assert parts["chat_template"] == encoder.tokenizer.chat_template and parts["chat_template"]
    assert parts["default_max_sequence_length"] == parts["max_sequence_length_limit"] == 512
    if family == "flux2":
        from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

        assert parts["system_message"] == SYSTEM_MESSAGE
    assert len(encoder.fingerprint) == 64


def test_pixtral_processor_without_torchvision_uses_its_tokenizer(tiny_dirs, pipelines, tmp_path):
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torchvision is installed: the processor itself loads")
    folder = _copy_encoder_folders(tiny_dirs["flux2"], tmp_path / "flux2")
    index = json.loads((folder / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "PixtralProcessor"]  # as FLUX.2-dev's model_index.json names it
    (folder / "model_index.json").write_text(json.dumps(index))
    encoder = get_encoder(str(folder))
    assert encoder.fingerprint_parts()["tokenizer_class"] != "PixtralProcessor"
    out = encoder.encode(PROMPTS["unicode"], None, 32)["prompt_embeds"]
    assert torch.equal(out, reference(pipelines["flux2"], PROMPTS["unicode"], 32))
