"""FLUX.2-dev and FLUX.2 klein through the split: server bytes, images, CFG negatives, handshake."""

import json

import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline
from PIL import Image

from denoiser_client import RemoteTextEncoder, errors
from denoiser_client.generate import generate
from denoiser_client.options import GenerateOptions
from denoiser_client.pipeline import handshake, load_denoiser, negative_prompt_for, remote_embeddings
from encoder_server.server import BackgroundServer, ModelSpec, ServerConfig
from shared.prompts import prompt_text
from conftest import no_grad_encode

PIPELINES = {"flux2": Flux2Pipeline, "flux2-klein": Flux2KleinPipeline}
STRUCTURED = {"scene": "a fox at dusk", "subjects": [{"type": "fox", "colour": "red"}],
              "color_palette": ["#ff6a00", "#1b2a49"], "camera": {"angle": "low", "lens": "35mm"}}


@pytest.fixture(scope="module")
def models(tiny_models):
    return {family: tiny_models[family] for family in PIPELINES}


@pytest.fixture(scope="module")
def server(models, tiny_flux1):
    specs = [ModelSpec(str(models["flux2"]), name="tiny-flux2"), ModelSpec(str(models["flux2-klein"]), name="klein"),
             ModelSpec(str(tiny_flux1), name="tiny-flux1")]
    with BackgroundServer(ServerConfig(specs, port=0)) as background:
        yield background


@pytest.fixture
def enc(server):
    with RemoteTextEncoder(server.address, timeout=120) as client:
        yield client


@pytest.mark.parametrize("family,name", [("flux2", "tiny-flux2"), ("flux2-klein", "klein")])
def test_server_embeddings_equal_encode_prompt(enc, models, family, name):
    reference = PIPELINES[family].from_pretrained(models[family])
    prompts = ["a red fox", "", "狐狸 🦊 café", " ".join(["a long prompt about foxes"] * 80),
               prompt_text(STRUCTURED)]
    got = enc.encode(prompts, name, max_sequence_length=64)["prompt_embeds"]
    expected, _ = no_grad_encode(reference, prompt=prompts, max_sequence_length=64)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(got, expected)


@pytest.mark.parametrize("family,name", [("flux2", "tiny-flux2"), ("flux2-klein", "klein")])
def test_split_image_equals_plain_pipeline(enc, models, family, name):
    reference = PIPELINES[family].from_pretrained(models[family])
    call = dict(num_inference_steps=2, width=32, height=32, max_sequence_length=64, output_type="np")
    expected = reference(prompt="a red fox", generator=torch.Generator().manual_seed(5), **call).images
    pipe, got_family = load_denoiser(str(models[family]))
    assert got_family == family and pipe.text_encoder is None and pipe.tokenizer is None
    handshake(pipe, family, enc.model_info(name))
    embeds = remote_embeddings(enc, name, "a red fox", max_sequence_length=64)
    got = pipe(**embeds, generator=torch.Generator().manual_seed(5), **call).images
    assert (got == expected).all()


def test_klein_base_cfg_fetches_the_negative_from_the_server(enc, models, tmp_path):
    """A klein *base* model (not distilled) runs CFG: its "" negative comes from the server too."""
    base = tmp_path / "klein-base"
    import shutil

    shutil.copytree(models["flux2-klein"], base)
    index = json.loads((base / "model_index.json").read_text())
    index["is_distilled"] = False
    (base / "model_index.json").write_text(json.dumps(index))
    reference = Flux2KleinPipeline.from_pretrained(base)
    call = dict(num_inference_steps=2, width=32, height=32, max_sequence_length=64, guidance_scale=4.0,
                output_type="np")
    expected = reference(prompt="a red fox", generator=torch.Generator().manual_seed(9), **call).images
    assert reference.do_classifier_free_guidance  # diffusers itself ran CFG with "" as the negative
    pipe, family = load_denoiser(str(base))
    negative = negative_prompt_for(pipe, family, None, guidance=4.0)
    assert negative == ""
    embeds = remote_embeddings(enc, "klein", "a red fox", negative_prompt=negative, max_sequence_length=64)
    assert set(embeds) == {"prompt_embeds", "negative_prompt_embeds"}
    got = pipe(**embeds, generator=torch.Generator().manual_seed(9), **call).images
    assert (got == expected).all()


def test_distilled_models_fetch_no_negative(enc, models):
    pipe, family = load_denoiser(str(models["flux2-klein"]))
    assert negative_prompt_for(pipe, family, "blurry", guidance=4.0) is None
    dev, dev_family = load_denoiser(str(models["flux2"]))
    with pytest.raises(errors.InvalidArgument, match="take no negative prompt"):
        negative_prompt_for(dev, dev_family, "blurry")


def test_generate_with_reference_images_and_structured_prompt(enc, models, tmp_path):
    refs = []
    for i, colour in enumerate(["red", "blue"]):
        refs.append(tmp_path / f"ref{i}.png")
        Image.new("RGB", (64, 64), colour).save(refs[-1])
    options = GenerateOptions(seed=1, steps=2, width=32, height=32, max_sequence_length=64,
                              reference_images=tuple(map(str, refs)))
    path, timings = generate(enc, str(models["flux2"]), json.dumps(STRUCTURED, indent=2), tmp_path / "out.png",
                             encoder_model="tiny-flux2", options=options, progress=False)
    assert Image.open(path).size == (32, 32)
    # The structured prompt was sent compactly: its key is that of the compact text.
    _, info = enc.encode(prompt_text(STRUCTURED), "tiny-flux2", max_sequence_length=64, with_info=True)
    assert info.cache_status == ["memory"]


def test_structured_prompt_text_is_compact_and_stable():
    assert prompt_text(STRUCTURED) == json.dumps(STRUCTURED, separators=(",", ":"), ensure_ascii=False)
    assert prompt_text(json.dumps(STRUCTURED, indent=4)) == prompt_text(STRUCTURED)
    assert prompt_text("{not json} a prompt") == "{not json} a prompt"


def test_a_flux1_server_cannot_feed_a_flux2_node(enc, models):
    pipe, family = load_denoiser(str(models["flux2"]))
    with pytest.raises(errors.IncompatibleModel, match="is flux1, but the local pipeline is flux2"):
        handshake(pipe, family, enc.model_info("tiny-flux1"))
    klein_info = enc.model_info("klein")
    with pytest.raises(errors.IncompatibleModel, match="is flux2-klein"):
        handshake(pipe, family, klein_info)


def test_widths_are_checked_within_a_family(enc, models):
    from denoiser_client.remote import ModelInfo, OutputInfo

    pipe, family = load_denoiser(str(models["flux2"]))
    real = enc.model_info("tiny-flux2")
    wide = ModelInfo(**{**real.__dict__, "outputs": (OutputInfo("prompt_embeds", torch.bfloat16, (512, 15360),
                                                                True),)})
    with pytest.raises(errors.IncompatibleModel, match=r"width 15360, but the local transformer's joint_attention_dim "
                                                       r"is 96"):
        handshake(pipe, family, wide)


def test_prompt_2_is_refused_for_single_encoder_families(enc):
    with pytest.raises(errors.InvalidArgument, match="'tiny-flux2' \\(flux2\\) has one text encoder"):
        enc.encode(["a fox"], "tiny-flux2", prompt_2=["another"])
