"""What the HTTP gateway costs beside gRPC: per-request latency of a memory-cache hit, same server, same run.

One `EncoderServer` serves gRPC and HTTP (`--http-port`) on 127.0.0.1. Entries are written into its memory tier under
the keys it will look up, so only the transport is measured (no encode, no disk):
  * FLUX.1-sized: `prompt_embeds` (512, 4096) + `pooled_prompt_embeds` (768,), bf16, 4 MiB;
  * FLUX.2-sized: `prompt_embeds` (512, 15360), bf16, 15 MiB.
Each client asks for one prompt at a time and decodes the answer into tensors, as its users do (the clients take
turns, one request each, so drift on a shared machine hits them alike):
  * grpc: `RemoteTextEncoder.encode` (header + 1 MiB chunks, CRC32 checked, assembled into tensors);
  * http_predict_torch: `POST /predict` and `torch.load(..., weights_only=True)`, what the LoRA training script and
    diffusers' `Flux2RemoteTextEncoderStep` do (`prompt_embeds` only: FLUX.1's pooled output is not in this form);
  * http_predict_safetensors: the same with `Accept: application/vnd.safetensors` and `safetensors.torch.load`;
  * http_v1_encode: `POST /v1/encode` (safetensors, cache metadata);
  * http_predict_torch_new_connection: `requests.post` without a session, a new TCP connection per request, exactly as
    the training script calls it.
HTTP clients use `requests` (a `Session`, kept alive, except the last).

    python bench/http_gateway.py --out bench/results/http_gateway.json                  # CUDA box, ~1 minute
    python bench/http_gateway.py --tiny --out bench/results/http_gateway_cpu_tiny.json  # CPU, fewer requests
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import pathlib
import platform
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # runnable from a checkout, uninstalled

from shared.cache_keys import embedding_key  # noqa: E402

SHAPES = {"flux1_4mib": {"prompt_embeds": (512, 4096), "pooled_prompt_embeds": (768,)},
          "flux2_15mib": {"prompt_embeds": (512, 15360)}}


def summary(seconds: list[float], sizes: list[int]) -> dict:
    ms = np.array(seconds) * 1000
    return {"n": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3), "mean_ms": round(float(ms.mean()), 3),
            "response_bytes": int(np.median(sizes))}


def clients(grpc_client, base_url: str):
    """name -> fn(prompt) returning (tensors, bytes received)."""
    import requests
    from safetensors.torch import load

    session = requests.Session()

    def grpc(prompt):
        tensors, info = grpc_client.encode(prompt, with_info=True)
        return tensors, info.bytes_received

    def predict_torch(prompt, post=session.post):
        r = post(base_url + "/predict", json={"prompt": prompt}, headers={"Content-Type": "application/json"})
        r.raise_for_status()
        return {"prompt_embeds": torch.load(io.BytesIO(r.content), weights_only=True)}, len(r.content)

    def predict_safetensors(prompt):
        r = session.post(base_url + "/predict", json={"prompt": prompt},
                         headers={"Accept": "application/vnd.safetensors"})
        r.raise_for_status()
        return load(r.content), len(r.content)

    def v1_encode(prompt):
        r = session.post(base_url + "/v1/encode", json={"prompts": [prompt]})
        r.raise_for_status()
        return load(r.content), len(r.content)

    return {"grpc": grpc, "http_predict_torch": predict_torch, "http_predict_safetensors": predict_safetensors,
            "http_v1_encode": v1_encode,
            "http_predict_torch_new_connection": lambda prompt: predict_torch(prompt, post=requests.post)}


def measure(fns: dict, prompts: list[str], expected: dict, requests_: int) -> dict:
    """Every client in turn, one request each, `requests_` rounds: drift on a shared machine hits them alike."""
    for fn in fns.values():
        for prompt in prompts[:3]:  # warm-up (connections, allocator), not recorded
            fn(prompt)
    seconds, sizes = {name: [] for name in fns}, {name: [] for name in fns}
    for i in range(requests_):
        prompt = prompts[i % len(prompts)]
        for name, fn in fns.items():
            started = time.perf_counter()
            tensors, size = fn(prompt)
            seconds[name].append(time.perf_counter() - started)
            sizes[name].append(size)
            for output, tensor in tensors.items():  # every form answers the stored bytes (checked outside the timing)
                want = expected[prompt][output]
                if tensor.dtype != want.dtype or not torch.equal(tensor[0], want):
                    raise RuntimeError(f"{name}: {output} of {prompt!r} differs from the cached entry")
    return {name: summary(seconds[name], sizes[name]) for name in fns}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench/results/http_gateway.json"))
    parser.add_argument("--tiny", action="store_true", help="CPU, fewer requests (the entries keep their sizes)")
    parser.add_argument("--requests", type=int, help="requests measured per client and entry size (200; --tiny: 30)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args.requests = args.requests or (30 if args.tiny else 200)

    from denoiser_client import RemoteTextEncoder
    from encoder_server.families import get_encoder
    from encoder_server.server import BackgroundServer, ServerConfig
    from promptcast.tiny_models import make_tiny_model

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    work = pathlib.Path(tempfile.mkdtemp(prefix="promptcast-http-bench-"))
    # The model only names the keys (its fingerprint) and warms up: every request below is a memory hit.
    encoder = get_encoder(str(make_tiny_model(work / "tiny-flux1", "flux1")), name="flux1", device=str(device))
    config = ServerConfig(models=[], port=0, http_port=0, host="127.0.0.1", device=str(device), cache_mem=8 << 30,
                          cache_dir=None)
    results = {}
    with BackgroundServer(config, encoders=[encoder]) as server, \
            RemoteTextEncoder(server.address, timeout=120) as grpc_client:
        cache, length = server.server.service.cache, encoder.default_max_sequence_length
        for entry, shapes in SHAPES.items():
            expected = {}
            for i in range(8):
                prompt = f"{entry} entry number {i}"
                expected[prompt] = {name: torch.randn(shape).to(torch.bfloat16) for name, shape in shapes.items()}
                cache.put(embedding_key(encoder.fingerprint, length, prompt, None), expected[prompt])
            prompts = list(expected)
            results[entry] = {"entry_bytes": sum(t.numel() * t.element_size() for t in expected[prompts[0]].values())}
            results[entry].update(measure(clients(grpc_client, server.http_url), prompts, expected, args.requests))
            grpc_p50 = results[entry]["grpc"]["p50_ms"]
            results[entry]["p50_over_grpc_p50"] = {name: round(r["p50_ms"] / grpc_p50, 2)
                                                   for name, r in results[entry].items()
                                                   if isinstance(r, dict) and "p50_ms" in r and name != "grpc"}

    report = {
        "benchmark": "http_gateway", "tiny": args.tiny, "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpus": __import__("os").cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
        "notes": ["memory-cache hits only, one prompt a request, sequential, over loopback, client side: the "
                  "difference between clients is transport, serialization and decoding",
                  "http_predict_torch carries prompt_embeds only (FLUX.1: 4,194,304 of the entry's bytes); the "
                  "others carry every output",
                  "the device only holds the warm-up model: cached entries are CPU tensors on every device"],
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'entry':<13}{'client':<36}{'p50 ms':>9}{'p99 ms':>9}{'bytes':>11}{'p50 / grpc':>12}")
    for entry, r in results.items():
        for name, m in r.items():
            if isinstance(m, dict) and "p50_ms" in m:
                ratio = r["p50_over_grpc_p50"].get(name, 1.0)
                print(f"{entry:<13}{name:<36}{m['p50_ms']:>9.2f}{m['p99_ms']:>9.2f}{m['response_bytes']:>11}"
                      f"{ratio:>11.2f}x")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
