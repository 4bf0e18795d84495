"""Variable-length families off the node's render path: `promptcast encode` exports that load straight into each
pipeline, the HTTP gateway's safetensors form for padded and list outputs (and `/predict`'s refusal of what one
tensor cannot carry), a prompt never padded to its negative, lists placed and cast, and the node's argument checks
for video."""

from __future__ import annotations

import io
import json

import diffusers
import numpy as np
import pytest
import requests
import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file

from denoiser_client import RemoteTextEncoder
from denoiser_client.pipeline import load_denoiser, place_embeddings, remote_embeddings
from encoder_server.server import BackgroundServer, ModelSpec, ServerConfig
from test_cli_arguments import DEAD, assert_one_error_line, cli

PIPELINES = {"sd3": diffusers.StableDiffusion3Pipeline, "qwen-image": diffusers.QwenImagePipeline,
             "z-image": diffusers.ZImagePipeline, "wan": diffusers.WanPipeline}
SHORT, LONG = "a cat", "a lighthouse in a storm at night, waves breaking over the rocks, gulls"
CFG = {"sd3": dict(guidance_scale=4.0), "qwen-image": dict(true_cfg_scale=4.0), "z-image": dict(guidance_scale=3.0),
       "wan": dict(guidance_scale=5.0, num_frames=5)}


@pytest.fixture(scope="module")
def server(tiny_models):
    specs = [ModelSpec(str(tiny_models[family]), name=f"tiny-{family}") for family in PIPELINES]
    with BackgroundServer(ServerConfig(specs, port=0, http_port=0, cache_dir=None)) as background:
        yield background


@pytest.fixture
def enc(server):
    with RemoteTextEncoder(server.address, timeout=60) as client:
        yield client


def render(pipe, family: str, **inputs) -> np.ndarray:
    output = pipe(**inputs, num_inference_steps=2, width=32, height=32, max_sequence_length=32, output_type="np",
                  generator=torch.Generator().manual_seed(4), **CFG[family])
    return output.frames if family == "wan" else output.images


@pytest.mark.parametrize("family", PIPELINES)
def test_an_encode_export_loads_into_the_pipeline(server, tiny_models, capsys, tmp_path, family):
    """One file per job line, the prompt and its negative each at its own length: Qwen-Image's unpadded with its
    mask, so `pipe(**load_file(f))` works; Z-Image's list output as `(1, L, D)`, which `list()` turns back."""
    job = tmp_path / "job.jsonl"
    job.write_text(json.dumps({"prompt": LONG, "negative_prompt": SHORT}) + "\n")
    code, err = cli(capsys, "encode", job, "--encoder", server.address, "--encoder-model", f"tiny-{family}",
                    "--out", tmp_path / "e", "--max-sequence-length", 32)
    assert code == 0, err
    (file,) = sorted((tmp_path / "e").glob("*.safetensors"))
    tensors = load_file(file)
    with safe_open(file, "pt") as f:
        collate = json.loads(f.metadata()["collate"])
    assert collate["prompt_embeds"] == {"qwen-image": "pad", "z-image": "list"}.get(family, "stack")
    if family == "qwen-image":
        assert tensors["prompt_embeds_mask"].shape == tensors["prompt_embeds"].shape[:2]
        assert tensors["prompt_embeds_mask"].all() and tensors["negative_prompt_embeds_mask"].all()
        assert tensors["negative_prompt_embeds"].shape[1] < tensors["prompt_embeds"].shape[1]  # not padded
    if family == "z-image":
        tensors = {name: list(t) for name, t in tensors.items()}
    pipe, _ = load_denoiser(str(tiny_models[family]))
    pipe.set_progress_bar_config(disable=True)
    reference = PIPELINES[family].from_pretrained(tiny_models[family])
    reference.set_progress_bar_config(disable=True)
    assert np.array_equal(render(pipe, family, **tensors), render(reference, family, prompt=LONG,
                                                                  negative_prompt=SHORT))


