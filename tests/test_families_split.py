"""SD3, Qwen-Image, Z-Image and Wan through the split: the server's bytes are diffusers' own, images (Wan: frames)
equal the plain pipeline's, negatives come from the server, the handshake and the cache keys hold."""

from __future__ import annotations

import hashlib
import json
import pathlib

import diffusers
import pytest
import torch

from conftest import assert_same, copy_model, run_cli
from denoiser_client import RemoteTextEncoder, errors
from denoiser_client.pipeline import handshake, load_denoiser, negative_prompt_for
from encoder_server.server import BackgroundServer, ModelSpec, ServerConfig
from shared.collate import batch_of, collate, rows_of

PIPELINES = {"sd3": diffusers.StableDiffusion3Pipeline, "qwen-image": diffusers.QwenImagePipeline,
             "z-image": diffusers.ZImagePipeline, "wan": diffusers.WanPipeline}
NAMES = {family: f"tiny-{family}" for family in PIPELINES}
PROMPTS = ["a red fox in the snow", "", "狐狸 🦊 café naïve", "a lighthouse in a storm at night " * 30,
           "a cat"]
# The call each test makes, CFG on, with the family's own guidance argument.
CALLS = {
    "sd3": dict(height=32, width=32, guidance_scale=4.0),
    "qwen-image": dict(height=32, width=32, true_cfg_scale=4.0),
    "z-image": dict(height=32, width=32, guidance_scale=3.0),
    "wan": dict(height=32, width=32, num_frames=5, guidance_scale=5.0),
}


@pytest.fixture(scope="module")
def models(tiny_models):
    return {family: tiny_models[family] for family in PIPELINES}


@pytest.fixture(scope="module")
def references(models):
    return {family: PIPELINES[family].from_pretrained(models[family]) for family in PIPELINES}


@pytest.fixture(scope="module")
def server(models):
    specs = [ModelSpec(str(models[family]), name=NAMES[family]) for family in PIPELINES]
    with BackgroundServer(ServerConfig(specs, port=0)) as background:
        yield background


@pytest.fixture
def enc(server):
    with RemoteTextEncoder(server.address, timeout=120) as client:
        yield client


@torch.no_grad()
def diffusers_embeds(pipe, family: str, prompts: list[str], length: int) -> dict:
    """What the pipeline's own encode gives: one call for the batch (Qwen-Image: one call per prompt, collated as a
    batch, since its batched encode pads, see `test_qwen_image_rows_do_not_depend_on_their_batch`; SD3: one call per
    prompt, since its pooled projection of several rows rounds otherwise, see
    `test_sd3_pooled_rows_do_not_depend_on_their_batch`)."""
    if family == "sd3":
        rows = [pipe.encode_prompt([p], None, None, do_classifier_free_guidance=False, max_sequence_length=length)
                for p in prompts]
        return {"prompt_embeds": torch.cat([r[0] for r in rows]),
                "pooled_prompt_embeds": torch.cat([r[2] for r in rows])}
    if family == "qwen-image":
        rows = [pipe.encode_prompt([p], max_sequence_length=length)[0][0] for p in prompts]
        return collate({"prompt_embeds": rows}, {"prompt_embeds": _pad()})
    if family == "z-image":  # a copy: ZImagePipeline writes the templated text into the list it is given
        return {"prompt_embeds": pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False,
                                                    max_sequence_length=length)[0]}
    return {"prompt_embeds": pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                                max_sequence_length=length)[0]}


def _pad():
    from shared.collate import PAD, Layout

    return Layout(PAD, mask="prompt_embeds_mask")


@pytest.mark.parametrize("length", [None, 48])
@pytest.mark.parametrize("family", PIPELINES)
def test_server_embeddings_equal_encode_prompt(enc, references, family, length):
    info = enc.model_info(NAMES[family])
    length = length or info.default_max_sequence_length
    got = enc.encode(PROMPTS, NAMES[family], max_sequence_length=length)
    assert_same(got, diffusers_embeds(references[family], family, PROMPTS, length))


def test_sd3_prompt_2_feeds_clip_g(enc, references):
    with torch.no_grad():
        rows = [references["sd3"].encode_prompt([p], [p2], None, do_classifier_free_guidance=False,
                                                max_sequence_length=32)
                for p, p2 in (("a fox", "a watercolor fox"), ("a cat", "an oil cat"))]
    got = enc.encode(["a fox", "a cat"], "tiny-sd3", prompt_2=["a watercolor fox", "an oil cat"],
                     max_sequence_length=32)
    assert_same(got, {"prompt_embeds": torch.cat([r[0] for r in rows]),
                       "pooled_prompt_embeds": torch.cat([r[2] for r in rows])})
    assert got["prompt_embeds"].shape == (2, 77 + 32, 96)


