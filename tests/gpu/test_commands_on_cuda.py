"""Every command a user runs, on CUDA, for every family: serve, models, generate, batch, encode, demo and the web
console's renders with tiny models; each memory option and `--vram auto` with a small budget; an fp32 server feeding a bf16 node. Images made
through the split equal the plain diffusers pipeline's on the same device and dtype.

Commands run through `promptcast.cli.main`, the console script's own entry point, in this process (a Python
process on the GPU machine spends about 20 s importing torch, diffusers and transformers); `serve` also runs once as
a real subprocess."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ServerProcess, assert_same
from encoder_server.server import BackgroundServer, ModelSpec, ServerConfig
from promptcast.cli import main
from shared.families import FAMILIES

# FLUX.2 and Qwen-Image put a system message or template before the prompt: their tiny models need more tokens.
LENGTH = {"flux1": 32, "sd3": 32, "qwen-image": 32, "wan": 32}
CALL = ["--steps", "2", "--width", "64", "--height", "64", "--seed", "3"]


def length(family: str) -> int:
    return LENGTH.get(family, 64)


def cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def suffix(family: str) -> str:
    return ".mp4" if FAMILIES[family].media == "video" else ".png"


@pytest.fixture(scope="module", params=list(FAMILIES))
def served(request, tiny_models):
    family = request.param
    config = ServerConfig([ModelSpec(str(tiny_models[family]), name="tiny")], port=0, device="cuda", cache_dir=None)
    with BackgroundServer(config) as server:
        yield family, tiny_models[family], server


def node_args(server, model, family, out) -> list:
    return ["--encoder", server.address, "--model", model, "--out", out, "--device", "cuda",
            "--max-sequence-length", str(length(family)), *CALL]


def plain_image(family: str, model, prompt: str, dtype=torch.bfloat16, encode_dtype=None) -> np.ndarray:
    """The plain diffusers pipeline with its text encoders, on CUDA; `encode_dtype` encodes in another dtype first."""
    import diffusers

    cls = getattr(diffusers, FAMILIES[family].pipeline)
    pipe = cls.from_pretrained(model, dtype=dtype).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"prompt": prompt}
    if encode_dtype is not None:
        encoder = cls.from_pretrained(model, dtype=encode_dtype).to("cuda")
        with torch.no_grad():
            out = encoder.encode_prompt([prompt], max_sequence_length=length(family), device="cuda")
        kwargs = {"prompt_embeds": out[0].to(dtype), "pooled_prompt_embeds": out[1].to(dtype)}
    image = pipe(**kwargs, num_inference_steps=2, width=64, height=64, max_sequence_length=length(family),
                 generator=torch.Generator("cpu").manual_seed(3)).images[0]
    return np.asarray(image)


def test_models_lists_the_family(served, capsys):
    family, _, server = served
    code, out, err = cli(capsys, "models", "--encoder", server.address)
    assert code == 0 and out.startswith(f"tiny\t{family}\t"), err


def test_the_default_server_on_cuda_runs_each_model_in_its_own_process_replaying_graphs(served):
    """No flag: each model in a worker process, graphs on for every family that pads to a fixed length, eager for
    Qwen-Image (that the child captures them is checked below). The images below (generate, batch, the console) then
    come from that set-up, and equal the plain pipeline's."""
    from encoder_server.worker_process import ProcessEncoder

    family, _, server = served
    encoder = server.server.service.encoders["tiny"]
    assert isinstance(encoder, ProcessEncoder)
    assert encoder.cuda_graphs is FAMILIES[family].fixed_text_shapes  # as the child resolved it


