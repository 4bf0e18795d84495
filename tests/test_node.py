"""The node pipeline every front end shares: the README's Python example as written, embeddings placed where and in
what the pipeline computes, memory plans (auto's pick, out of memory named and stepped down), and job files that
lose nothing (every line its own result, results fed back, nothing loaded when nothing is left)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import free_port, run_cli
from denoiser_client.batch import BatchOptions, run_batch
from denoiser_client.embeddings import RemoteEmbedder
from denoiser_client.errors import OutOfGpuMemory
from denoiser_client.generate import generate
from denoiser_client.jobs import JobDefaults
from denoiser_client.node import DenoiserNode
from denoiser_client.options import GenerateOptions
from denoiser_client.pipeline import load_denoiser, place_embeddings
from denoiser_client.vram import PLANS, VramOptions
from denoiser_client.vram_plans import GIB, MARGIN, costs_for, ordered_plans, pick_plan, predict

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def readme_python_example() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("```python\n", text.index("### Python API")) + len("```python\n")
    return text[start:text.index("\n```", start)]


def test_the_readme_python_example_runs_as_written(flux1_server, tiny_flux1):
    """Only the names a reader replaces are substituted: the server address, the model, its server name."""
    code = readme_python_example()
    for real in ("bigbox:50051", "black-forest-labs/FLUX.1-dev", '"FLUX.1-dev"', '"cuda"'):
        assert real in code, real
    code = (code.replace("bigbox:50051", flux1_server.address)
            .replace("black-forest-labs/FLUX.1-dev", str(tiny_flux1)).replace('"FLUX.1-dev"', '"tiny-flux1"')
            .replace('"cuda"', f'"{DEVICE}"').replace("num_inference_steps=28", "num_inference_steps=2"))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own example, from this repository
    assert scope["image"].size == (256, 256)
    assert scope["embeds"]["prompt_embeds"].device.type == DEVICE
    assert scope["embeds"]["prompt_embeds"].dtype == torch.bfloat16


def test_embeddings_are_placed_in_the_pipelines_device_and_dtype(tiny_flux1, client):
    pipe, _ = load_denoiser(str(tiny_flux1), dtype=torch.bfloat16)
    fp32 = client.encode(["placed"], max_sequence_length=16)  # the CPU server computes in fp32
    assert fp32["prompt_embeds"].dtype == torch.float32
    placed = place_embeddings(pipe, fp32)
    assert all(t.dtype == torch.bfloat16 and t.device == pipe._execution_device for t in placed.values())


def test_an_fp32_server_feeds_a_bf16_node_through_generate(flux1_server, tiny_flux1, tmp_path):
    with _client(flux1_server) as enc:
        path, _ = generate(enc, str(tiny_flux1), "a bf16 fox", tmp_path / "bf16.png", dtype=torch.bfloat16,
                           options=GenerateOptions(steps=2, width=32, height=32, max_sequence_length=16),
                           progress=False)
    assert Image.open(path).size == (32, 32)


def _client(server):
    from denoiser_client import RemoteTextEncoder

    return RemoteTextEncoder(server.address, timeout=60)


# --- memory plans ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("budget_gib", [2, 8, 12, 16, 24, 48, 80])
def test_auto_picks_the_fastest_plan_predicted_to_fit(budget_gib):
    params, pixels = 11.9e9, 1024 * 1024
    choice = pick_plan("flux1", params, pixels, budget_gib * GIB, "cuda")
    plans = ordered_plans("flux1", "cuda", params)
    limit = budget_gib * GIB * (1 - MARGIN)
    fitting = [p for p in plans if predict("flux1", p, params, pixels) <= limit]
    if fitting:
        seconds = lambda plan: costs_for("flux1", params)[0][plan].seconds_per_image  # noqa: E731
        assert choice.name in fitting and seconds(choice.name) <= 1.05 * seconds(fitting[0])  # near the fastest
        # and of those near it, the one that changes least (no tiling, no quantization first)
        near = [p for p in fitting if seconds(p) <= 1.05 * seconds(fitting[0])]
        assert list(PLANS).index(choice.name) == min(list(PLANS).index(p) for p in near)
    else:
        assert choice.name == min(plans, key=lambda p: predict("flux1", p, params, pixels))
    assert choice.options == PLANS[choice.name]
    assert f"{budget_gib:.1f} GiB" in choice.describe()


def test_a_card_with_room_gets_the_plain_pipelines_image():
    """With room for every plan, auto takes no tiling and no quantization, even where another plan measured a hair
    faster: the image is then exactly the plain pipeline's."""
    assert pick_plan("flux1", 11.9e9, 1024 * 1024, 80 * GIB, "cuda").name == "full"
    assert pick_plan("flux1", 1e5, 64 * 64, 40 * GIB, "cuda").name == "full"


