"""The console behind the web page, without a browser: the same images as `promptcast generate` for every style,
LoRAs loaded once and switched, a bad LoRA reported while the rest works, failures that leave it usable, FLUX.2's
structured prompts and reference images."""

from __future__ import annotations

import threading

import pytest
import torch
from PIL import Image

from conftest import wait_for
from denoiser_client import RemoteTextEncoder
from denoiser_client.errors import InvalidArgument, OutOfGpuMemory, ServerUnavailable
from denoiser_client.node import DenoiserNode
from denoiser_client.options import GenerateOptions
from denoiser_client.pipeline import load_denoiser
from denoiser_client.ui.console import Console, ConsoleRequest, form_facts
from denoiser_client.ui.styles import Style, load_styles
from encoder_server.families import get_encoder
from encoder_server.server import BackgroundServer, ModelSpec, ServerConfig
from test_operations import GatedEncoder
from ui_helpers import CALL, PROMPT, generated, make_styles


@pytest.fixture(scope="module")
def styles(tiny_flux1, tmp_path_factory):
    return make_styles(tiny_flux1, tmp_path_factory.mktemp("styles"))


@pytest.fixture(scope="module")
def reference_node(flux1_server, tiny_flux1):
    """A node of its own for the expected images (`promptcast generate`'s path), never the console's."""
    with RemoteTextEncoder(flux1_server.address, timeout=60) as encoder:
        yield DenoiserNode.load(encoder, str(tiny_flux1))


@pytest.fixture
def console(flux1_server, tiny_flux1, styles, tmp_path):
    encoder = RemoteTextEncoder(flux1_server.address, timeout=60)
    node = DenoiserNode.load(encoder, str(tiny_flux1))
    console = Console(node, encoder, load_styles(styles["file"]), tmp_path / "images")
    console.load_styles()
    yield console
    console.encoder.close()


def ask(style: str, seed: int = 7, **fields) -> ConsoleRequest:
    return ConsoleRequest(style=style, seed=seed, **{"prompt": PROMPT, **CALL, **fields})


def test_every_style_gives_generates_image_and_switching_never_reloads(console, styles, reference_node, client,
                                                                       tmp_path):
    assert console.style_names == ["base", "ink", "mix"]  # "broken" is off, the others work
    assert len(console.problems) == 1 and "style 'broken' is off" in console.problems[0]
    assert "made for another architecture" in console.problems[0] and styles["wrong"] in console.problems[0]
    loads = []
    pipe = console.node.pipe
    original = pipe.load_lora_weights
    pipe.load_lora_weights = lambda *a, **k: loads.append(a) or original(*a, **k)
    expected = {style: generated(client, reference_node, styles, style, 7, tmp_path / f"{style}.png")
                for style in ("base", "ink", "mix")}
    assert len(set(expected.values())) == 3  # each style really changes the image
    for style in ("base", "ink", "mix", "base", "ink", "ink", "mix", "base"):
        rendered = console.render(ask(style))
        assert rendered.path.read_bytes() == expected[style], style
    assert loads == [] and console.node.pipe is pipe  # loaded once at start, switched with set_adapters only
    assert console.node.adapters.switches == 6  # base -> ink -> mix -> base -> ink (ink again: none) -> mix -> base


def test_info_says_seed_style_cache_and_time_and_a_random_seed_is_reproducible(console, styles, reference_node,
                                                                               client, tmp_path):
    steps = []
    first = console.render(ask("ink", seed=-1, prompt=f"{PROMPT} at noon"), progress=lambda *s: steps.append(s))
    assert steps == [(1, 2), (2, 2)]
    seed = first.request.seed
    assert 0 <= seed < 2**32
    info = first.info().splitlines()
    assert info[0] == f"seed {seed}" and info[1].startswith("style ink (ink 0.8)")
    assert info[2] == "embedding encoded (cache miss)" and info[3].startswith("encode ")
    assert "/ transfer " in info[3] and "/ denoise " in info[3] and "/ decode " in info[3]
    again = console.render(ask("ink", seed=seed, prompt=f"{PROMPT} at noon"))
    assert again.info().splitlines()[2] == "embedding hit (memory)"
    assert again.path.read_bytes() == first.path.read_bytes() == generated(
        client, reference_node, styles, "ink", seed, tmp_path / "ink.png", prompt=f"{PROMPT} at noon")