def test_sd3_pooled_rows_do_not_depend_on_their_batch(enc, references):
    """CLIP's pooled projection of several rows rounds differently from one row's, in diffusers' own batched encode;
    the server projects each prompt alone, so a row equals that prompt's own call and one cache entry serves all."""
    prompts = ["a cat", "a lighthouse in a storm at night, waves breaking over the rocks, gulls"]
    with torch.no_grad():
        alone = references["sd3"].encode_prompt(prompts[:1], None, None, do_classifier_free_guidance=False,
                                                max_sequence_length=32)[2]
    got = enc.encode(prompts[::-1], "tiny-sd3", max_sequence_length=32)
    assert torch.equal(got["pooled_prompt_embeds"][1], alone[0])


def test_qwen_image_rows_do_not_depend_on_their_batch(enc, references):
    """diffusers pads a batch to its longest prompt, which moves the last bits of the shorter ones; the server's rows
    are each prompt's own, whichever prompts share its call, and one cache entry serves them all."""
    alone, first = enc.encode(["a cat"], "tiny-qwen-image", max_sequence_length=64, with_info=True, collated=False)
    mixed, second = enc.encode(["a cat", PROMPTS[3], "a cat sat"], "tiny-qwen-image", max_sequence_length=64,
                               with_info=True, collated=False)
    lengths = [t.shape[0] for t in mixed["prompt_embeds"]]
    assert lengths[0] == alone["prompt_embeds"][0].shape[0] < lengths[2] < lengths[1] == 64
    assert torch.equal(alone["prompt_embeds"][0], mixed["prompt_embeds"][0])
    assert second.cache_keys[0] == first.cache_keys[0] and second.cache_status[0] == "memory"
    with torch.no_grad():
        batched, mask = references["qwen-image"].encode_prompt(["a cat", "a cat"], max_sequence_length=64)
    assert mask is None and torch.equal(batched[0], alone["prompt_embeds"][0])  # no padding: diffusers' batch too


@pytest.mark.parametrize("family", PIPELINES)
def test_negatives_come_from_the_server_and_equal_the_pipelines(enc, references, models, family):
    pipe, got_family = load_denoiser(str(models[family]))
    assert got_family == family and pipe.text_encoder is None and pipe.tokenizer is None
    call = CALLS[family]
    guidance, true_cfg = call.get("guidance_scale"), call.get("true_cfg_scale")
    assert negative_prompt_for(pipe, family, "blurry", guidance=guidance, true_cfg_scale=true_cfg) == "blurry"
    if family == "qwen-image":  # true CFG only with a negative prompt
        assert negative_prompt_for(pipe, family, None, true_cfg_scale=true_cfg) is None
    else:  # CFG with "" as the default negative prompt; none once guidance is off
        assert negative_prompt_for(pipe, family, None, guidance=guidance) == ""
        assert negative_prompt_for(pipe, family, "blurry", guidance=0.0 if family == "z-image" else 1.0) is None
    reference = references[family]
    with torch.no_grad():
        if family == "sd3":
            _, negative, _, negative_pooled = reference.encode_prompt(
                "a fox", None, None, negative_prompt="blurry", max_sequence_length=32)
            want = {"prompt_embeds": negative, "pooled_prompt_embeds": negative_pooled}
        elif family == "wan":
            want = {"prompt_embeds": reference.encode_prompt("a fox", negative_prompt="blurry",
                                                             max_sequence_length=32)[1]}
        elif family == "z-image":
            want = {"prompt_embeds": reference.encode_prompt(["a fox"], negative_prompt=["blurry"],
                                                             max_sequence_length=32)[1]}
        else:
            want = diffusers_embeds(reference, family, ["blurry"], 32)
    assert_same(enc.encode(["blurry"], NAMES[family], max_sequence_length=32), want)


@pytest.mark.parametrize("family", PIPELINES)
def test_split_output_equals_plain_pipeline(enc, references, models, family):
    """One request for the prompt and its negative; each group batched on its own, as the pipeline encodes them."""
    call = dict(CALLS[family], num_inference_steps=2, max_sequence_length=32, output_type="np")
    plain = references[family](prompt="a red fox", negative_prompt="blurry",
                               generator=torch.Generator().manual_seed(11), **call)
    pipe, _ = load_denoiser(str(models[family]))
    info = enc.model_info(NAMES[family])
    handshake(pipe, family, info)
    rows = rows_of(enc.encode(["a red fox", "blurry"], info.name, max_sequence_length=32, collated=False))
    embeds = {**collate(batch_of(rows[:1]), info.layouts), **collate(batch_of(rows[1:]), info.layouts,
                                                                     prefix="negative_")}
    split = pipe(**embeds, generator=torch.Generator().manual_seed(11), **call)
    if family == "wan":
        assert split.frames.shape == plain.frames.shape == (1, 5, 32, 32, 3)
        assert (split.frames == plain.frames).all()
    else:
        assert split.images.shape == plain.images.shape == (1, 32, 32, 3)
        assert (split.images == plain.images).all()