def test_a_prompt_is_never_padded_to_its_negative(enc):
    both = remote_embeddings(enc, "tiny-qwen-image", SHORT, negative_prompt=LONG, max_sequence_length=32)
    alone = enc.encode([SHORT], "tiny-qwen-image", max_sequence_length=32)
    assert torch.equal(both["prompt_embeds"], alone["prompt_embeds"])
    assert both["prompt_embeds_mask"].all()
    assert both["negative_prompt_embeds"].shape[1] > alone["prompt_embeds"].shape[1]
    listed = remote_embeddings(enc, "tiny-z-image", SHORT, negative_prompt=LONG, max_sequence_length=32)
    assert isinstance(listed["prompt_embeds"], list) and isinstance(listed["negative_prompt_embeds"], list)


def test_lists_of_embeddings_are_placed_and_cast(enc, tiny_models):
    pipe, _ = load_denoiser(str(tiny_models["z-image"]), dtype=torch.bfloat16)
    embeds = remote_embeddings(enc, "tiny-z-image", SHORT, negative_prompt=LONG, max_sequence_length=32)
    placed = place_embeddings(pipe, embeds)
    assert all(isinstance(v, list) for v in placed.values())
    assert all(t.dtype == torch.bfloat16 and t.device == pipe._execution_device for v in placed.values() for t in v)


def test_the_gateway_answers_list_outputs_one_tensor_a_prompt(server, enc):
    response = requests.post(server.http_url + "/v1/encode", json={"model": "tiny-z-image", "prompts": [SHORT, LONG],
                                                                   "max_sequence_length": 32}, timeout=60)
    assert response.status_code == 200, response.text
    tensors = load_safetensors(response.content)
    rows = enc.encode([SHORT, LONG], "tiny-z-image", max_sequence_length=32, collated=False)["prompt_embeds"]
    assert set(tensors) == {"prompt_embeds.0", "prompt_embeds.1"}
    assert all(torch.equal(tensors[f"prompt_embeds.{i}"], row) for i, row in enumerate(rows))
    assert rows[0].shape[0] < rows[1].shape[0]


def test_the_gateway_answers_padded_outputs_with_their_mask(server, enc):
    response = requests.post(server.http_url + "/v1/encode", timeout=60,
                             json={"model": "tiny-qwen-image", "prompts": [SHORT, LONG], "max_sequence_length": 32})
    assert response.status_code == 200, response.text
    tensors = load_safetensors(response.content)
    want = enc.encode([SHORT, LONG], "tiny-qwen-image", max_sequence_length=32)
    assert set(tensors) == {"prompt_embeds", "prompt_embeds_mask"}
    assert all(torch.equal(tensors[name], want[name]) for name in want)
    predict = requests.post(server.http_url + "/predict", json={"model": "tiny-qwen-image", "prompt": [SHORT, LONG]},
                            headers={"Accept": "application/vnd.safetensors"}, timeout=60)
    assert predict.status_code == 200 and set(load_safetensors(predict.content)) == set(want)


def test_predict_takes_one_prompt_of_a_variable_length_model(server, enc):
    refused = requests.post(server.http_url + "/predict", json={"model": "tiny-z-image", "prompt": [SHORT, LONG]},
                            timeout=60)
    assert refused.status_code == 400 and refused.json()["code"] == "INVALID_ARGUMENT"
    message = refused.json()["error"]
    assert "gives each prompt its own length" in message and "one prompt a call" in message
    one = requests.post(server.http_url + "/predict", json={"model": "tiny-z-image", "prompt": LONG}, timeout=60)
    assert one.status_code == 200
    tensor = torch.load(io.BytesIO(one.content), weights_only=True)
    row = enc.encode([LONG], "tiny-z-image", collated=False)["prompt_embeds"][0]
    assert torch.equal(tensor, row.unsqueeze(0))


VIDEO_CASES = [
    ("wan", ["--out", "{tmp}/x.png"], "(this model makes videos); use one of .gif, .mp4"),
    ("wan", ["--num-frames", "6"], "--num-frames 6: must be 4k+1"),
    ("wan", ["--fps", "0"], "--fps 0: must be from 1 to 120"),
    ("flux1", ["--num-frames", "5"], "--num-frames 5: is for video families (wan), and flux1 makes images"),
    ("sd3", ["--fps", "8"], "--fps 8: is for video families (wan), and sd3 makes images"),
    ("sd3", ["--out", "{tmp}/x.mp4"], "(this model makes images); use one of .jpeg, .jpg, .png, .webp"),
]


