"""The console behind the web page, without a browser: the same images as `promptcast generate` for every style,
LoRAs loaded once and switched, a bad LoRA reported while the rest works, failures that leave it usable, FLUX.2's
structured prompts and reference images, and Wan's videos (GIF, or MP4 with imageio-ffmpeg) as `generate` writes
them."""

from __future__ import annotations

import threading

import pytest
import torch
from PIL import Image

from conftest import wait_for
from denoiser_client import RemoteTextEncoder, media
from denoiser_client.errors import InvalidArgument, OutOfGpuMemory, ServerUnavailable
from denoiser_client.node import DenoiserNode
from denoiser_client.generate import generate
from denoiser_client.options import GenerateOptions
from denoiser_client.pipeline import load_denoiser
from denoiser_client.ui.console import Console, ConsoleRequest, form_facts
from denoiser_client.ui.styles import Style, load_styles
from encoder_server.families import get_encoder
from encoder_server.server import BackgroundServer, ModelSpec, ServerConfig
from test_operations import GatedEncoder
from ui_helpers import CALL, PROMPT, generated, make_styles

VIDEO = dict(steps=2, width=32, height=32)  # what every Wan test asks for (with its own frames and fps)


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
        (ask("base", num_frames=5), "Frames=5 is for video families (wan), and flux1 makes images: drop it"),
        (ask("base", fps=8), "FPS=8 is for video families (wan), and flux1 makes images: drop it"),
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
    for family in ("flux1", "flux2", "flux2-klein", "wan"):
        pipe, _ = load_denoiser(str(tiny_models[family]))
        facts[family] = form_facts(DenoiserNode(pipe))
    assert facts["flux1"].negative_prompt and facts["flux1"].true_cfg_scale == 1.0
    assert facts["flux1"].guidance == 3.5 and facts["flux1"].max_reference_images == 0
    assert not facts["flux1"].structured_prompts
    assert not facts["flux2"].negative_prompt and facts["flux2"].max_reference_images == 10
    assert facts["flux2"].structured_prompts and facts["flux2"].true_cfg_scale is None
    assert not facts["flux2-klein"].negative_prompt  # the tiny klein is distilled: no CFG, no negative prompt
    assert all(facts[f].media == "image" and facts[f].num_frames is None and facts[f].fps is None and not
               facts[f].video for f in ("flux1", "flux2", "flux2-klein"))
    wan = facts["wan"]
    assert wan.video and wan.media == "video" and wan.num_frames == 81 and wan.fps == 16  # WanPipeline's, 16 fps
    assert wan.guidance == 5.0 and wan.negative_prompt and wan.true_cfg_scale is None and not wan.structured_prompts


def test_flux2_structured_prompt_and_reference_images_as_in_generate(tiny_models, tmp_path):
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


@pytest.fixture(scope="module")
def wan_server(tiny_models):
    config = ServerConfig([ModelSpec(str(tiny_models["wan"]), name="tiny-wan")], port=0, cache_dir=None)
    with BackgroundServer(config) as server:
        yield server


@pytest.fixture(scope="module")
def wan_encoder(wan_server):
    with RemoteTextEncoder(wan_server.address, timeout=60) as encoder:
        yield encoder


@pytest.fixture(scope="module")
def wan_node(wan_encoder, tiny_models):
    """The console's node; `generate`'s reference renders on a node of its own (`wan_reference`)."""
    return DenoiserNode.load(wan_encoder, str(tiny_models["wan"]))


@pytest.fixture(scope="module")
def wan_reference(wan_encoder, tiny_models):
    return DenoiserNode.load(wan_encoder, str(tiny_models["wan"]))


def wan_generated(encoder, node, out, **options) -> bytes:
    """The file `promptcast generate` writes for the Wan console's request (`out`'s suffix picks MP4 or GIF)."""
    path, _ = generate(encoder, str(node.source), PROMPT, out, pipe=node, progress=False,
                       options=GenerateOptions(**{**VIDEO, **options}))
    return path.read_bytes()


