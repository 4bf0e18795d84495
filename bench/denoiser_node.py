"""Denoiser node vs the plain FluxPipeline: peak memory, a 24 GiB card, and the cost of remote embeddings.

FLUX.1-dev shapes with random weights, built directly on the GPU (no files): the transformer (19 double + 38 single
blocks, 3072 wide), the FLUX VAE (16 latent channels), and for the plain pipeline T5-XXL (4096 x 24 layers) and
CLIP-L. Tokenizers are the tiny test model's (only the padded token count matters for speed and memory).

1. memory: peak GPU memory of one 1024x1024 image, plain FluxPipeline (T5-XXL + CLIP + transformer + VAE on the
   GPU) vs the denoiser node (transformer + VAE, embeddings given), node in bf16 and with --quantize fp8.
2. consumer: the process capped at 24 GiB (`set_per_process_memory_fraction`); images/minute of a 10-prompt job,
   the node (bf16 if it fits, and fp8) vs the plain pipeline with `enable_model_cpu_offload()`, one call a prompt.
   The node's embeddings come from memory here: in the capped process an in-process server's T5 would count
   against the node's 24 GiB, while a real encoder server runs on another box; part 3 measures that cost.
3. overhead: a 20-prompt `run_batch` job whose embeddings come from a real local encoder server (T5-XXL + CLIP-L at
   real shapes on the same GPU, gRPC over loopback, prefetch 4) vs the same job fed precomputed embeddings.

    python bench/denoiser_node.py --out bench/results/denoiser_node.json    # CUDA, about 4-5 minutes
    python bench/denoiser_node.py --tiny --out /tmp/denoiser_node.json      # tiny shapes on CPU, smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import pathlib
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # runnable from a checkout, uninstalled

PROMPTS = [
    "a photo of a cat sitting on a wooden table next to a cup of coffee, soft morning light",
    "an astronaut riding a horse on the surface of the moon, digital art, cinematic lighting",
    "portrait of an old fisherman with a grey beard and a wool hat, oil painting, dramatic shadows",
    "a futuristic city at night with neon signs, flying cars and rain on the streets, cyberpunk style",
    "a small red fox sleeping in the snow under a pine tree, wildlife photography",
]


def prompts(n: int, tag: str) -> list[str]:
    return [f"{PROMPTS[i % len(PROMPTS)]}, {tag} #{i}" for i in range(n)]


def gib(n_bytes):
    return None if n_bytes is None else round(n_bytes / 2**30, 3)


def build_models(tiny_dir: pathlib.Path, tiny: bool, device: torch.device, dtype: torch.dtype):
    """(scheduler, tokenizer, tokenizer_2, clip, t5, transformer, vae) at FLUX.1-dev shapes (or tiny)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_dir, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(tiny_dir, subfolder="tokenizer")
    tokenizer_2 = T5TokenizerFast.from_pretrained(tiny_dir, subfolder="tokenizer_2")
    if tiny:
        clip = CLIPTextModel.from_pretrained(tiny_dir, subfolder="text_encoder", dtype=dtype).to(device)
        t5 = T5EncoderModel.from_pretrained(tiny_dir, subfolder="text_encoder_2", dtype=dtype).to(device)
        transformer = FluxTransformer2DModel.from_pretrained(tiny_dir, subfolder="transformer", dtype=dtype).to(device)
        vae = AutoencoderKL.from_pretrained(tiny_dir, subfolder="vae", dtype=dtype).to(device)
        return scheduler, tokenizer, tokenizer_2, clip, t5, transformer, vae
    torch.manual_seed(0)
    clip_config = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                 num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
                                 hidden_act="quick_gelu")
    t5_config = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                         feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, dense_act_fn="gelu_new",
                         is_gated_act=True)
    with torch.device(device):
        clip = CLIPTextModel._from_config(clip_config, dtype=dtype).eval()
        t5 = T5EncoderModel._from_config(t5_config, dtype=dtype).eval()
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # diffusers models: parameters created in bf16 directly, no fp32 copy
        try:
            transformer = FluxTransformer2DModel(
                num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=4096, pooled_projection_dim=768, in_channels=64, guidance_embeds=True,
                axes_dims_rope=[16, 56, 56]).eval()
            vae = AutoencoderKL(  # black-forest-labs/FLUX.1-dev vae/config.json
                in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512],
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                layers_per_block=2, act_fn="silu", norm_num_groups=32, sample_size=1024, scaling_factor=0.3611,
                shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
                mid_block_add_attention=True).eval()
        finally:
            torch.set_default_dtype(previous)
    return scheduler, tokenizer, tokenizer_2, clip, t5, transformer, vae


