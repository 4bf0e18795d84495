"""Every command a user runs, on CUDA, for every family: serve, models, generate, batch, encode and demo with tiny
models; each memory option and `--vram auto` with a small budget; an fp32 server feeding a bf16 node. Images made
through the split equal the plain diffusers pipeline's on the same device and dtype."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ServerProcess, run_cli

# Z-Image (a list output) and Wan (video) need other checks than these; the CPU suite covers them.
FAMILIES = ("flux1", "flux2", "flux2-klein", "sd3", "qwen-image")
# FLUX.2 puts its system message before the prompt
LENGTH = {"flux1": 32, "flux2": 64, "flux2-klein": 64, "sd3": 32, "qwen-image": 32}
CALL = ["--steps", "2", "--width", "64", "--height", "64", "--seed", "3"]


@pytest.fixture(scope="module", params=FAMILIES)
def served(request, tiny_models):
    family = request.param
    server = ServerProcess(["--model", f"tiny={tiny_models[family]}", "--device", "cuda", "--cache-dir", "none"])
    server.wait_serving(300)
    yield family, tiny_models[family], server
    assert server.stop() == 0, server.output()


def node_args(server, model, family, out) -> list:
    return ["--encoder", server.address, "--model", model, "--out", out, "--device", "cuda",
            "--max-sequence-length", str(LENGTH[family]), *CALL]


def plain_image(family: str, model, prompt: str, dtype=torch.bfloat16, encode_dtype=None) -> np.ndarray:
    """The plain diffusers pipeline with its text encoders, on CUDA; `encode_dtype` encodes in another dtype first."""
    import diffusers

    from shared.families import FAMILIES as RECORDS

    cls = getattr(diffusers, RECORDS[family].pipeline)
    pipe = cls.from_pretrained(model, dtype=dtype).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"prompt": prompt}
    if encode_dtype is not None:
        encoder = cls.from_pretrained(model, dtype=encode_dtype).to("cuda")
        with torch.no_grad():
            out = encoder.encode_prompt([prompt], max_sequence_length=LENGTH[family], device="cuda")
        kwargs = {"prompt_embeds": out[0].to(dtype), **({"pooled_prompt_embeds": out[1].to(dtype)}
                                                         if family == "flux1" else {})}
    image = pipe(**kwargs, num_inference_steps=2, width=64, height=64, max_sequence_length=LENGTH[family],
                 generator=torch.Generator("cpu").manual_seed(3)).images[0]
    return np.asarray(image)


def test_models_lists_the_family(served):
    family, _, server = served
    listing = run_cli("models", "--encoder", server.address)
    assert listing.returncode == 0 and listing.stdout.startswith(f"tiny\t{family}\t"), listing.stderr


def test_generate_on_cuda_equals_the_plain_pipeline(served, tmp_path):
    family, model, server = served
    out = tmp_path / "split.png"
    result = run_cli("generate", *node_args(server, model, family, out), "--prompt", "a fox on a gpu")
    assert result.returncode == 0, result.stderr
    assert "vram: memory plan" in result.stderr  # auto planned the card's memory and said so
    assert np.array_equal(np.asarray(Image.open(out)), plain_image(family, model, "a fox on a gpu"))


def test_batch_on_cuda_makes_the_same_image_as_generate(served, tmp_path):
    family, model, server = served
    job = tmp_path / "job.jsonl"
    job.write_text(json.dumps({"prompt": "a fox on a gpu", "id": "a"}) + "\n" + json.dumps({"prompt": "b"}) + "\n")
    done = run_cli("batch", job, "--encoder", server.address, "--model", model, "--out-dir", tmp_path / "out",
                   "--device", "cuda", "--max-sequence-length", str(LENGTH[family]), *CALL)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    generated = tmp_path / "one.png"
    assert run_cli("generate", *node_args(server, model, family, generated), "--prompt", "a fox on a gpu"
                   ).returncode == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / rows[0]["images"][0])),
                          np.asarray(Image.open(generated)))


def test_encode_on_cuda_exports_what_the_server_sends(served, tmp_path):
    from safetensors.torch import load_file

    from denoiser_client import RemoteTextEncoder

    family, _, server = served
    result = run_cli("encode", "--encoder", server.address, "--prompt", "an exported fox", "--out", tmp_path / "e",
                     "--max-sequence-length", str(LENGTH[family]))
    assert result.returncode == 0, result.stderr
    (file,) = sorted((tmp_path / "e").glob("*.safetensors"))
    exported = load_file(file)
    with RemoteTextEncoder(server.address, timeout=60) as enc:
        direct = enc.encode(["an exported fox"], max_sequence_length=LENGTH[family])
    assert set(exported) == set(direct)
    assert all(torch.equal(exported[k], direct[k]) for k in direct)
    assert direct["prompt_embeds"].dtype == torch.bfloat16  # a CUDA server computes in bf16


@pytest.mark.parametrize("family", FAMILIES)
def test_demo_on_cuda(family, tmp_path):
    out = tmp_path / "demo.png"
    result = run_cli("demo", "--family", family, "--device", "cuda", "--out", out,
                     env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size == (64, 64)


MEMORY_OPTIONS = [["--quantize", "fp8"], ["--quantize", "nf4"], ["--quantize", "int8"], ["--offload", "model"],
                  ["--offload", "sequential"], ["--offload", "group"], ["--vae-tiling"],
                  ["--quantize", "fp8", "--offload", "group", "--vae-tiling"], ["--vram", "fp8+tiling"],
                  ["--vram", "nf4+tiling"], ["--vram", "auto", "--vram-budget", "0.5"]]


@pytest.fixture(scope="module")
def flux1_cuda_server(tiny_models):
    server = ServerProcess(["--model", f"tiny={tiny_models['flux1']}", "--device", "cuda", "--cache-dir", "none"])
    server.wait_serving(300)
    yield server
    server.stop()


@pytest.mark.parametrize("options", MEMORY_OPTIONS, ids=[" ".join(o) for o in MEMORY_OPTIONS])
def test_every_memory_option_generates_on_cuda(options, flux1_cuda_server, tiny_models, tmp_path):
    out = tmp_path / "x.png"
    result = run_cli("generate", *node_args(flux1_cuda_server, tiny_models["flux1"], "flux1", out),
                     "--prompt", "a memory-planned fox", *options)
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size == (64, 64)
    if "--vram-budget" in options:
        assert "vram: memory plan" in result.stderr and "of 0.5 GiB" in result.stderr


def test_an_fp32_server_feeds_a_bf16_node(tiny_models, tmp_path):
    model = tiny_models["flux1"]
    server = ServerProcess(["--model", f"tiny={model}", "--device", "cuda", "--dtype", "fp32", "--cache-dir", "none"])
    try:
        server.wait_serving(300)
        out = tmp_path / "bf16.png"
        result = run_cli("generate", *node_args(server, model, "flux1", out), "--dtype", "bf16",
                         "--prompt", "an fp32 fox")
        assert result.returncode == 0, result.stderr
    finally:
        server.stop()
    expected = plain_image("flux1", model, "an fp32 fox", dtype=torch.bfloat16, encode_dtype=torch.float32)
    assert np.array_equal(np.asarray(Image.open(out)), expected)