def test_bad_values_and_out_of_memory_leave_the_console_working(console, monkeypatch):
    for request, message in [
        (ask("base", width=40), "Width=40 must be a positive multiple of 16"),
        (ask("base", seed=-5), "Seed=-5 must be -1 (a random seed) or a whole number"),
        (ask("base", prompt="  "), "Prompt is empty"),
        (ask("sepia"), "Style 'sepia' is not one of this console's: base, ink, mix"),
    ]:
        with pytest.raises((InvalidArgument, ValueError), match=message.replace("(", r"\(").replace(")", r"\)")):
            console.render(request)
    transformer = console.node.pipe.transformer
    forward = transformer.forward

    def out_of_memory(*args, **kwargs):
        monkeypatch.setattr(transformer, "forward", forward)  # once
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(transformer, "forward", out_of_memory)
    with pytest.raises(OutOfGpuMemory, match="out of GPU memory with memory plan full at 32x32"):
        console.render(ask("mix"))
    assert console.render(ask("mix")).path.is_file() and console.renders == 1


def test_a_server_not_serving_is_a_clear_error_and_the_next_render_after_it_serves_works(
        tiny_flux1, console, tmp_path):
    gate = threading.Event()
    config = ServerConfig([ModelSpec("unused")], port=0, cache_dir=None)
    background = BackgroundServer(config, encoders=[GatedEncoder(get_encoder(str(tiny_flux1), name="tiny-flux1"),
                                                                 gate)])
    started = background.begin()  # bound, NOT_SERVING until its warm-up encode passes the gate
    address = f"127.0.0.1:{background.server.port}"
    connect = lambda: RemoteTextEncoder(address, timeout=30, retries=2, backoff=0.05)  # noqa: E731
    warming = Console(console.node, connect(), [Style("base")], tmp_path, connect=connect)
    try:
        assert wait_for(lambda: "not serving" in warming.encoder_line())
        assert f"Encoder server {address} not serving" in warming.encoder_line()
        with pytest.raises(ServerUnavailable, match="up but not serving"):
            warming.render(ask("base"))
        gate.set()
        started.result(30)
        assert wait_for(lambda: "serving · models: tiny-flux1 (flux1)" in warming.encoder_line())
        assert warming.render(ask("base")).path.is_file()
    finally:
        gate.set()
        background.stop()
        warming.encoder.close()


def test_form_facts_follow_the_family(tiny_models):
    facts = {}
    for family in ("flux1", "flux2", "flux2-klein"):
        pipe, _ = load_denoiser(str(tiny_models[family]))
        facts[family] = form_facts(DenoiserNode(pipe))
    assert facts["flux1"].negative_prompt and facts["flux1"].true_cfg_scale == 1.0
    assert facts["flux1"].guidance == 3.5 and facts["flux1"].max_reference_images == 0
    assert not facts["flux1"].structured_prompts
    assert not facts["flux2"].negative_prompt and facts["flux2"].max_reference_images == 10
    assert facts["flux2"].structured_prompts and facts["flux2"].true_cfg_scale is None
    assert not facts["flux2-klein"].negative_prompt  # the tiny klein is distilled: no CFG, no negative prompt


def test_flux2_structured_prompt_and_reference_images_as_in_generate(tiny_models, tmp_path):
    from denoiser_client.generate import generate

    source = str(tiny_models["flux2"])
    reference = tmp_path / "ref.png"
    Image.new("RGB", (64, 64), (200, 40, 10)).save(reference)
    prompt = '{"scene": "a fox at dusk", "colour_palette": ["#ff6a00"]}'
    config = ServerConfig([ModelSpec(source, name="tiny-flux2")], port=0, cache_dir=None)
    with BackgroundServer(config) as server, RemoteTextEncoder(server.address, timeout=60) as encoder:
        node = DenoiserNode.load(encoder, source)
        console = Console(node, encoder, [Style("base"), Style("poster", prompt="a poster of {prompt}")], tmp_path)
        console.load_styles()
        rendered = console.render(ConsoleRequest(prompt=prompt, style="poster", seed=3, steps=2, width=32, height=32,
                                                 reference_images=(str(reference),)))
        assert "its prompt template is not applied to a structured (JSON) prompt" in rendered.info()
        with pytest.raises(InvalidArgument, match="flux2 takes no negative prompt"):
            console.render(ConsoleRequest(prompt="x", negative_prompt="blurry", steps=2, width=32, height=32))
        expected, _ = generate(encoder, source, prompt, tmp_path / "cli.png", pipe=DenoiserNode.load(encoder, source),
                               options=GenerateOptions(seed=3, steps=2, width=32, height=32,
                                                       reference_images=(str(reference),)), progress=False)
    assert rendered.path.read_bytes() == expected.read_bytes()
