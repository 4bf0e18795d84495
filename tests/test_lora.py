"""LoRA styles on a denoiser node: diffusers' own results, switching without growth, bad files refused early."""

from __future__ import annotations

import gc
import json
import tracemalloc

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import save_file

from conftest import run_cli
from denoiser_client.batch import BatchOptions, run_batch
from denoiser_client.embeddings import RemoteEmbedder
from denoiser_client.jobs import JobDefaults
from denoiser_client.lora import LoraRef
from denoiser_client.lora import LoraAdapters, LoraError
from denoiser_client.pipeline import load_denoiser, remote_embeddings

CALL = dict(num_inference_steps=2, width=32, height=32, guidance_scale=3.5, max_sequence_length=16)
PROMPT = "a red fox in a watercolor style"


def make_lora(transformer: FluxTransformer2DModel, path, seed: int, targets: list[str]):
    """A LoRA for `transformer` in diffusers' format, with seeded random (non-zero) A and B matrices."""
    torch.manual_seed(seed)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False),
                            adapter_name="style")
    state = get_peft_model_state_dict(transformer, adapter_name="style")
    FluxPipeline.save_lora_weights(path.parent, transformer_lora_layers=state, weight_name=path.name)
    return str(path)


def make_lora_files(tiny_flux1, folder) -> dict[str, str]:
    """Two LoRAs of the tiny FLUX.1 transformer, `ink` (attention) and `film` (MLPs), and `wrong`: one made for a
    transformer of other shapes."""
    fresh = lambda: FluxTransformer2DModel.from_pretrained(tiny_flux1, subfolder="transformer")  # noqa: E731
    other = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=48,
                                   pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    return {"ink": make_lora(fresh(), folder / "ink.safetensors", 1, ["to_q", "to_k", "to_v", "to_out.0"]),
            "film": make_lora(fresh(), folder / "film.safetensors", 2, ["proj_mlp", "proj_out", "ff.net.2"]),
            "wrong": make_lora(other, folder / "other-model.safetensors", 3, ["to_q", "to_k"])}


@pytest.fixture(scope="module")
def loras(tiny_flux1, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    files = make_lora_files(tiny_flux1, folder)
    a, b, wrong_shape = files["ink"], files["film"], files["wrong"]
    unet = folder / "sd15-unet.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.randn(4, 320),
               "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.randn(320, 4)}, unet)
    return {"a": a, "b": b, "wrong_shape": wrong_shape, "unet": str(unet)}


@pytest.fixture(scope="module")
def reference(tiny_flux1):
    return FluxPipeline.from_pretrained(tiny_flux1)


def reference_image(reference, output_type="np"):
    with torch.no_grad():
        return reference(PROMPT, generator=torch.Generator().manual_seed(0), output_type=output_type, **CALL).images


@pytest.fixture
def node(tiny_flux1):
    pipe, _ = load_denoiser(str(tiny_flux1))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_two_loras_with_weights_equal_diffusers_and_none_is_the_base_bit_for_bit(reference, node, loras, client):
    base = reference_image(reference)
    reference.load_lora_weights(loras["a"], adapter_name="a")
    reference.load_lora_weights(loras["b"], adapter_name="b")
    reference.set_adapters(["a", "b"], [0.7, 0.4])
    styled = reference_image(reference)
    reference.unload_lora_weights()
    assert not np.array_equal(base, styled)  # the LoRAs really change the image

    embeds = remote_embeddings(client, "tiny-flux1", PROMPT, max_sequence_length=16)
    run = lambda: node(**embeds, generator=torch.Generator().manual_seed(0), output_type="np", **CALL).images  # noqa
    adapters = LoraAdapters(node)
    adapters.load([LoraRef(loras["a"]), LoraRef(loras["b"])])
    assert np.array_equal(run(), base)  # loaded but not active: the base model
    adapters.activate((LoraRef(loras["a"], 0.7), LoraRef(loras["b"], 0.4)))
    assert np.array_equal(run(), styled)
    adapters.activate(())
    assert np.array_equal(run(), base)
    adapters.activate((LoraRef(loras["a"], 0.7), LoraRef(loras["b"], 0.4)))  # and back again
    assert np.array_equal(run(), styled)


def test_job_lines_with_their_own_loras_match_diffusers_with_few_switches(reference, node, loras, client, tmp_path):
    def expected(names_weights):
        for name, _ in names_weights:
            reference.load_lora_weights(loras[name], adapter_name=name)
        if names_weights:
            reference.set_adapters([n for n, _ in names_weights], [w for _, w in names_weights])
        image = np.asarray(reference_image(reference, "pil")[0])
        reference.unload_lora_weights()
        return image

    styles = {"both": [("a", 0.7), ("b", 0.4)], "none": [], "ink": [("a", 1.0)]}
    lines = [{"prompt": PROMPT, "id": f"{style}-{i}", "loras": [{"path": loras[n], "weight": w} for n, w in spec]}
             for i in range(2) for style, spec in styles.items()]  # styles interleaved: both, none, ink, both...
    job = tmp_path / "job.jsonl"
    job.write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary = run_batch(job, tmp_path / "out", pipe=node, embedder=RemoteEmbedder(client, "tiny-flux1", 16),
                        defaults=JobDefaults(seed=0, steps=2, width=32, height=32, guidance=3.5,
                                             max_sequence_length=16),
                        options=BatchOptions(max_sequence_length=16, progress=False))
    assert summary.done == 6 and summary.ok
    assert summary.lora_switches == 2  # base first (no switch), then one switch per LoRA set, not five
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    for style, spec in styles.items():
        want = expected(spec)
        for row in (r for r in rows if r["id"].startswith(style)):
            assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / row["images"][0])), want), row["id"]
    assert not getattr(node.transformer, "peft_config", None)  # unloaded at the end of the job


