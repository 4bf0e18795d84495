"""Where the device's time goes in one FLUX.1 text-encoder forward (T5-XXL + CLIP-L, random bf16 weights at the real
shapes): `torch.profiler` kernel times grouped as matmuls, attention, normalization and elementwise, copies, other;
at batch 1 and at the server's full batch, beside the wall time of the same forward and its matmul-only bound.
With `--fused`, each batch again with the server's fused elementwise kernels (`encoder_server.fused_kernels`), and
whether its outputs are the eager forward's bytes.

    python bench/encoder_kernels.py --out bench/results/encoder_kernels_h200.json    # CUDA, ~1 min
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from encoder_throughput import flux1_encoder, flux1_flops_per_prompt, matmul_peak, prompt  # noqa: E402
from flux2_encoder import sync  # noqa: E402

GROUPS = (  # first match wins, on the kernel's lowercased name
    ("attention", ("fmha", "flash", "attention", "efficient_attention", "cudnn", "softmax")),
    ("matmul", ("gemm", "cutlass", "sm90_xmma", "nvjet", "matmul", "cublas")),
    ("norm_and_elementwise", ("elementwise", "vectorized", "reduce", "pow", "rsqrt", "tanh", "mul", "add",
                              "norm", "unrolled", "index", "gelu", "fill", "cat", "where", "triton")),
    ("copy", ("memcpy", "memset", "copy")),
)


def group_of(name: str) -> str:
    lowered = name.lower()
    return next((group for group, keys in GROUPS if any(k in lowered for k in keys)), "other")


def profile(encoder, batch: int) -> dict:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    prompts = [prompt(i, f"kernels{batch}") for i in range(batch)]
    for _ in range(2):
        encoder.encode(prompts, None, 512)
    sync(encoder.device)
    start = time.perf_counter()
    for _ in range(3):
        encoder.encode(prompts, None, 512)
    sync(encoder.device)
    wall = (time.perf_counter() - start) / 3
    cuda = encoder.device.type == "cuda"
    with torch_profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        encoder.encode(prompts, None, 512)
        sync(encoder.device)
    groups: dict[str, float] = {}
    top: dict[str, list] = {}
    kernels = 0
    for event in prof.key_averages():
        seconds = (event.device_time_total if cuda else event.self_cpu_time_total) / 1e6
        if seconds <= 0 or (not cuda and event.key.startswith("aten::") is False):
            continue
        group = group_of(event.key)
        groups[group] = groups.get(group, 0.0) + seconds
        top.setdefault(group, []).append((seconds, event.key[:90], event.count))
        kernels += event.count
    device_total = sum(groups.values())
    return {"batch": batch, "wall_ms": round(1000 * wall, 2), "device_ms": round(1000 * device_total, 2),
            "kernels": kernels,
            "groups_ms": {g: round(1000 * s, 2) for g, s in sorted(groups.items(), key=lambda kv: -kv[1])},
            "groups_share": {g: round(s / device_total, 3) for g, s in groups.items()},
            "top": {g: [(round(1000 * s, 2), name, count) for s, name, count in sorted(items, reverse=True)[:4]]
                    for g, items in top.items()}}


def fused_batches(encoder, batches: list[int], eager: dict) -> dict:
    """Each batch with the fused kernels: the profile, its device and wall time against eager's, and whether every
    output is byte for byte the eager forward's on the same prompts."""
    from encoder_server.fused_kernels import fuse_elementwise, unfuse_elementwise

    modules = [encoder.pipe.text_encoder, encoder.pipe.text_encoder_2]
    outputs = {}
    for batch in batches:
        prompts = [prompt(i, f"fused{batch}") for i in range(batch)]
        outputs[batch] = {k: v.cpu() for k, v in encoder.encode(prompts, None, 512).items()}
    changed = sum(fuse_elementwise(module) for module in modules)
    out = {"modules_fused": changed}
    try:
        for batch in batches:
            prompts = [prompt(i, f"fused{batch}") for i in range(batch)]
            got = {k: v.cpu() for k, v in encoder.encode(prompts, None, 512).items()}
            result = profile(encoder, batch)
            result["identical"] = all(torch.equal(outputs[batch][k], got[k]) for k in got)
            result["x_eager_device"] = round(eager[str(batch)]["device_ms"] / result["device_ms"], 3)
            result["x_eager_wall"] = round(eager[str(batch)]["wall_ms"] / result["wall_ms"], 3)
            out[str(batch)] = result
            print("fused", json.dumps(result), flush=True)
    finally:
        for module in modules:
            unfuse_elementwise(module)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "bench/results/encoder_kernels.json")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (smoke test of the script)")
    parser.add_argument("--fused", action="store_true", help="also with the fused elementwise kernels (CUDA)")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    from promptcast.tiny_models import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        encoder = flux1_encoder(device, dtype, args.tiny, make_tiny_model(pathlib.Path(tmp) / "flux1", "flux1"))
        peak = matmul_peak(device, dtype, 1024 if args.tiny else 8192)
        flops = flux1_flops_per_prompt(encoder)
        report = {"benchmark": "encoder_kernels", "device": torch.cuda.get_device_name() if device.type == "cuda"
                  else "cpu", "torch": torch.__version__, "matmul_peak_tflops": round(peak, 1),
                  "tflop_per_prompt": round(flops / 1e12, 3),
                  "attention": encoder.pipe.text_encoder_2.config._attn_implementation, "batches": {}}
        for batch in args.batches:
            result = profile(encoder, batch)
            result["matmul_bound_ms"] = round(1000 * batch * flops / 1e12 / peak, 2)  # every FLOP at the peak
            result["mfu"] = round(result["matmul_bound_ms"] / result["wall_ms"], 3)
            report["batches"][str(batch)] = result
            print(json.dumps(result), flush=True)
        if args.fused:
            report["fused"] = fused_batches(encoder, args.batches, report["batches"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
