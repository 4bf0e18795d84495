"""Per-request latency of an embedding cache miss (a real encode) against a hit from each tier, over loopback gRPC.

One run measures, through a real `EncoderServer` and `RemoteTextEncoder` on 127.0.0.1:
  * FLUX.1 entries (4 MiB: T5 prompt_embeds (512, 4096) + CLIP pooled (768,), bf16) from FLUX.1-dev-shaped
    encoders with random weights built on the GPU (T5-XXL 24 layers d_model 4096, CLIP-L 12 layers hidden 768):
    a miss (tokenize + forward + store in every tier), then hits from memory, disk and Redis;
  * FLUX.2-sized entries (15 MiB: one (512, 15360) bf16 tensor). Building Mistral Small 3.1 is
    bench/flux2_encoder.py's job, so these entries are *written into the tiers directly* under the keys the
    server looks up, and only hits are measured (no miss).
A disk hit is measured with the memory tier emptied before each request; a Redis hit with memory emptied and the
disk file deleted. As in production, a lower-tier hit also fills the tiers above it (a Redis hit writes the disk
file, fsync included), and that is part of its latency. Redis is measured only where a `redis-server` binary is
found (`--redis-server`, else PATH) and the `redis` package imports; otherwise it is reported as not measured.

    python bench/cache_latency.py --out bench/results/cache_latency.json     # CUDA, bf16, about 1.5 minutes
    python bench/cache_latency.py --tiny --out /tmp/cache_latency.json       # tiny shapes, CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # runnable from a checkout, uninstalled

from encoder_server.families.base import Encoder  # noqa: E402
from encoder_server.families.flux1 import Flux1Encoder  # noqa: E402
from shared.sources import ModelSource  # noqa: E402
from shared.cache_keys import embedding_key, model_fingerprint  # noqa: E402


class RandomFlux1Encoder(Flux1Encoder):
    """FLUX.1's encode path (diffusers' `FluxPipeline.encode_prompt`) over random-weight encoders made in memory."""

    def __init__(self, tiny: bool, device: torch.device, tokenizer_dir: pathlib.Path):
        from diffusers import FluxPipeline
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

        Encoder.__init__(self, "flux1-dev-random", ModelSource("random-weights", "random-weights"), device,
                         torch.bfloat16 if device.type == "cuda" else torch.float32)
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir / "tokenizer")
        tokenizer_2 = T5TokenizerFast.from_pretrained(tokenizer_dir / "tokenizer_2")
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
        if tiny:
            clip = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, projection_dim=32, max_position_embeddings=77, **ids)
            t5 = T5Config(vocab_size=32128, d_model=64, d_ff=128, num_layers=2, num_heads=2, d_kv=32,
                          feed_forward_proj="gated-gelu")
        else:  # black-forest-labs/FLUX.1-dev text_encoder (CLIP-L) and text_encoder_2 (T5-XXL encoder)
            clip = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12, projection_dim=768, max_position_embeddings=77,
                                  hidden_act="quick_gelu", **ids)
            t5 = T5Config(vocab_size=32128, d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64,
                          feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True)
        default = torch.get_default_dtype()
        torch.manual_seed(0)
        try:
            torch.set_default_dtype(self.dtype)  # build in bf16 directly: no fp32 copy of 4.7B parameters
            with torch.device(device):
                text_encoder, text_encoder_2 = CLIPTextModel(clip).eval(), T5EncoderModel(t5).eval()
        finally:
            torch.set_default_dtype(default)
        self.pipe = FluxPipeline(scheduler=None, vae=None, transformer=None, text_encoder=text_encoder,
                                 tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
        self.default_max_sequence_length = 512

    @property
    def fingerprint(self) -> str:
        return model_fingerprint({**self.fingerprint_parts(), "files": "random-weights:seed0"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(binary: str | None):
    """(process, url) of a private redis-server, or (None, reason) when it cannot be measured here."""
    binary = binary or shutil.which("redis-server")
    if binary is None:
        return None, "no redis-server binary on this machine"
    try:
        import redis
    except ImportError:
        return None, "the redis Python package is not installed"
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            return proc, f"redis://127.0.0.1:{port}/0"
        except redis.exceptions.ConnectionError:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    proc.kill()
    return None, f"{binary} did not start (exit code {proc.poll()})"


def summary(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1000
    return {"n": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3), "mean_ms": round(float(ms.mean()), 3)}


def timed(client, prompt: str, want: str, prepare=None) -> tuple[float, float]:
    """(client latency, server time) of one request, after `prepare()` (outside the timing); checks the tier
    that answered. Server time is queue + encode + storing for a miss, the tier lookups for a hit; the rest is
    gRPC, chunking, checksums and assembly on both ends."""
    if prepare is not None:
        prepare()
    started = time.perf_counter()
    _, info = client.encode(prompt, with_info=True)
    seconds = time.perf_counter() - started
    if info.cache_status != [want]:
        raise RuntimeError(f"expected a {want} answer for {prompt!r}, got {info.cache_status}")
    return seconds, info.server_seconds


def summarize(samples: list[tuple[float, float]]) -> dict:
    result = summary([s for s, _ in samples])
    result["server_p50_ms"] = round(float(np.percentile([t for _, t in samples], 50)) * 1000, 3)
    return result


def measure_hits(client, cache, keys_by_prompt: dict[str, str], tiers: dict, iters: int) -> dict:
    memory, disk, redis_tier = tiers.get("memory"), tiers.get("disk"), tiers.get("redis")
    prompts = list(keys_by_prompt)
    result = {}

    def run(want, prepare_for):
        for prompt in prompts[:3]:  # warm-up, not recorded
            timed(client, prompt, want, prepare_for(prompt))
        return summarize([timed(client, prompts[i % len(prompts)], want, prepare_for(prompts[i % len(prompts)]))
                          for i in range(iters)])

    result["memory"] = run("memory", lambda p: None)
    result["disk"] = run("disk", lambda p: memory.clear)
    if redis_tier is not None:
        def forget_above(prompt):
            # flush: the last Redis hit's background disk refill must land before this file is deleted
            return lambda: (cache.flush(), memory.clear(), disk.delete(keys_by_prompt[prompt]))
        result["redis"] = run("redis", forget_above)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench/results/cache_latency.json"))
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (smoke test)")
    parser.add_argument("--misses", type=int, default=40, help="encodes measured (FLUX.1)")
    parser.add_argument("--hits", type=int, default=200, help="hits measured per tier and entry size")
    parser.add_argument("--redis-server", help="redis-server binary (default: the one on PATH, if any)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.tiny:
        args.misses, args.hits = min(args.misses, 10), min(args.hits, 30)

    from denoiser_client import RemoteTextEncoder
    from encoder_server.server import BackgroundServer, ServerConfig
    from promptcast.tiny_models import make_tiny_model

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    work = pathlib.Path(tempfile.mkdtemp(prefix="promptcast-cache-bench-"))
    redis_proc, redis_url = start_redis(args.redis_server)
    redis_note = None if redis_proc else redis_url
    try:
        started = time.perf_counter()
        encoder = RandomFlux1Encoder(args.tiny, device, make_tiny_model(work / "tiny-flux1", "flux1"))
        build_seconds = time.perf_counter() - started
        config = ServerConfig(models=[], port=0, host="127.0.0.1", device=str(device), cache_mem=8 << 30,
                              cache_dir=str(work / "server-cache"), cache_disk_max=32 << 30,
                              cache_redis=redis_url if redis_proc else None)
        with BackgroundServer(config, encoders=[encoder]) as server, \
                RemoteTextEncoder(server.address, timeout=120) as client:
            cache = server.server.service.cache
            tiers = {t.name: t for t in cache.tiers}
            length = encoder.default_max_sequence_length
            # FLUX.1: misses first (each prompt new), then hits of those same prompts.
            prompts = [f"a photo of prompt number {i}, a fox in the snow at dusk, 35mm film" for i in range(
                args.misses + 3)]
            for prompt in prompts[:3]:
                timed(client, prompt + " (warm-up)", "miss")
            miss = summarize([timed(client, p, "miss") for p in prompts[3:]])
            keys = {p: embedding_key(encoder.fingerprint, length, p, None) for p in prompts[3:]}
            entry_bytes = sum(t.numel() * t.element_size() for t in tiers["memory"].get(keys[prompts[3]]).values())
            flux1 = {"entry_bytes": entry_bytes, "miss": miss, **measure_hits(client, cache, keys, tiers, args.hits)}
            # FLUX.2-sized: written into every tier under the keys the server will compute.
            width, n = (15360, 16) if not args.tiny else (240, 4)
            fake = {f"a FLUX.2-sized entry {i}": None for i in range(n)}
            for prompt in fake:
                fake[prompt] = embedding_key(encoder.fingerprint, length, prompt, None)
                cache.put(fake[prompt], {"prompt_embeds": torch.randn(length, width).to(torch.bfloat16)})
            flux2 = {"entry_bytes": length * width * 2, "miss": None,
                     **measure_hits(client, cache, fake, tiers, args.hits)}
    finally:
        if redis_proc:
            redis_proc.kill()
        shutil.rmtree(work, ignore_errors=True)

    results = {"flux1_4mib" if not args.tiny else "flux1_tiny": flux1,
               "flux2_15mib" if not args.tiny else "flux2_tiny": flux2}
    for name, r in results.items():
        if redis_note:
            r["redis"] = {"measured": False, "reason": redis_note}
        base = flux1["miss"]["p50_ms"]
        r["encode_p50_over_hit_p50"] = {tier: round(base / r[tier]["p50_ms"], 1) for tier in ("memory", "disk", "redis")
                                        if r.get(tier, {}).get("p50_ms")}
    report = {
        "benchmark": "cache_latency", "tiny": args.tiny, "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "dtype": str(encoder.dtype).removeprefix("torch."), "torch": torch.__version__,
        "python": platform.python_version(),
        "max_sequence_length": length, "encoder_build_seconds": round(build_seconds, 1),
        "notes": ["latency is per request, client side, over loopback gRPC (header + 1 MiB chunks), sequential",
                  "miss = queue (max_wait_ms 2) + tokenize + forward + writing memory, disk (fsync) and Redis tiers",
                  "FLUX.2-sized entries are written into the tiers directly (no Mistral here): hits only, miss not "
                  "measured; the ratio compares them with the FLUX.1 encode",
                  "disk hit: memory emptied before each request; redis hit: memory emptied and disk file deleted "
                  "first; a lower-tier hit refills memory inside the measured time, disk on a background thread",
                  "server_p50_ms: the server's own part (lookup, or queue + encode + store); the rest is transport"],
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'entry':<14}{'tier':<8}{'p50 ms':>10}{'p99 ms':>10}{'server p50':>12}{'encode p50 / p50':>18}")
    for name, r in results.items():
        for tier in ("miss", "memory", "disk", "redis"):
            m = r.get(tier)
            if not m or "p50_ms" not in m:
                why = "no miss: entries written directly" if tier == "miss" else m.get("reason") if m else "-"
                print(f"{name:<14}{tier:<8}   not measured ({why})")
                continue
            ratio = r["encode_p50_over_hit_p50"].get(tier, 1.0 if tier == "miss" else None)
            print(f"{name:<14}{tier:<8}{m['p50_ms']:>10.2f}{m['p99_ms']:>10.2f}{m['server_p50_ms']:>12.2f}"
                  f"{ratio:>17.1f}x")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