def test_generate_on_cuda_equals_the_plain_pipeline(served, tmp_path, capsys):
    family, model, server = served
    out = tmp_path / f"split{suffix(family)}"
    code, _, err = cli(capsys, "generate", *node_args(server, model, family, out), "--prompt", "a fox on a gpu")
    assert code == 0, err
    assert "vram: memory plan" in err  # auto planned the card's memory and said so
    if FAMILIES[family].media == "image":
        assert np.array_equal(np.asarray(Image.open(out)), plain_image(family, model, "a fox on a gpu"))
    else:
        assert out.exists() or out.with_name(f"{out.stem}_frames").is_dir()  # MP4, or its frames without an encoder


def test_the_web_console_on_cuda_saves_what_generate_saves(served, tmp_path, capsys):
    """The console's render (the page's Generate) on a CUDA node: the same file as `generate --out` (a video: GIF)."""
    from denoiser_client import RemoteTextEncoder
    from denoiser_client.node import DenoiserNode
    from denoiser_client.ui.console import Console, ConsoleRequest
    from denoiser_client.ui.styles import load_styles
    from shared.config import parse_dtype

    family, model, server = served
    video = FAMILIES[family].media == "video"
    out = tmp_path / ("generate.gif" if video else "generate.png")
    frames = ["--num-frames", "5"] if video else []
    code, _, err = cli(capsys, "generate", "--encoder", server.address, "--model", model, "--out", out,
                       "--device", "cuda", *CALL, *frames, "--prompt", "a fox on a gpu")
    assert code == 0, err
    with RemoteTextEncoder(server.address, timeout=60) as encoder:
        # As `promptcast ui --device cuda` loads it: --dtype auto is bf16 on CUDA.
        node = DenoiserNode.load(encoder, str(model), device="cuda", dtype=parse_dtype("auto", "cuda"))
        console = Console(node, encoder, load_styles(None, None), tmp_path / "console")
        console.suffix = ".gif" if video else ".png"  # the format generate wrote above
        rendered = console.render(ConsoleRequest(prompt="a fox on a gpu", seed=3, steps=2, width=64, height=64,
                                                 num_frames=5 if video else None))
    if video:
        assert rendered.path.read_bytes() == out.read_bytes()
    else:
        assert np.array_equal(np.asarray(Image.open(rendered.path)), np.asarray(Image.open(out)))


@pytest.mark.parametrize("family", ["flux1", "z-image", "qwen-image"])
def test_a_process_worker_on_cuda_sends_the_thread_workers_bytes(tiny_models, family, capfd):
    """The default worker process on CUDA: pinned shared memory, copies queued on the child's stream, graphs
    captured in the child where the family's shapes are fixed (its log says so), the thread worker's bytes."""
    from denoiser_client import RemoteTextEncoder

    got = {}
    for worker in ("thread", "process"):
        config = ServerConfig([ModelSpec(str(tiny_models[family]), name="tiny")], port=0, device="cuda",
                              cache_dir=None, cache_mem=0, worker=worker)
        capfd.readouterr()
        with BackgroundServer(config) as server, RemoteTextEncoder(server.address, timeout=60) as client:
            got[worker] = client.encode(["a fox on a gpu", "two foxes on a gpu"], max_sequence_length=length(family))
    assert ("captured a CUDA graph" in capfd.readouterr().err) is FAMILIES[family].fixed_text_shapes  # the child's
    assert_same(got["process"], got["thread"])


def test_batch_on_cuda_makes_the_same_image_as_generate(served, tmp_path, capsys):
    family, model, server = served
    if FAMILIES[family].media != "image":
        pytest.skip("batch of videos: covered by the CPU suite")
    job = tmp_path / "job.jsonl"
    job.write_text(json.dumps({"prompt": "a fox on a gpu", "id": "a"}) + "\n" + json.dumps({"prompt": "b"}) + "\n")
    code, _, err = cli(capsys, "batch", job, "--encoder", server.address, "--model", model, "--out-dir",
                       tmp_path / "out", "--device", "cuda", "--max-sequence-length", str(length(family)), *CALL)
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / rows[0]["images"][0])),
                          plain_image(family, model, "a fox on a gpu"))


