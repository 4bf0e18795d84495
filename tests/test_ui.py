"""`promptcast ui` in a real browser: headless Chromium (Debian's `chromium`, launched by Playwright; nothing downloads
a browser) drives the page by its visible labels against a real encoder server and the tiny FLUX.1 model (and the tiny
Wan model for video). The images the page shows are fetched from it and compared byte for byte with `promptcast
generate`'s (a video: with the file the console wrote)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import free_port, run_cli
from denoiser_client import RemoteTextEncoder
from denoiser_client.node import DenoiserNode
from denoiser_client.ui.styles import Style, load_styles
from encoder_server.server import BackgroundServer, ModelSpec, ServerConfig
from ui_helpers import PROMPT, generated, make_styles

CHROMIUM = os.environ.get("PROMPTCAST_CHROMIUM", "/usr/bin/chromium")
TIMEOUT_MS = 20_000  # any one wait on the page


def _missing() -> str | None:
    import importlib.util

    for module, install in (("gradio", "pip install -e '.[ui]'"), ("playwright", "pip install -e '.[test]'")):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed ({install})"
    if not Path(CHROMIUM).is_file():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set PROMPTCAST_CHROMIUM)"
    return None


if (_reason := _missing()) is not None:
    if os.environ.get("PROMPTCAST_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{_reason}, and PROMPTCAST_REQUIRE_BROWSER=1", pytrace=False)
    pytest.skip(_reason, allow_module_level=True)

from playwright.sync_api import expect, sync_playwright  # noqa: E402

from denoiser_client.ui.page import start_console  # noqa: E402

expect.set_options(timeout=TIMEOUT_MS)


class EncoderServer:
    """A real in-process encoder server that can be stopped and started again on the same port."""

    def __init__(self, model, name: str = "tiny-flux1"):
        self.model, self.name, self.port, self.background = str(model), name, 0, None

    def start(self) -> "EncoderServer":
        config = ServerConfig([ModelSpec(self.model, name=self.name)], port=self.port, cache_dir=None)
        self.background = BackgroundServer(config).start()
        self.port = self.background.port
        return self

    def stop(self) -> None:
        self.background.stop()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def server(tiny_flux1):
    server = EncoderServer(tiny_flux1).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def styles(tiny_flux1, tmp_path_factory):
    return make_styles(tiny_flux1, tmp_path_factory.mktemp("styles"))


@pytest.fixture(scope="module")
def expected(server, tiny_flux1, styles, tmp_path_factory):
    """`expected(style, seed, steps=2)`: the PNG bytes `promptcast generate` writes, from a node of its own."""
    folder = tmp_path_factory.mktemp("expected")
    encoder = RemoteTextEncoder(server.address, timeout=60)
    node = DenoiserNode.load(encoder, str(tiny_flux1))
    made = {}

    def image(style: str, seed: int, steps: int = 2) -> bytes:
        key = (style, seed, steps)
        if key not in made:
            made[key] = generated(encoder, node, styles, style, seed, folder / f"{style}-{seed}-{steps}.png",
                                  steps=steps)
        return made[key]

    yield image
    encoder.close()


@pytest.fixture(scope="module")
def console(server, tiny_flux1, styles, tmp_path_factory):
    connect = lambda: RemoteTextEncoder(server.address, timeout=30, retries=2, backoff=0.1)  # noqa: E731
    encoder = connect()
    node = DenoiserNode.load(encoder, str(tiny_flux1))
    page, console, url = start_console(node, encoder, load_styles(styles["file"]),
                                       out_dir=tmp_path_factory.mktemp("images"), port=free_port(), connect=connect)
    yield console, url
    page.close()
    console.encoder.close()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


def open_page(browser, url):
    page = browser.new_context(viewport={"width": 1200, "height": 1000}).new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.requested = []  # every URL the page asked for: nothing may come from outside the node
    page.on("request", lambda request: page.requested.append(request.url))
    page.goto(url)
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()
    return page


def fill(page, *, style: str = "base", seed: int = 7, prompt: str = PROMPT, steps=2, width=32, height=32):
    page.get_by_label("Prompt").fill(prompt)
    page.get_by_label("Style").click()
    page.get_by_role("option", name=style, exact=True).click()
    expect(page.get_by_label("Style")).to_have_value(style)
    page.get_by_label("Seed").fill(str(seed))
    for label, value in (("Steps", steps), ("Width", width), ("Height", height), ("Guidance", 3.5)):
        box = page.get_by_label(label)
        box.fill(str(value))
        box.press("Enter")


def thumbnails(page):
    return page.get_by_label("History").locator("img")


def generate(page) -> bytes:
    """Press Generate, wait for the new history entry, and return the PNG the page shows as "Result"."""
    before = thumbnails(page).count()
    page.get_by_role("button", name="Generate").click()
    expect(thumbnails(page)).to_have_count(before + 1)
    return shown(page)


def shown(page) -> bytes:
    src = page.get_by_label("Result").locator("img").get_attribute("src")
    return page.request.get(src).body()


def info(page) -> str:
    return page.get_by_label("Info").input_value()


def test_generate_switch_styles_back_to_base_and_history(browser, console, server, styles, expected, tiny_flux1,
                                                         tmp_path):
    ink = styles["loras"]["ink"][0]
    with ThreadPoolExecutor(1) as pool:  # the command line's image, made while the browser works
        cli = pool.submit(run_cli, "generate", "--encoder", server.address, "--model", tiny_flux1, "--device", "cpu",
                          "--prompt", f"{PROMPT}, ink wash", "--out", tmp_path / "cli.png", "--seed", 7, "--steps", 2,
                          "--width", 32, "--height", 32, "--guidance", 3.5, "--lora", f"{ink.path}:{ink.weight}")
        page = open_page(browser, console[1])
        expect(page.get_by_label("Encoder server")).to_have_value(
            re.compile(rf"Encoder server {server.address} serving · models: tiny-flux1 \(flux1\)"))
        expect(page.get_by_text("style 'broken' is off")).to_be_visible()  # and the others work
        page.get_by_label("Style").click()
        options = [text.split("\n")[-1] for text in page.get_by_role("option").all_inner_texts()]  # "✓\nbase"
        assert options == ["base", "ink", "mix"]
        page.keyboard.press("Escape")

        images = {}
        for style in ("base", "ink", "mix"):
            fill(page, style=style)
            images[style] = generate(page)
            assert images[style] == expected(style, 7), style
            lines = info(page).splitlines()
            assert lines[0] == "seed 7" and lines[1].startswith(f"style {style}"), lines
            assert lines[2].startswith("embedding ") and re.match(
                r"encode [\d.]+s / transfer [\d.]+s / denoise [\d.]+s / decode [\d.]+s", lines[3]), lines
        assert len(set(images.values())) == 3
        fill(page, style="base")
        assert generate(page) == images["base"]  # back to base: bit for bit
        fill(page, style="ink")
        assert generate(page) == images["ink"]  # the same style twice: the same image
        if os.environ.get("PROMPTCAST_UI_SCREENSHOT"):  # README's docs/ui.png
            page.screenshot(path=os.environ["PROMPTCAST_UI_SCREENSHOT"], full_page=True)

        fill(page, style="mix", seed=-1)
        random_image = generate(page)
        drawn = int(re.match(r"seed (\d+)\n", info(page)).group(1))
        assert random_image == expected("mix", drawn)

        done = cli.result()
        assert done.returncode == 0, done.stderr
        assert images["ink"] == (tmp_path / "cli.png").read_bytes()  # exactly `promptcast generate`'s file

    expect(thumbnails(page)).to_have_count(6)
    thumbnails(page).nth(4).click()  # newest first: the second image, "ink" with seed 7
    expect(page.get_by_label("Style")).to_have_value("ink")
    expect(page.get_by_label("Seed")).to_have_value("7")
    expect(page.get_by_label("Prompt")).to_have_value(PROMPT)
    expect(page.get_by_label("Info")).to_have_value(re.compile(r"^seed 7\nstyle ink"))
    assert shown(page) == images["ink"]
    assert generate(page) == images["ink"]  # the form filled from history makes that image again
    outside = [url for url in page.requested if not url.startswith((console[1], "data:", "blob:"))]
    assert page.requested and outside == []


def test_two_sessions_at_once_each_get_their_own_style(browser, console, expected):
    first, second = open_page(browser, console[1]), open_page(browser, console[1])
    fill(first, style="mix", seed=11, steps=4)
    fill(second, style="base", seed=11)
    first.get_by_role("button", name="Generate").click()
    second.get_by_role("button", name="Generate").click()  # queued behind the first
    for page in (first, second):
        expect(thumbnails(page)).to_have_count(1)  # each session has its own history
    assert shown(first) == expected("mix", 11, steps=4)
    assert shown(second) == expected("base", 11)


def test_encoder_server_down_then_back(browser, console, server, expected):
    page = open_page(browser, console[1])
    fill(page, style="ink", seed=5)
    server.stop()
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_label("Info")).to_have_value(re.compile(
        rf"^error: no encoder server answered at {re.escape(server.address)}"))
    assert "press Generate again once the encoder server is back" in info(page)
    expect(page.get_by_label("Encoder server")).to_have_value(re.compile("unreachable"))
    assert thumbnails(page).count() == 0
    server.start()  # the same port
    assert generate(page) == expected("ink", 5)
    expect(page.get_by_label("Encoder server")).to_have_value(re.compile(f"{re.escape(server.address)} serving"))


def test_the_promptcast_ui_command_prints_its_url_and_serves_the_page(browser, server, styles, expected, tiny_flux1,
                                                                     tmp_path):
    port, log = free_port(), tmp_path / "stderr.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "promptcast", "ui", "--encoder", server.address, "--model",
                                 str(tiny_flux1), "--styles", str(styles["file"]), "--port", str(port), "--device",
                                 "cpu", "--out-dir", str(tmp_path / "images")],
                                stdout=subprocess.PIPE, stderr=stderr, text=True)
    reader = ThreadPoolExecutor(1)
    try:
        line = reader.submit(proc.stdout.readline).result(timeout=120)  # its one line, once the page is served
        assert line.startswith(f"promptcast ui: http://127.0.0.1:{port}/ (styles: base, ink, mix; images in "), \
            (line, proc.poll(), log.read_text()[-2000:])
        page = open_page(browser, f"http://127.0.0.1:{port}/")
        fill(page, style="mix", seed=3)
        assert generate(page) == expected("mix", 3)
        assert len(list((tmp_path / "images").glob("*.png"))) == 1
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        reader.shutdown(wait=False)
    err = log.read_text()
    assert code == 0, err[-2000:]
    assert "warning: style 'broken' is off: LoRA file" in err and "Traceback" not in err


def test_the_form_offers_what_the_model_takes(tiny_models, tmp_path):
    from types import SimpleNamespace

    from denoiser_client.pipeline import load_denoiser
    from denoiser_client.ui.console import Console
    from denoiser_client.ui.page import build_page

    labels, texts = {}, {}
    for family in ("flux1", "flux2", "wan"):
        pipe, _ = load_denoiser(str(tiny_models[family]))
        encoder = RemoteTextEncoder(f"127.0.0.1:{free_port()}", timeout=1)  # asked only once a page opens
        node = DenoiserNode(pipe, info=SimpleNamespace(name=f"tiny-{family}", family=family))
        page = build_page(Console(node, encoder, [Style("base")], tmp_path))
        labels[family] = {getattr(block, "label", None) for block in page.blocks.values()} - {None}
        texts.update({block.label: f"{block.label} {getattr(block, 'info', None) or ''}".lower()
                      for block in page.blocks.values() if getattr(block, "label", None)})
        encoder.close()
    common = {"Encoder server", "Prompt", "Style", "Seed", "Steps", "Width", "Height", "Guidance", "Result", "Info",
              "History"}
    assert labels["flux1"] == common | {"Negative", "True CFG scale"}
    assert labels["flux2"] == common | {"Reference images"}  # guidance-distilled: no negative prompt
    assert labels["wan"] == common | {"Negative", "Frames", "FPS"}
    texts["Generate"] = "generate"
    assert [(a, b) for a in texts for b in texts if a != b and a.lower() in texts[b]] == []  # labels and hints


def test_progress_while_denoising_and_a_bad_size_leave_the_page_working(browser, console, expected, monkeypatch):
    page = open_page(browser, console[1])
    transformer = console[0].node.pipe.transformer
    forward = transformer.forward

    def slow(*args, **kwargs):  # long enough a step for the page to show where it is
        time.sleep(0.4)
        return forward(*args, **kwargs)

    monkeypatch.setattr(transformer, "forward", slow)
    fill(page, style="ink", seed=9, steps=4)
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_text(re.compile(r"denoising"))).to_be_visible()
    expect(thumbnails(page)).to_have_count(1)
    assert shown(page) == expected("ink", 9, steps=4)
    monkeypatch.setattr(transformer, "forward", forward)

    fill(page, style="base", seed=9, width=40)
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_label("Info")).to_have_value("error: Width=40 must be a positive multiple of 16 (e.g. 32)")
    fill(page, style="base", seed=9)
    assert generate(page) == expected("base", 9)


def test_a_video_family_shows_its_video_and_history_brings_back_its_frames(browser, tiny_models, tmp_path):
    server = EncoderServer(tiny_models["wan"], name="tiny-wan").start()
    encoder = RemoteTextEncoder(server.address, timeout=60)
    node = DenoiserNode.load(encoder, str(tiny_models["wan"]))
    served, console, url = start_console(node, encoder, [Style("base")], out_dir=tmp_path / "videos", port=free_port())
    tag = "video" if console.suffix == ".mp4" else "img"  # an MP4 in a video player, else an animated GIF
    try:
        page = open_page(browser, url)
        expect(page.get_by_label("Frames")).to_have_value("81")  # WanPipeline's default, 16 frames a second
        expect(page.get_by_label("FPS")).to_have_value("16")
        fill(page, seed=5)
        for label, value in (("Frames", 9), ("FPS", 10)):
            box = page.get_by_label(label)
            box.fill(str(value))
            box.press("Enter")
        page.get_by_role("button", name="Generate").click()
        entries = page.get_by_label("History").locator("img, video")
        expect(entries).to_have_count(1)
        (written,) = (tmp_path / "videos").iterdir()
        assert written.name == f"00001-seed5{console.suffix}"
        src = page.get_by_label("Result").locator(tag).get_attribute("src")
        assert page.request.get(src).body() == written.read_bytes()
        if console.suffix == ".gif":
            from PIL import Image

            with Image.open(written) as gif:
                assert gif.n_frames == 9 and gif.info["duration"] == 100
        expect(page.get_by_label("Info")).to_have_value(re.compile(r"\n2 steps, 32x32, 9 frames at 10 fps, "))

        page.get_by_label("Frames").fill("5")
        page.get_by_label("FPS").fill("8")
        entries.first.click()  # the form as that video was made
        expect(page.get_by_label("Frames")).to_have_value("9")
        expect(page.get_by_label("FPS")).to_have_value("10")
        expect(page.get_by_label("Seed")).to_have_value("5")
        outside = [u for u in page.requested if not u.startswith((url, "data:", "blob:"))]
        assert outside == []
    finally:
        served.close()
        console.encoder.close()
        server.stop()