def test_a_video_family_renders_the_gif_generate_writes(wan_encoder, wan_node, wan_reference, tmp_path, monkeypatch):
    monkeypatch.setattr(media, "mp4_encoder", lambda: None)  # no MP4 encoder: an animated GIF the browser shows
    console = Console(wan_node, wan_encoder, [Style("base")], tmp_path / "videos")
    assert console.suffix == ".gif"
    rendered = console.render(ConsoleRequest(prompt=PROMPT, seed=5, num_frames=9, fps=10, **VIDEO))
    assert rendered.path == tmp_path / "videos" / "00001-seed5.gif"
    assert (rendered.request.num_frames, rendered.request.fps, rendered.request.guidance) == (9, 10, 5.0)
    assert rendered.info().splitlines()[4] == "2 steps, 32x32, 9 frames at 10 fps, guidance 5"
    with Image.open(rendered.path) as gif:
        assert gif.n_frames == 9 and gif.info["duration"] == 100 and gif.size == (32, 32)  # 10 fps: 100 ms a frame
    assert rendered.path.read_bytes() == wan_generated(wan_encoder, wan_reference, tmp_path / "cli.gif", seed=5,
                                                       num_frames=9, fps=10)
    short = console.render(ConsoleRequest(prompt=PROMPT, seed=5, num_frames=5, **VIDEO))  # the default fps, 16
    assert (short.request.num_frames, short.request.fps) == (5, 16) and short.path.name == "00002-seed5.gif"
    with Image.open(short.path) as gif:
        assert gif.n_frames == 5 and gif.info["duration"] == 60  # 1000 // 16 ms, kept in hundredths
    assert short.path.read_bytes() == wan_generated(wan_encoder, wan_reference, tmp_path / "cli5.gif", seed=5,
                                                    num_frames=5)


def test_a_video_family_renders_the_mp4_generate_writes(wan_encoder, wan_node, wan_reference, tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    imageio = pytest.importorskip("imageio.v2")
    console = Console(wan_node, wan_encoder, [Style("base")], tmp_path / "videos")
    assert console.suffix == ".mp4"  # H.264 from imageio-ffmpeg's ffmpeg: the page's video player plays it
    rendered = console.render(ConsoleRequest(prompt=PROMPT, seed=5, num_frames=9, fps=8, **VIDEO))
    assert rendered.path == tmp_path / "videos" / "00001-seed5.mp4" and rendered.notes == ()
    with imageio.get_reader(rendered.path) as reader:
        assert reader.get_meta_data()["fps"] == 8 and reader.count_frames() == 9
        assert reader.get_data(0).shape == (32, 32, 3)
    assert rendered.path.read_bytes() == wan_generated(wan_encoder, wan_reference, tmp_path / "cli.mp4", seed=5,
                                                       num_frames=9, fps=8)


def test_bad_frames_and_fps_name_the_fields_and_leave_the_video_console_working(wan_encoder, wan_node, tmp_path):
    console = Console(wan_node, wan_encoder, [Style("base")], tmp_path)
    for fields, message in [
        (dict(num_frames=6), r"Frames=6 must be 4k\+1 from 1 to 1001 .*, e\.g\. 5"),
        (dict(num_frames=0), r"Frames=0 must be 4k\+1"),
        (dict(fps=0), "FPS=0 must be from 1 to 120 frames a second"),
    ]:
        with pytest.raises(InvalidArgument, match=message):
            console.render(ConsoleRequest(prompt=PROMPT, seed=5, **VIDEO, **fields))
    with pytest.raises(InvalidArgument, match="Prompt is empty: describe the video to make"):
        console.render(ConsoleRequest(prompt=" ", num_frames=5, **VIDEO))
    assert console.renders == 0
    assert console.render(ConsoleRequest(prompt=PROMPT, seed=5, num_frames=5, **VIDEO)).path.is_file()