def light_encoders(device, dtype) -> dict:
    """T5 and CLIP with FLUX.1's output widths (4096, 768) but one layer each: almost no GPU time."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.device(device):
        clip = CLIPTextModel._from_config(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=1, num_attention_heads=12,
            max_position_embeddings=77, projection_dim=768), dtype=dtype).eval()
        t5 = T5EncoderModel._from_config(T5Config(
            vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=1, num_heads=64,
            feed_forward_proj="gated-gelu"), dtype=dtype).eval()
    return {"text_encoder": clip, "text_encoder_2": t5}


def memory_embedder(encoder, texts):
    """Precomputed embeddings, computed in this process (so the server's cache stays cold for part 3)."""
    from denoiser_client.embeddings import MemoryEmbedder

    out = {}
    for text in texts:
        tensors = encoder.encode([text], None, encoder.default_max_sequence_length)
        out[text] = {name: t[0].cpu() for name, t in tensors.items()}  # one prompt's rows, as the node batches them
    return MemoryEmbedder(out)


def write_job(path: pathlib.Path, texts: list[str]) -> pathlib.Path:
    path.write_text("".join(json.dumps({"prompt": t, "id": f"p{i}"}) + "\n" for i, t in enumerate(texts)))
    return path


def run_job(pipe, embedder, texts, size, steps, tmp: pathlib.Path, name: str, prefetch=4) -> dict:
    """`run_batch` over `texts`, timed end to end (PNG writing and result lines included)."""
    from denoiser_client.batch import BatchOptions, run_batch
    from denoiser_client.jobs import JobDefaults

    job = write_job(tmp / f"{name}.jsonl", texts)
    defaults = JobDefaults(steps=steps, width=size, height=size, guidance=3.5, model="bench")
    start = time.perf_counter()
    summary = run_batch(job, tmp / name, pipe=pipe, embedder=embedder, defaults=defaults,
                        options=BatchOptions(prefetch=prefetch, progress=False))
    seconds = time.perf_counter() - start
    return {"images": summary.done, "failed": [r for _, r in summary.failed][:2], "seconds": round(seconds, 3),
            "images_per_min": round(60 * summary.done / seconds, 2) if summary.done else 0.0}


def reset_peak(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak(device):
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def run(args) -> dict:
    from diffusers import FluxPipeline

    from denoiser_client import RemoteTextEncoder
    from denoiser_client.embeddings import RemoteEmbedder
    from denoiser_client.vram import VramOptions, enable_vae_tiling, transformer_bytes
    from encoder_server.families.base import Encoder
    from encoder_server.families.flux1 import Flux1Encoder
    from encoder_server.server import BackgroundServer, ModelSpec, ServerConfig
    from promptcast.tiny_models import make_tiny_model

    class InMemoryFlux1Encoder(Flux1Encoder):
        """The server's FLUX.1 family code around encoders already built in memory."""

        def __init__(self, name, pipe, device, dtype):
            Encoder.__init__(self, name, None, device, dtype)
            self.pipe, self._fingerprint = pipe, f"bench-{name}"

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    size, steps, mem_steps = (64, 2, 1) if args.tiny else (1024, args.steps, args.memory_steps)
    result = {"device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
              "torch": torch.__version__, "dtype": str(dtype), "size": size, "steps": steps,
              "memory_steps": mem_steps, "tiny": args.tiny}
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="promptcast-bench-"))
    tiny_dir = make_tiny_model(tmp / "tiny-flux1", "flux1")
    start = time.perf_counter()
    scheduler, tok, tok2, clip, t5, transformer, vae = build_models(tiny_dir, args.tiny, device, dtype)
    result["build_s"] = round(time.perf_counter() - start, 1)
    plain = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tok, text_encoder_2=t5,
                         tokenizer_2=tok2, transformer=transformer)
    node = FluxPipeline(scheduler=scheduler, vae=vae, transformer=transformer, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None)
    for pipe in (plain, node):
        pipe.set_progress_bar_config(disable=True)
    encoder_pipe = FluxPipeline(scheduler=None, vae=None, transformer=None, text_encoder=clip, tokenizer=tok,
                                text_encoder_2=t5, tokenizer_2=tok2)
    encoder = InMemoryFlux1Encoder("bench-flux1", encoder_pipe, device, dtype)
    call = dict(width=size, height=size, guidance_scale=3.5, generator=torch.Generator("cpu").manual_seed(0))

    # 1a. the plain pipeline, everything on the GPU
    with torch.inference_mode():
        plain("warm-up", num_inference_steps=1, **call)
        reset_peak(device)
        plain(PROMPTS[0], num_inference_steps=mem_steps, **call)
    memory = {"plain_bf16_peak_gib": gib(peak(device))}
    print(f"[memory] plain FluxPipeline peak {memory['plain_bf16_peak_gib']} GiB", flush=True)

    # 3. overhead: remote embeddings (real server, same GPU) vs precomputed ones, same run_batch job
    n = 3 if args.tiny else args.overhead_prompts
    memory_texts = prompts(n, "memory")
    overhead_steps = steps if args.tiny else args.overhead_steps
    embedder = memory_embedder(encoder, memory_texts + ["warm-up"])
    run_job(node, embedder, ["warm-up"], size, overhead_steps, tmp, "warm")
    baseline = run_job(node, embedder, memory_texts, size, overhead_steps, tmp, "overhead-memory")
    overhead = {"prompts": n, "steps": overhead_steps, "prefetch": 4, "memory_s": baseline["seconds"]}
    # Two servers: the real-size encoders (their encodes share this one GPU with the denoiser, which a deployment
    # does not do), and a 1-layer T5/CLIP with the same output widths, whose GPU time is negligible, so what remains
    # is the remote path itself: gRPC, 4 MiB per prompt, decoding, the prefetch thread.
    light = encoder if args.tiny else InMemoryFlux1Encoder("bench-light", FluxPipeline(
        scheduler=None, vae=None, transformer=None, tokenizer=tok, tokenizer_2=tok2,
        **light_encoders(device, dtype)), device, dtype)
    for label, server_encoder in (("real_size_encoder_same_gpu", encoder), ("light_encoder", light)):
        config = ServerConfig([ModelSpec(server_encoder.name)], port=0, device=str(device), cache_dir=None)
        with BackgroundServer(config, encoders=[server_encoder]) as server, \
                RemoteTextEncoder(server.address, timeout=300) as client:
            remote_embedder = RemoteEmbedder(client, server_encoder.name)
            remote = run_job(node, remote_embedder, prompts(n, label), size, overhead_steps, tmp, label)
        overhead[label] = {"server_s": remote["seconds"], "extra": round(remote["seconds"] / baseline["seconds"] - 1, 4),
                           "extra_s_per_item": round((remote["seconds"] - baseline["seconds"]) / n, 4),
                           "server_encode_s_total": round(remote_embedder.server_seconds, 3),
                           "failed": remote["failed"]}
        print(f"[overhead] {n} prompts: precomputed {baseline['seconds']}s, via server ({label}) "
              f"{remote['seconds']}s (+{100 * overhead[label]['extra']:.1f}%)", flush=True)

    # 1b. the node in bf16: text encoders off the GPU (kept in CPU memory for the offload baseline)
    clip.to("cpu"), t5.to("cpu"), light.pipe.text_encoder.to("cpu"), light.pipe.text_encoder_2.to("cpu")
    reset_peak(device)
    one = run_job(node, embedder, memory_texts[:1], size, mem_steps, tmp, "memory-node-bf16")
    memory["node_bf16_peak_gib"] = gib(peak(device))
    memory["node_bf16_failed"] = one["failed"]
    memory["transformer_bf16_gib"] = gib(transformer_bytes(node))

    # 2. a 24 GiB card
    consumer = {"cap_gib": args.cap_gib, "prompts": args.consumer_prompts if not args.tiny else 2}
    texts = memory_texts[:consumer["prompts"]]
    if cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * 2**30 / total),
                                                   device.index if device.index is not None else 0)
        reset_peak(device)
    tiles = vae.tile_sample_min_size, vae.tile_latent_min_size
    enable_vae_tiling(vae)  # --vae-tiling: a bf16 transformer (22.2 GiB) leaves too little for a whole 1024^2 decode
    consumer["node_bf16"] = run_job(node, embedder, texts, size, steps, tmp, "consumer-node-bf16")
    consumer["node_bf16"].update(peak_gib=gib(peak(device)), vae_tiling=True)
    vae.disable_tiling(), vae.disable_slicing()
    vae.tile_sample_min_size, vae.tile_latent_min_size = tiles
    print(f"[consumer] node bf16: {consumer['node_bf16']}", flush=True)
    transformer.to("cpu")
    reset_peak(device)
    if cuda:
        plain.enable_model_cpu_offload(device=device)
    start, done, error = time.perf_counter(), 0, None
    plain_texts = texts[:args.plain_prompts or len(texts)]
    try:
        with torch.inference_mode():
            for i, text in enumerate(plain_texts):  # what a 24 GB user runs today: one call a prompt
                plain(text, num_inference_steps=steps, **{**call, "generator": torch.Generator("cpu").manual_seed(i)})
                done += 1
    except torch.OutOfMemoryError as e:
        error = f"out of memory: {str(e)[:200]}"
    seconds = time.perf_counter() - start
    # Each call moves the same weights (T5, then the transformer, then the VAE) onto the GPU: the rate is per image,
    # so fewer prompts measure it just as well and keep the benchmark inside its time budget.
    consumer["plain_offload"] = {"images": done, "seconds": round(seconds, 3), "error": error,
                                 "images_per_min": round(60 * done / seconds, 2), "peak_gib": gib(peak(device)),
                                 "offload": "enable_model_cpu_offload" if cuda else "none (CPU)"}
    print(f"[consumer] plain + model offload: {consumer['plain_offload']}", flush=True)
    plain.remove_all_hooks()

    # 1c + 2. the node with --quantize fp8 (layerwise casting), still under the cap
    vae.to(device), transformer.to(device)
    VramOptions(quantize="fp8").apply(node, str(device), dtype)
    memory["transformer_fp8_gib"] = gib(transformer_bytes(node))
    run_job(node, embedder, ["warm-up"], size, mem_steps, tmp, "warm-fp8")
    reset_peak(device)
    run_job(node, embedder, memory_texts[1:2], size, mem_steps, tmp, "memory-node-fp8")
    memory["node_fp8_peak_gib"] = gib(peak(device))
    reset_peak(device)
    consumer["node_fp8"] = run_job(node, embedder, texts, size, steps, tmp, "consumer-node-fp8")
    consumer["node_fp8"]["peak_gib"] = gib(peak(device))
    print(f"[consumer] node fp8: {consumer['node_fp8']}", flush=True)

    if cuda:
        base = memory["plain_bf16_peak_gib"]
        memory["ratio_bf16"] = round(memory["node_bf16_peak_gib"] / base, 3)
        memory["ratio_fp8"] = round(memory["node_fp8_peak_gib"] / base, 3)
    node_best = max(consumer["node_bf16"]["images_per_min"], consumer["node_fp8"]["images_per_min"])
    plain_rate = consumer["plain_offload"]["images_per_min"] or float("nan")
    consumer["speedup_best_node"] = round(node_best / plain_rate, 2)
    consumer["speedup_fp8_node"] = round(consumer["node_fp8"]["images_per_min"] / plain_rate, 2)
    result.update(memory=memory, consumer=consumer, overhead=overhead)
    result["expect"] = {"ratio_bf16<=": 0.75, "ratio_fp8<=": 0.45, "consumer_speedup>=": 2.0, "overhead<=": 0.03}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results/denoiser_node.json")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU: the same code paths, a smoke test")
    parser.add_argument("--device", default=None)
    parser.add_argument("--steps", type=int, default=4, help="steps per image for the timed jobs (parts 2 and 3)")
    parser.add_argument("--memory-steps", type=int, default=2, help="steps for the peak-memory images (part 1)")
    parser.add_argument("--consumer-prompts", type=int, default=10)
    parser.add_argument("--overhead-prompts", type=int, default=20)
    parser.add_argument("--overhead-steps", type=int, default=8, help="steps per image in part 3")
    parser.add_argument("--cap-gib", type=float, default=24.0)
    parser.add_argument("--plain-prompts", type=int, default=3,
                        help="prompts timed for the offloaded plain pipeline (about 25 s each on an H100); 0 = all")
    args = parser.parse_args()
    if args.tiny and args.device is None:
        args.device = "cpu"
    result = run(args)
    print(json.dumps(result, indent=2))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