def lora_layer_count(module) -> int:
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(m, LoraLayer) for m in module.modules())


def test_twenty_switches_do_not_grow_memory_and_unloading_frees_it(node, loras):
    base_params = sum(p.numel() for p in node.transformer.parameters())
    adapters = LoraAdapters(node)
    adapters.load([LoraRef(loras["a"]), LoraRef(loras["b"])])
    loaded_params = sum(p.numel() for p in node.transformer.parameters())
    layers = lora_layer_count(node.transformer)
    assert loaded_params > base_params and layers > 0
    cycle = [(LoraRef(loras["a"], 0.5),), (LoraRef(loras["b"], 1.0),),
             (LoraRef(loras["a"], 0.7), LoraRef(loras["b"], 0.4)), ()]
    for sets in cycle:  # one warm cycle: first-time allocations are not growth
        adapters.activate(sets)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(20):
        adapters.activate(cycle[i % len(cycle)])
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert adapters.switches == 24
    assert grown < 64 * 1024, grown  # bytes; loading one adapter again would be far more
    assert sum(p.numel() for p in node.transformer.parameters()) == loaded_params
    assert lora_layer_count(node.transformer) == layers
    adapters.unload()
    assert sum(p.numel() for p in node.transformer.parameters()) == base_params  # adapter weights freed
    assert not adapters.names and not getattr(node.transformer, "peft_config", None)


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("wrong_shape", "was made for another architecture"),
    ("unet", "belongs to no transformer"),
    ("pickle", "pickle formats are refused"),
])
def test_a_bad_lora_fails_before_any_denoising(node, loras, client, tmp_path, case, message):
    path = {"missing": str(tmp_path / "nope.safetensors"), "pickle": str(tmp_path / "old.bin")}.get(case) \
        or loras[case]
    if case == "pickle":
        (tmp_path / "old.bin").write_bytes(b"not read")
    job = tmp_path / "job.jsonl"
    job.write_text(json.dumps({"prompt": "fine"}) + "\n"
                   + json.dumps({"prompt": "styled", "loras": [{"path": path, "weight": 1.0}]}) + "\n")
    steps = []
    hook = node.transformer.register_forward_hook(lambda *a: steps.append(1))
    try:
        with pytest.raises(LoraError, match=message) as error:
            run_batch(job, tmp_path / "out", pipe=node, embedder=RemoteEmbedder(client, "tiny-flux1", 16),
                      defaults=JobDefaults(steps=2, width=32, height=32, max_sequence_length=16),
                      options=BatchOptions(max_sequence_length=16, progress=False))
    finally:
        hook.remove()
    assert path in str(error.value)
    assert steps == [] and not (tmp_path / "out" / "results.jsonl").read_text()  # nothing denoised, nothing written


def test_cli_refuses_a_missing_lora_before_denoising(flux1_server, tiny_flux1, tmp_path):
    job = tmp_path / "job.jsonl"
    job.write_text(json.dumps({"prompt": "x"}) + "\n")
    done = run_cli("batch", job, "--encoder", flux1_server.address, "--model", tiny_flux1, "--out-dir",
                   tmp_path / "out", "--steps", "1", "--width", "32", "--height", "32", "--device", "cpu",
                   "--lora", f"{tmp_path / 'missing.safetensors'}:0.8")
    assert done.returncode == 2 and "missing.safetensors' does not exist" in done.stderr  # 2: a bad argument
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()  # refused before anything was written


def test_loras_on_an_fp8_transformer_keep_their_values(tiny_flux1, node, loras, client):
    from denoiser_client.vram import VramOptions

    fp8, _ = load_denoiser(str(tiny_flux1), vram=VramOptions(quantize="fp8"))
    embeds = remote_embeddings(client, "tiny-flux1", PROMPT, max_sequence_length=16)
    images = []
    for pipe in (node, fp8):
        adapters = LoraAdapters(pipe)
        adapters.load([LoraRef(loras["a"])])
        adapters.activate((LoraRef(loras["a"], 0.8),))
        images.append(pipe(**embeds, generator=torch.Generator().manual_seed(0), output_type="np", **CALL).images)
        lora_dtypes = {p.dtype for n, p in pipe.transformer.named_parameters() if "lora_" in n}
        assert lora_dtypes == {torch.float32}  # the LoRA's own matrices are not squeezed into float8
        adapters.unload()
    assert {p.dtype for n, p in fp8.transformer.named_parameters() if n.endswith("to_q.weight")} == \
        {torch.float8_e4m3fn}
    assert np.isfinite(images[1]).all() and np.abs(images[1] - images[0]).mean() < 0.1