@pytest.mark.parametrize("family, args, expected", VIDEO_CASES, ids=[" ".join(a) for _, a, _ in VIDEO_CASES])
def test_video_arguments_are_checked_before_anything_loads(capsys, tmp_path, tiny_models, family, args, expected):
    out = tmp_path / ("x.mp4" if family == "wan" else "x.png")
    base = {"--encoder": DEAD, "--model": str(tiny_models[family]), "--prompt": "x", "--out": str(out),
            "--device": "cpu"}
    args = [a.format(tmp=tmp_path) for a in args]
    for flag in [a for a in args if a in base]:
        base.pop(flag)
    code, err = cli(capsys, "generate", *[x for kv in base.items() for x in kv], *args)
    assert_one_error_line(code, err, expected)
    assert list(tmp_path.iterdir()) == []


def test_batch_checks_video_arguments_first_and_ui_takes_a_video_model(capsys, tmp_path, tiny_models):
    job = tmp_path / "job.jsonl"
    job.write_text(json.dumps({"prompt": "x"}) + "\n")
    code, err = cli(capsys, "batch", job, "--encoder", DEAD, "--model", tiny_models["flux1"], "--out-dir",
                    tmp_path / "out", "--device", "cpu", "--num-frames", "5")
    assert_one_error_line(code, err, "--num-frames 5: is for video families")
    code, err = cli(capsys, "ui", "--encoder", DEAD, "--model", tiny_models["wan"], "--port", "0", "--device", "cpu",
                    "--timeout", "2")
    assert_one_error_line(code, err, f"no encoder server answered at {DEAD}")  # past every check, to the server
    assert not (tmp_path / "out").exists()


def test_a_job_line_with_frames_for_an_image_model_fails_alone(server, tiny_models, capsys, tmp_path):
    job = tmp_path / "job.jsonl"
    job.write_text(json.dumps({"prompt": "x", "num_frames": 5}) + "\n" + json.dumps({"prompt": "y", "fps": 8}) + "\n"
                   + json.dumps({"prompt": "z", "num_frames": 7}) + "\n" + json.dumps({"prompt": "fine"}) + "\n")
    code, err = cli(capsys, "batch", job, "--encoder", server.address, "--model", tiny_models["sd3"], "--out-dir",
                    tmp_path / "out", "--steps", "1", "--width", "32", "--height", "32", "--max-sequence-length", 16)
    out = capsys.readouterr()
    assert code == 1
    report = err + out.out + out.err
    assert "failed line 1: StableDiffusion3Pipeline takes no num_frames: drop num_frames" in report
    assert "failed line 2: StableDiffusion3Pipeline makes images: drop fps" in report
    assert "failed line 3: num_frames=7 must be 4k+1" in report
    assert len((tmp_path / "out" / "results.jsonl").read_text().splitlines()) == 1


def test_the_node_refuses_what_its_pipeline_would_ignore_or_round(tiny_models):
    from denoiser_client.node import DenoiserNode, RenderItem

    qwen = DenoiserNode(load_denoiser(str(tiny_models["qwen-image"]))[0])
    assert "takes guidance_scale only for guidance-distilled models" in qwen.check(RenderItem("x", guidance=3.0))
    assert qwen.check(RenderItem("x", true_cfg_scale=4.0, negative_prompt="blurry")) is None
    wan = DenoiserNode(load_denoiser(str(tiny_models["wan"]))[0])
    assert wan.check(RenderItem("x", width=48, height=32, num_frames=9)) is None
    wan.pipe.vae_scale_factor_spatial = 16  # a 16x VAE, as Wan 2.2's 5B model has: 2x2 patches need 32
    assert wan.check(RenderItem("x", width=48)) == "width=48: WanPipeline with this VAE needs a multiple of 32 (e.g. 32)"
    assert "num_frames=7: WanPipeline with this VAE takes 4k+1 frames (e.g. 5)" == wan.check(RenderItem("x", num_frames=7))
