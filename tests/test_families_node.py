"""The node side of SD3, Qwen-Image, Z-Image and Wan, through the real `promptcast` entry point (in-process) against a
real server: `generate` gives exactly the plain diffusers pipeline's image (Wan: its frames) with CFG on and the
negative fetched from the server; `batch` makes the same and resumes; the web console renders an image family;
`demo --family` works for each; video goes to MP4 (or, with no MP4 encoder, to PNG frames) atomically."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from denoiser_client import RemoteTextEncoder, media
from encoder_server.server import BackgroundServer, ModelSpec, ServerConfig
from promptcast.cli import main

PIPELINES = {"sd3": diffusers.StableDiffusion3Pipeline, "qwen-image": diffusers.QwenImagePipeline,
             "z-image": diffusers.ZImagePipeline, "wan": diffusers.WanPipeline}
PROMPT, SEED, LENGTH = "a red fox in the snow", 5, 32
COMMON = ["--steps", "2", "--width", "32", "--height", "32", "--max-sequence-length", str(LENGTH)]
# Each family with CFG on, by its own argument: (command-line options, the plain pipeline's call). SD3 and Qwen-Image
# are given a negative prompt; Z-Image and Wan run CFG with their default "" one, which the node fetches too.
CFG = {
    "sd3": (["--guidance", "4", "--negative-prompt", "blurry"], dict(guidance_scale=4.0, negative_prompt="blurry")),
    "qwen-image": (["--true-cfg-scale", "4", "--negative-prompt", "blurry"],
                   dict(true_cfg_scale=4.0, negative_prompt="blurry")),
    "z-image": (["--guidance", "3"], dict(guidance_scale=3.0)),
    "wan": (["--num-frames", "5"], dict(num_frames=5)),
}


@pytest.fixture(scope="module")
def server(tiny_models):
    specs = [ModelSpec(str(tiny_models[family]), name=f"tiny-{family}") for family in PIPELINES]
    with BackgroundServer(ServerConfig(specs, port=0, cache_dir=None)) as background:
        yield background


@pytest.fixture(scope="module")
def plain(tiny_models):
    """The plain pipeline's result (with its own text encoders) per family, made once: an RGB array, Wan's frames
    as a list of them."""
    made = {}

    def run(family: str, prompt: str = PROMPT, seed: int = SEED, **call) -> np.ndarray | list[np.ndarray]:
        key = (family, prompt, seed, json.dumps(call, sort_keys=True))
        if key not in made:
            pipe = PIPELINES[family].from_pretrained(tiny_models[family])
            pipe.set_progress_bar_config(disable=True)
            output = pipe(prompt=prompt, num_inference_steps=2, width=32, height=32, max_sequence_length=LENGTH,
                          generator=torch.Generator().manual_seed(seed), output_type="pil",
                          **{**CFG[family][1], **call})
            made[key] = ([np.asarray(f) for f in output.frames[0]] if family == "wan"
                         else np.asarray(output.images[0]))
        return made[key]

    return run


def cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exit_.value.code, captured.out, captured.err


def read_frames(path: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(f)) for f in sorted(path.iterdir())]


def no_mp4_encoder(monkeypatch) -> None:
    monkeypatch.setattr(media, "mp4_encoder", lambda: None)


@pytest.mark.parametrize("family", PIPELINES)
def test_generate_equals_the_plain_pipeline_with_cfg(server, tiny_models, plain, capsys, tmp_path, monkeypatch, family):
    no_mp4_encoder(monkeypatch)  # Wan's frames as PNG files: lossless, so they can equal the plain pipeline's
    out = tmp_path / ("fox.mp4" if family == "wan" else "fox.png")
    code, stdout, err = cli(capsys, "generate", "--encoder", server.address, "--model", tiny_models[family],
                            "--prompt", PROMPT, "--out", out, "--seed", SEED, *COMMON, *CFG[family][0])
    assert code == 0, err
    assert stdout.rstrip().endswith("cache miss,miss")  # the prompt and its negative, both from the server
    if family == "wan":
        folder = tmp_path / "fox_frames"
        assert not out.exists() and stdout.startswith(str(folder))
        assert f"no MP4 encoder is installed (pip install 'promptcast[video]'" in err and str(folder) in err
        frames = read_frames(folder)
        assert [f.shape for f in frames] == [(32, 32, 3)] * 5
        assert all(np.array_equal(a, b) for a, b in zip(frames, plain(family), strict=True))
    else:
        assert np.array_equal(np.asarray(Image.open(out)), plain(family))


def test_wan_writes_an_mp4_with_an_encoder_installed(server, tiny_models, capsys, tmp_path):
    if media.mp4_encoder() is None:
        pytest.skip("no MP4 encoder here: pip install 'promptcast[video]'")
    import imageio.v2 as imageio

    out = tmp_path / "fox.mp4"
    code, stdout, err = cli(capsys, "generate", "--encoder", server.address, "--model", tiny_models["wan"],
                            "--prompt", PROMPT, "--out", out, "--seed", SEED, "--fps", 8, *COMMON, "--num-frames", 9)
    assert code == 0, err
    assert stdout.startswith(str(out)) and "no MP4 encoder" not in err
    with imageio.get_reader(out) as reader:
        assert reader.get_meta_data()["fps"] == 8 and reader.count_frames() == 9
        assert reader.get_data(0).shape == (32, 32, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["fox.mp4"]  # no temp file left beside it


def test_wan_writes_a_gif(server, tiny_models, plain, capsys, tmp_path):
    out = tmp_path / "fox.gif"
    code, _, err = cli(capsys, "generate", "--encoder", server.address, "--model", tiny_models["wan"], "--prompt",
                       PROMPT, "--out", out, "--seed", SEED, "--fps", 10, *COMMON, *CFG["wan"][0])
    assert code == 0, err
    with Image.open(out) as gif:
        assert gif.n_frames == 5 and gif.info["duration"] == 100 and gif.size == (32, 32)


def test_a_video_is_complete_or_absent(tmp_path, monkeypatch):
    """An encoder that dies half-way leaves nothing at the final path, and no temp file; frames replace an older
    folder whole."""
    frames = [Image.new("RGB", (16, 16), (i * 40, 0, 0)) for i in range(5)]

    def dies(video_frames, path, fps):
        Path(path).write_bytes(b"half an mp4")
        raise OSError("ffmpeg died")

    monkeypatch.setattr(media, "mp4_encoder", lambda: "imageio")
    monkeypatch.setattr(media, "_ffmpeg_mp4", dies)  # the MP4 writer, dying half-way
    with pytest.raises(OSError, match="ffmpeg died"):
        media.save_video(frames, tmp_path / "v.mp4")
    assert list(tmp_path.iterdir()) == []
    no_mp4_encoder(monkeypatch)
    (tmp_path / "v_frames").mkdir()
    (tmp_path / "v_frames" / "00009.png").write_bytes(b"an older, longer video's frame")
    path, note = media.save_video(frames, tmp_path / "v.mp4", fps=8)
    assert path == tmp_path / "v_frames" and "wrote the 5 frames" in note
    assert sorted(p.name for p in path.iterdir()) == [f"{i:05d}.png" for i in range(5)]
    assert [p.name for p in tmp_path.iterdir()] == ["v_frames"]


def batch_job(path: Path, family: str, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps({**line, **({"num_frames": 5, "fps": 8} if family == "wan" else {})}) + "\n"
                            for line in lines))
    return path


@pytest.mark.parametrize("family", PIPELINES)
def test_batch_makes_the_plain_pipelines_results_and_resumes(server, tiny_models, plain, capsys, tmp_path,
                                                            monkeypatch, family):
    no_mp4_encoder(monkeypatch)
    lines = [{"prompt": PROMPT, "seed": SEED, "id": "fox"}, {"prompt": "a lighthouse at night", "seed": 2}]
    cfg = [] if family == "wan" else CFG[family][0]  # Wan's frames and fps are the job lines' own
    args = ["--encoder", server.address, "--model", tiny_models[family], "--out-dir", tmp_path / "out", *COMMON, *cfg]
    code, stdout, err = cli(capsys, "batch", batch_job(tmp_path / "one.jsonl", family, lines[:1]), *args)
    assert code == 0 and "done 1, skipped 0, failed 0" in stdout, err
    first = json.loads((tmp_path / "out" / "results.jsonl").read_text())
    made = tmp_path / "out" / first["images"][0]
    before = made.stat().st_ino
    code, stdout, err = cli(capsys, "batch", batch_job(tmp_path / "two.jsonl", family, lines), *args)
    assert code == 0 and "done 1, skipped 1, failed 0" in stdout, err  # the first line is not made again
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 2] and made.stat().st_ino == before
    if family == "wan":
        assert made.name == f"fox-{first['key'][:8]}_frames" and made.is_dir()
        assert "no MP4 encoder is installed" in stdout + err
        assert all(r["params"]["num_frames"] == 5 and r["params"]["fps"] == 8 for r in rows)
        assert all(np.array_equal(a, b) for a, b in zip(read_frames(made), plain(family), strict=True))
        second = read_frames(tmp_path / "out" / rows[1]["images"][0])
        assert all(np.array_equal(a, b) for a, b in
                   zip(second, plain(family, "a lighthouse at night", 2), strict=True))
    else:
        assert np.array_equal(np.asarray(Image.open(made)), plain(family))
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / rows[1]["images"][0])),
                              plain(family, "a lighthouse at night", 2))


def test_a_wan_job_with_an_mp4_encoder_writes_mp4(server, tiny_models, capsys, tmp_path):
    if media.mp4_encoder() is None:
        pytest.skip("no MP4 encoder here: pip install 'promptcast[video]'")
    job = batch_job(tmp_path / "job.jsonl", "wan", [{"prompt": PROMPT, "id": "fox"}])
    code, stdout, err = cli(capsys, "batch", job, "--encoder", server.address, "--model", tiny_models["wan"],
                            "--out-dir", tmp_path / "out", *COMMON)
    assert code == 0, err
    (row,) = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert row["images"][0].endswith(".mp4") and (tmp_path / "out" / row["images"][0]).is_file()
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == [Path(row["images"][0]).name]


def test_the_console_renders_an_image_family_as_generate_does(server, tiny_models, plain, tmp_path):
    from denoiser_client.node import DenoiserNode
    from denoiser_client.ui.console import Console, ConsoleRequest
    from denoiser_client.ui.styles import load_styles

    encoder = RemoteTextEncoder(server.address, timeout=60)
    node = DenoiserNode.load(encoder, str(tiny_models["qwen-image"]), encoder_model="tiny-qwen-image")
    console = Console(node, encoder, load_styles(), tmp_path / "images")
    try:
        assert console.facts.negative_prompt and console.facts.true_cfg_scale == 4.0
        rendered = console.render(ConsoleRequest(prompt=PROMPT, seed=SEED, steps=2, width=32, height=32,
                                                 negative_prompt="blurry", true_cfg_scale=4.0))
    finally:
        encoder.close()
    assert len(rendered.timings.cache_status) == 2  # the prompt and its negative
    assert np.array_equal(np.asarray(Image.open(rendered.path)), plain("qwen-image"))


@pytest.mark.parametrize("family", PIPELINES)
def test_demo_for_each_family(capsys, tmp_path, monkeypatch, family):
    monkeypatch.chdir(tmp_path)
    code, stdout, err = cli(capsys, "demo", "--family", family)
    assert code == 0, err
    if family == "wan":
        written = tmp_path / ("promptcast-demo.mp4" if media.mp4_encoder() else "promptcast-demo_frames")
        assert f"video: {written}" in stdout and written.exists()
    else:
        assert f"image: {tmp_path / 'promptcast-demo.png'}" in stdout
        assert Image.open(tmp_path / "promptcast-demo.png").size == (64, 64)