def test_plans_that_cannot_run_on_the_device_are_never_picked():
    assert "nf4+tiling" not in ordered_plans("flux1", "cpu") and "fp8+group-offload" not in ordered_plans("flux1", "cpu")
    assert PLANS["fp8+tiling"].name == "fp8+tiling" and VramOptions(quantize="int8").name == "int8"


class OutOfMemoryOnce:
    """`run_pipeline` that runs out of CUDA memory on its first call, then works."""

    def __init__(self, real):
        self.real, self.calls = real, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB")
        return self.real(*args, **kwargs)


@pytest.fixture
def oom_once(monkeypatch):
    import denoiser_client.node as node_module

    fake = OutOfMemoryOnce(node_module.run_pipeline)
    monkeypatch.setattr(node_module, "run_pipeline", fake)
    return fake


class SteppingNode(DenoiserNode):
    """A CPU node whose next plan down is fp8 (on CPU no plan is predicted; the reload itself is real)."""

    def next_plan(self, pixels, images=1):
        return None if self.plan.options.quantize == "fp8" else "fp8"


def test_generate_out_of_memory_names_the_plan_and_the_next_one(tiny_flux1, client, oom_once, tmp_path):
    pipe, _ = load_denoiser(str(tiny_flux1))
    node = SteppingNode(pipe, source=str(tiny_flux1), info=client.model_info("tiny-flux1"))
    with pytest.raises(OutOfGpuMemory, match=r"out of GPU memory with memory plan custom at 32x32 .*try --vram fp8"):
        generate(client, str(tiny_flux1), "too big", tmp_path / "x.png", pipe=node,
                 options=GenerateOptions(steps=1, width=32, height=32, max_sequence_length=16), progress=False)
    assert not (tmp_path / "x.png").exists()


def test_batch_retries_an_out_of_memory_item_on_the_next_plan_and_goes_on(tiny_flux1, client, oom_once, tmp_path):
    job = tmp_path / "job.jsonl"
    job.write_text("".join(json.dumps({"prompt": f"plan step {i}", "seed": i}) + "\n" for i in range(3)))
    pipe, _ = load_denoiser(str(tiny_flux1))
    node = SteppingNode(pipe, source=str(tiny_flux1), dtype=torch.float32)
    defaults = JobDefaults(steps=2, width=32, height=32, max_sequence_length=16)
    summary = run_batch(job, tmp_path / "out", pipe=node, embedder=RemoteEmbedder(client, "tiny-flux1", 16),
                        defaults=defaults, options=BatchOptions(max_sequence_length=16, progress=False))
    assert summary.done == 3 and summary.ok, summary.lines()
    assert any(re.search(r"out of GPU memory at line 1 with memory plan custom; retried and continued with fp8", n)
               for n in summary.notes), summary.notes
    assert node.plan.name == "fp8" and oom_once.calls == 4  # the failed call, its retry, then two more
    # The retried item is what an fp8 node makes from the start.
    fp8, _ = load_denoiser(str(tiny_flux1), vram=PLANS["fp8"])
    again = run_batch(job, tmp_path / "fp8", pipe=fp8, embedder=RemoteEmbedder(client, "tiny-flux1", 16),
                      defaults=defaults, options=BatchOptions(max_sequence_length=16, progress=False))
    assert again.done == 3
    first = sorted((tmp_path / "out" / "images").iterdir())[0].name
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "images" / first)),
                          np.asarray(Image.open(tmp_path / "fp8" / "images" / first)))


# --- job files that lose nothing -----------------------------------------------------------------------------

def _rows(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines()]


