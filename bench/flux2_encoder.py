"""FLUX.2-dev text encoding: diffusers' full Mistral3 forward against promptcast's truncated one.

Both paths run `Flux2Pipeline._get_mistral_3_small_prompt_embeds` (tokenization with the chat template, padding to
512 tokens, forward, stacking of hidden states 10/20/30). The diffusers path gives it the whole
`Mistral3ForConditionalGeneration` (40 layers, lm_head, vision tower); the truncated path gives it the server's
`TruncatedTextEncoder` made from the same model's first 30 layers, so the two outputs must agree.

Weights are random, built directly on the device in Mistral Small 3.1's shapes; the tokenizer is the tiny test model's
(only the padded token count matters for speed). Prints a table and writes JSON.

    python bench/flux2_encoder.py --out bench/results/flux2_encoder.json      # CUDA, bf16, about a minute on an H100
    python bench/flux2_encoder.py --tiny --out /tmp/flux2_encoder.json        # tiny shapes, CPU smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # runnable from a checkout, uninstalled

LAYERS = (10, 20, 30)
PROMPTS = [
    "a photo of a cat sitting on a wooden table next to a cup of coffee, soft morning light",
    "an astronaut riding a horse on the surface of the moon, digital art, cinematic lighting",
    "portrait of an old fisherman with a grey beard and a wool hat, oil painting, dramatic shadows",
    "a futuristic city at night with neon signs, flying cars and rain on the streets, cyberpunk style",
]


def mistral3_config(tiny: bool):
    from transformers import Mistral3Config, MistralConfig, PixtralVisionConfig

    if tiny:
        text = MistralConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=40, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=16, vocab_size=4096, max_position_embeddings=4096,
                             sliding_window=None, tie_word_embeddings=False)
        vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     head_dim=16, image_size=64, patch_size=16)
    else:  # mistralai/Mistral-Small-3.1-24B-Instruct-2503, as FLUX.2-dev's text_encoder/config.json has it
        text = MistralConfig(hidden_size=5120, intermediate_size=32768, num_hidden_layers=40, num_attention_heads=32,
                             num_key_value_heads=8, head_dim=128, vocab_size=131072, max_position_embeddings=131072,
                             rope_theta=1e9, rms_norm_eps=1e-5, sliding_window=None,
                             tie_word_embeddings=False)
        vision = PixtralVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                     num_attention_heads=16, head_dim=64, image_size=1540, patch_size=14,
                                     rope_theta=10000.0)
    # Mistral Small 3.1 has a separate lm_head (tie_word_embeddings false): 0.67 B parameters diffusers runs.
    return Mistral3Config(text_config=text, vision_config=vision, image_token_index=10, spatial_merge_size=2,
                          multimodal_projector_bias=False, projector_hidden_act="gelu", tie_word_embeddings=False)


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gib(n_bytes: float | None) -> float | None:
    return None if n_bytes is None else round(n_bytes / 2**30, 3)


def measure(encode, batch: int, device: torch.device, warmup: int, iters: int) -> dict:
    """Median seconds of `encode(prompts)` end to end (tokenizing included) and peak device memory during it."""
    prompts = [PROMPTS[i % len(PROMPTS)] + f" #{i}" for i in range(batch)]
    for _ in range(warmup):
        encode(prompts)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        encode(prompts)
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    median = statistics.median(times)
    return {"batch": batch, "median_s": round(median, 5), "prompts_per_s": round(batch / median, 3),
            "peak_gib": gib(peak), "iters": iters}


def weights_bytes(device: torch.device) -> int | None:
    gc.collect()
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated(device)


def run(args) -> dict:
    from diffusers import Flux2Pipeline
    from transformers import Mistral3ForConditionalGeneration

    from encoder_server.families.truncated import TruncatedTextEncoder, load_tokenizer
    from shared.sources import resolve_source
    from promptcast.tiny_models import make_tiny_model

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_tokenizer(resolve_source(str(make_tiny_model(pathlib.Path(tmp) / "flux2", "flux2"))))
    config = mistral3_config(args.tiny)
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device(device):
        model = Mistral3ForConditionalGeneration._from_config(config, dtype=dtype).eval()
    build_s = time.perf_counter() - start

    def bench_path(text_encoder) -> dict:
        @torch.inference_mode()
        def encode(prompts):
            return Flux2Pipeline._get_mistral_3_small_prompt_embeds(
                text_encoder=text_encoder, tokenizer=tokenizer, prompt=prompts, device=device,
                max_sequence_length=args.max_sequence_length, hidden_states_layers=LAYERS)

        weights = weights_bytes(device)
        runs = [measure(encode, b, device, args.warmup, args.iters) for b in args.batch_sizes]
        agreement_prompts = [PROMPTS[i % len(PROMPTS)] + f" #{i}" for i in range(max(args.batch_sizes))]
        return {"weights_gib": gib(weights), "parameters": sum(p.numel() for p in text_encoder.parameters()),
                "runs": runs, "output": encode(agreement_prompts).float().cpu()}

    results = {"diffusers": bench_path(model)}
    # The server's model: the same weights' first 30 layers, no final norm, no lm_head, no vision tower.
    language_model = model.model.language_model
    del model, language_model.layers[max(LAYERS):]
    language_model.config.num_hidden_layers = max(LAYERS)
    results["truncated"] = bench_path(TruncatedTextEncoder(language_model, LAYERS))
    ref, out = results["diffusers"].pop("output"), results["truncated"].pop("output")
    diff = (ref - out).abs()
    agreement = {"bit_identical": bool(torch.equal(ref, out)), "max_abs_diff": diff.max().item(),
                 "max_rel_diff": (diff.max() / ref.abs().max()).item(), "shape": list(ref.shape),
                 "allclose_bf16": bool(torch.allclose(ref, out, rtol=1.6e-2, atol=1e-2 * ref.abs().max().item()))}
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "dtype": args.dtype, "tiny": args.tiny, "build_s": round(build_s, 2),
            "max_sequence_length": args.max_sequence_length, "hidden_states_layers": list(LAYERS),
            "results": results, "agreement": agreement}


def table(report: dict) -> str:
    full, cut = report["results"]["diffusers"], report["results"]["truncated"]
    lines = [f"{report['device']}, {report['dtype']}, {report['max_sequence_length']} tokens a prompt",
             f"{'':12}{'params':>12}{'weights GiB':>13}" + "".join(
                 f"{'b%d prompt/s' % r['batch']:>14}{'b%d peak GiB' % r['batch']:>14}" for r in full["runs"])]
    for name, res in (("diffusers", full), ("truncated", cut)):
        lines.append(f"{name:12}{res['parameters'] / 1e6:>11,.1f}M{res['weights_gib'] or float('nan'):>13.2f}" + "".join(
            f"{r['prompts_per_s']:>14.2f}{r['peak_gib'] or float('nan'):>14.2f}" for r in res["runs"]))

    def ratio(a, b):
        return f"{a / b:.2f}x" if a and b else "n/a"
    lines.append(f"{'trunc/diff':12}{ratio(cut['parameters'], full['parameters']):>12}"
                 f"{ratio(cut['weights_gib'], full['weights_gib']):>13}" + "".join(
                     f"{ratio(c['prompts_per_s'], f['prompts_per_s']):>14}{ratio(c['peak_gib'], f['peak_gib']):>14}"
                     for f, c in zip(full["runs"], cut["runs"])))
    a = report["agreement"]
    lines.append(f"outputs {a['shape']}: bit-identical {a['bit_identical']}, max |diff| {a['max_abs_diff']:.3g} "
                 f"({a['max_rel_diff']:.2g} of max |value|), allclose at bf16 tolerance {a['allclose_bf16']}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench/results/flux2_encoder.json"))
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--max-sequence-length", type=int, default=512)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available() and args.device in (None, "cpu"):
        parser.error("full-size shapes need a CUDA device (48 GB of bf16 weights); pass --tiny to smoke-test on CPU")
    report = run(args)
    print(table(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