@pytest.mark.parametrize("family", PIPELINES)
def test_handshake_refuses_a_mismatched_width(enc, models, family):
    from denoiser_client.remote import ModelInfo, OutputInfo
    from shared.families import FAMILIES

    pipe, _ = load_denoiser(str(models[family]))
    real = enc.model_info(NAMES[family])
    handshake(pipe, family, real)
    name, key = next(iter(FAMILIES[family].embedding_widths.items()))
    spec = real.output(name)
    wide = OutputInfo(spec.name, spec.dtype, (*spec.shape[:-1], 4096), spec.per_token, spec.fixed_tokens, spec.layout)
    wider = ModelInfo(**{**real.__dict__, "outputs": tuple(wide if o.name == name else o for o in real.outputs)})
    with pytest.raises(errors.IncompatibleModel, match=rf"width 4096, but the local transformer's {key} is "
                                                       rf"{pipe.transformer.config[key]}"):
        handshake(pipe, family, wider)
    other = next(f for f in PIPELINES if f != family)
    with pytest.raises(errors.IncompatibleModel, match=f"is {other}, but the local pipeline is {family}"):
        handshake(pipe, family, enc.model_info(NAMES[other]))


def test_model_info_describes_each_layout(enc):
    infos = {family: enc.model_info(NAMES[family]) for family in PIPELINES}
    sd3 = infos["sd3"].output("prompt_embeds")
    assert (sd3.shape, sd3.per_token, sd3.fixed_tokens, sd3.layout.collate) == ((77 + 256, 96), True, 77, "stack")
    qwen = infos["qwen-image"].output("prompt_embeds")
    assert (qwen.shape, qwen.layout.collate, qwen.layout.mask) == ((512, 24), "pad", "prompt_embeds_mask")
    assert infos["qwen-image"].max_max_sequence_length == 1024
    assert infos["z-image"].output("prompt_embeds").layout.collate == "list"
    assert infos["wan"].output("prompt_embeds").shape == (512, 40)


@pytest.mark.parametrize("family", PIPELINES)
def test_cache_keys_follow_length(enc, family):
    _, short = enc.encode(["a fresh fox"], NAMES[family], max_sequence_length=16, with_info=True)
    _, again = enc.encode(["a fresh fox"], NAMES[family], max_sequence_length=16, with_info=True)
    _, longer = enc.encode(["a fresh fox"], NAMES[family], max_sequence_length=24, with_info=True)
    assert short.cache_status == ["miss"] and again.cache_status == ["memory"]
    assert short.cache_keys == again.cache_keys != longer.cache_keys


def test_the_local_cache_keeps_variable_rows(server, tmp_path):
    with RemoteTextEncoder(server.address, timeout=120, cache_dir=tmp_path) as client:
        first = client.encode(["a cached fox", "a dog"], "tiny-qwen-image", max_sequence_length=32)
        mixed, info = client.encode(["a dog", "a new cat", "a cached fox"], "tiny-qwen-image", max_sequence_length=32,
                                    with_info=True)
    assert info.cache_status[0] == info.cache_status[2] == "local"
    n = int(first["prompt_embeds_mask"][1].sum())
    assert torch.equal(mixed["prompt_embeds"][0, :n], first["prompt_embeds"][1, :n])
    assert int(mixed["prompt_embeds_mask"][0].sum()) == n


@pytest.mark.parametrize("family", PIPELINES)
def test_server_never_reads_transformer_or_vae(models, tmp_path, family):
    from encoder_server.families import get_encoder

    encoders_only = copy_model(models[family], tmp_path / "m", drop=("transformer", "vae", "scheduler"))
    encoder = get_encoder(str(encoders_only))
    assert encoder.family == family and encoder.pipe.transformer is None and encoder.pipe.vae is None


def _digest(root: pathlib.Path) -> dict:
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*")) if f.is_file()}


@pytest.mark.parametrize("family", PIPELINES)
def test_make_tiny_model_command(models, tmp_path, capsys, family):
    """The `make-tiny-model` command (the CLI's own parsing and entry point, in this process), seed 0 as the
    session's: the same bytes."""
    from promptcast.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["make-tiny-model", str(tmp_path / family), "--family", family])
    assert exit.value.code == 0 and capsys.readouterr().out.strip() == str(tmp_path / family)
    assert _digest(tmp_path / family) == _digest(models[family])


def test_make_tiny_model_through_the_cli(tmp_path):
    result = run_cli("make-tiny-model", tmp_path / "q", "--family", "qwen-image")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "q" / "model_index.json").read_text())["_class_name"] == "QwenImagePipeline"
