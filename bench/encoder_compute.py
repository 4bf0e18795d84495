"""Text-encoder compute paths on the GPU, without the server: eager (as diffusers runs it) against `--compile`,
`--cuda-graphs`, both, and `--quantize fp8` (float8 compute), per batch size; MFU and fidelity against eager bf16.

Variants are set up as `promptcast serve` does with `--cuda-graphs`, `--compile` and `--quantize` (`accelerate` in
bench/encoder_throughput.py). The encoders are the benchmark's real-shape random-weight ones (T5-XXL + CLIP-L behind a `Flux1Encoder`; the FLUX.2-dev
Mistral Small 3.1 cut at layer 30 behind a `Flux2Encoder`), so every path runs the family's own `encode`: tokenizer,
forward, diffusers' post-processing. Throughput is prompts per second of `encode` plus the copy to the host.

    python bench/encoder_compute.py --families flux1 --out bench/results/encoder_compute_flux1.json  # CUDA, ~5 min
    python bench/encoder_compute.py --tiny --out /tmp/encoder_compute.json       # CPU smoke test (eager only)
"""

from __future__ import annotations

import argparse
import gc
import json
import pathlib
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from encoder_throughput import (accelerate, embeds, fidelity, flux1_encoder, flux1_flops_per_prompt, flux2_encoder,  # noqa: E402
                                flux2_flops_per_prompt, matmul_peak, prompt, sync)


def rate(encoder, size: int, iters: int) -> float:
    from encoder_server.host_copy import to_cpu as _to_cpu

    prompts = [prompt(i, f"rate{size}") for i in range(size)]
    for _ in range(2):
        _to_cpu(encoder.encode(prompts, None, 512))
    sync(encoder.device)
    start = time.perf_counter()
    for _ in range(iters):
        _to_cpu(encoder.encode(prompts, None, 512))
    return size * iters / (time.perf_counter() - start)


def measure(encoder, label, sizes, flops, peak, reference, prompts, iters) -> dict:
    start = time.perf_counter()
    got = embeds(encoder, prompts)  # the first call compiles / captures at batch 8
    result = {"first_call_s": round(time.perf_counter() - start, 1), **fidelity(reference, got),
              "bit_identical": bool(torch.equal(reference, got))}
    for size in sizes:
        try:
            r = rate(encoder, size, iters)
            result[str(size)] = {"prompts_per_s": round(r, 2), "mfu": round(r * flops / 1e12 / peak, 3)}
        except torch.OutOfMemoryError:
            result[str(size)] = {"status": "out of memory"}
            gc.collect()
            torch.cuda.empty_cache()
    print(f"  {label:24} {result}", flush=True)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "bench/results/encoder_compute_flux1.json")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--families", nargs="+", default=["flux1", "flux2"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--variants", nargs="*", default=["graphs", "compile", "compile+graphs", "fp8-dynamic",
                                                           "fp8-dynamic+graphs", "fp8-dynamic+compile+graphs"],
                        help="'+'-joined graphs, compile and a --quantize mode, as bench/encoder_throughput.py takes")
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels of eager at the largest size")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    from promptcast.tiny_models import make_tiny_model

    peak = matmul_peak(device, dtype, 1024 if args.tiny else 8192)
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "matmul_peak_tflops": round(peak, 1), "families": {}}
    print(f"matmul peak {peak:.1f} TFLOP/s", flush=True)
    builders = {"flux1": (flux1_encoder, flux1_flops_per_prompt), "flux2": (flux2_encoder, flux2_flops_per_prompt)}
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            build, flops_of = builders[family]
            encoder = build(device, dtype, args.tiny, make_tiny_model(pathlib.Path(tmp) / family, family))
            if hasattr(encoder, "after_baseline"):
                encoder.after_baseline()  # FLUX.2: the server's truncated decoder, not diffusers' whole model
            flops = flops_of(encoder)
            prompts = [prompt(i, "fidelity") for i in range(16)]
            reference = embeds(encoder, prompts)
            res = report["families"][family] = {"tflop_per_prompt": round(flops / 1e12, 3)}
            print(f"{family}: {flops / 1e12:.2f} TFLOP a prompt", flush=True)
            res["eager"] = measure(encoder, "eager", args.sizes, flops, peak, reference, prompts, args.iters)
            if args.profile and device.type == "cuda":
                from torch.profiler import ProfilerActivity, profile

                batch = [prompt(i, "profile") for i in range(max(args.sizes))]
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    encoder.encode(batch, None, 512)
                    sync(device)
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
            if device.type == "cuda":
                for variant in args.variants:
                    undo = None
                    try:
                        undo = accelerate(encoder, variant)
                        res[variant] = measure(encoder, variant, args.sizes, flops, peak, reference, prompts,
                                               args.iters)
                    except Exception as e:  # noqa: BLE001 - one failing path must not lose the others
                        res[variant] = {"status": f"failed: {type(e).__name__}: {e}"[:400]}
                        print(f"  {variant}: failed: {e!r}"[:400], flush=True)
                    finally:
                        if undo is not None:
                            undo()
            encoder = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