def test_encode_on_cuda_exports_what_the_server_sends(served, tmp_path, capsys):
    from safetensors.torch import load_file

    from denoiser_client import RemoteTextEncoder

    family, _, server = served
    code, _, err = cli(capsys, "encode", "--encoder", server.address, "--prompt", "an exported fox", "--out",
                       tmp_path / "e", "--max-sequence-length", str(length(family)))
    assert code == 0, err
    (file,) = sorted((tmp_path / "e").glob("*.safetensors"))
    exported = load_file(file)
    with RemoteTextEncoder(server.address, timeout=60) as enc:
        direct = enc.encode(["an exported fox"], max_sequence_length=length(family))
    for name, tensor in direct.items():
        tensor = tensor[0] if isinstance(tensor, list) else tensor
        assert torch.equal(exported[name].reshape(tensor.shape), tensor), name
    assert exported["prompt_embeds"].dtype == torch.bfloat16  # a CUDA server computes in bf16


def test_demo_on_cuda(served, tmp_path, capsys, monkeypatch):
    family = served[0]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / ("demo.gif" if FAMILIES[family].media == "video" else "demo.png")
    code, _, err = cli(capsys, "demo", "--family", family, "--device", "cuda", "--out", out)
    assert code == 0, err


def test_serve_and_models_as_real_subprocesses_on_cuda(tiny_models):
    from conftest import run_cli

    server = ServerProcess(["--model", f"fox={tiny_models['flux1']}", "--device", "cuda", "--cache-dir", "none"])
    try:
        server.wait_serving(300)
        listing = run_cli("models", "--encoder", server.address)
        assert listing.returncode == 0 and "fox\tflux1\t" in listing.stdout and "bfloat16" in listing.stdout
    finally:
        assert server.stop() == 0, server.output()


MEMORY_OPTIONS = [["--quantize", "fp8"], ["--quantize", "nf4"], ["--quantize", "int8"], ["--offload", "model"],
                  ["--offload", "sequential"], ["--offload", "group"], ["--vae-tiling"],
                  ["--quantize", "fp8", "--offload", "group", "--vae-tiling"], ["--vram", "fp8+tiling"],
                  ["--vram", "nf4+tiling"], ["--vram", "auto", "--vram-budget", "0.5"]]


@pytest.fixture(scope="module")
def flux1_cuda_server(tiny_models):
    config = ServerConfig([ModelSpec(str(tiny_models["flux1"]), name="tiny")], port=0, device="cuda", cache_dir=None)
    with BackgroundServer(config) as server:
        yield server


@pytest.mark.parametrize("options", MEMORY_OPTIONS, ids=[" ".join(o) for o in MEMORY_OPTIONS])
def test_every_memory_option_generates_on_cuda(options, flux1_cuda_server, tiny_models, tmp_path, capsys):
    out = tmp_path / "x.png"
    code, _, err = cli(capsys, "generate", *node_args(flux1_cuda_server, tiny_models["flux1"], "flux1", out),
                       "--prompt", "a memory-planned fox", *options)
    assert code == 0, err
    assert Image.open(out).size == (64, 64)
    if "--vram-budget" in options:
        assert "vram: memory plan" in err and "of 0.5 GiB" in err


def test_an_fp32_server_feeds_a_bf16_node(tiny_models, tmp_path, capsys):
    model = tiny_models["flux1"]
    config = ServerConfig([ModelSpec(str(model), name="tiny")], port=0, device="cuda", dtype="fp32", cache_dir=None)
    with BackgroundServer(config) as server:
        out = tmp_path / "bf16.png"
        code, _, err = cli(capsys, "generate", *node_args(server, model, "flux1", out), "--dtype", "bf16",
                           "--prompt", "an fp32 fox")
        assert code == 0, err
    expected = plain_image("flux1", model, "an fp32 fox", dtype=torch.bfloat16, encode_dtype=torch.float32)
    assert np.array_equal(np.asarray(Image.open(out)), expected)