def test_every_input_line_gets_its_own_result_line_and_identical_images_are_made_once(tiny_flux1, client, tmp_path):
    turn = [{"role": "user", "content": "a fox in a dataflow row"}]
    lines = [{"conversations": turn, "meta": {"row": 1}}, {"conversations": turn, "meta": {"row": 2}},
             {"conversations": turn, "meta": {"row": 2}}, {"conversations": turn, "meta": {"row": 3}, "seed": 9}]
    job = tmp_path / "job.jsonl"
    job.write_text("".join(json.dumps(line) + "\n" for line in lines))
    pipe, _ = load_denoiser(str(tiny_flux1))
    calls = []

    class Counting(RemoteEmbedder):
        def encode(self, texts):
            calls.append(list(texts))
            return super().encode(texts)

    args = dict(pipe=pipe, embedder=Counting(client, "tiny-flux1", 16),
                defaults=JobDefaults(steps=1, width=32, height=32, max_sequence_length=16),
                options=BatchOptions(max_sequence_length=16, progress=False))
    summary = run_batch(job, tmp_path / "out", **args)
    assert summary.done == 4 and summary.ok
    rows = _rows(tmp_path / "out")
    assert [row["line"] for row in rows] == [1, 2, 3, 4] and [row["meta"]["row"] for row in rows] == [1, 2, 2, 3]
    assert len({row["record"] for row in rows}) == 4  # the two identical lines are two results
    assert rows[0]["images"] == rows[1]["images"] == rows[2]["images"] != rows[3]["images"]
    assert len(list((tmp_path / "out" / "images").iterdir())) == 2  # one image per distinct seed, made once
    assert sum(len(c) for c in calls) == 1  # and one embedding for the one prompt
    again = run_batch(job, tmp_path / "out", **args)
    assert again.done == 0 and again.skipped == 4 and len(_rows(tmp_path / "out")) == 4


def test_results_fed_back_as_a_job_file_never_read_images_as_inputs(tiny_models, tmp_path):
    """`images` is DataFlow's output key: a results.jsonl fed back renders again; FLUX.2 references come from
    `reference_images` only."""
    from encoder_server.server import BackgroundServer, ModelSpec, ServerConfig

    klein = tiny_models["flux2-klein"]
    ref = tmp_path / "ref.png"
    Image.new("RGB", (64, 64), "red").save(ref)
    job = tmp_path / "job.jsonl"
    job.write_text(json.dumps({"prompt": "a klein fox", "id": "plain"}) + "\n"
                   + json.dumps({"prompt": "a klein fox", "id": "ref", "reference_images": ["ref.png"]}) + "\n")
    defaults = JobDefaults(steps=1, width=32, height=32, max_sequence_length=64)
    options = BatchOptions(max_sequence_length=64, progress=False)
    pipe, _ = load_denoiser(str(klein))
    with BackgroundServer(ServerConfig([ModelSpec(str(klein), name="klein")], port=0, cache_dir=None)) as server:
        with _client(server) as enc:
            embedder = RemoteEmbedder(enc, "klein", 64)
            first = run_batch(job, tmp_path / "out", pipe=pipe, embedder=embedder, defaults=defaults, options=options)
            assert first.done == 2 and first.ok
            rows = _rows(tmp_path / "out")
            assert rows[1]["params"]["reference_images"] == [str(ref)]
            fed_back = tmp_path / "out" / "results.jsonl"
            second = run_batch(fed_back, tmp_path / "again", pipe=pipe, embedder=embedder, defaults=defaults,
                               options=options)
    assert second.done == 2 and second.ok
    again = {row["id"]: row for row in _rows(tmp_path / "again")}
    assert again["plain"]["params"]["reference_images"] == []  # its old `images` output was not a reference
    image = lambda folder, row: np.asarray(Image.open(folder / row["images"][0]))  # noqa: E731
    before = {row["id"]: row for row in rows}
    assert np.array_equal(image(tmp_path / "out", before["plain"]), image(tmp_path / "again", again["plain"]))


def test_nothing_left_to_do_never_loads_the_model_nor_calls_the_server(flux1_server, tiny_flux1, tmp_path):
    job = tmp_path / "job.jsonl"
    job.write_text(json.dumps({"prompt": "done already"}) + "\n")
    args = ["batch", job, "--model", tiny_flux1, "--out-dir", tmp_path / "out", "--steps", "1", "--width", "32",
            "--height", "32", "--max-sequence-length", "16", "--device", "cpu"]
    assert run_cli(*args, "--encoder", flux1_server.address).returncode == 0
    dead = f"127.0.0.1:{free_port()}"
    again = run_cli(*args, "--encoder", dead, "--timeout", "2")
    assert again.returncode == 0, again.stderr
    assert "done 0, skipped 1, failed 0" in again.stdout and "nothing left to do" in again.stdout
