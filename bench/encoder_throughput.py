"""Encoder server throughput: promptcast's batched gRPC server against diffusers' `encode_prompt` loop.

FLUX.1-dev-shaped text encoders (T5-XXL + CLIP-L; random bf16 weights built on the GPU, the tiny test model's
tokenizers, which pad T5 to 512 tokens like the real ones) are wrapped as a real `Flux1Encoder` and served by the real
server (`BackgroundServer`, loopback, memory cache off so every request encodes). Client processes (each a pool of
threads, each thread a `RemoteTextEncoder` call loop of one distinct prompt per request) drive it at 1, 8, 32 and 128
concurrent clients. Beside it, in the same run and on the same modules: diffusers' `FluxPipeline.encode_prompt` called
in a loop at batch 1 (what a FLUX.1 pipeline does per image). MFU is against an 8192^3 bf16 matmul measured here.

Then, where importable: each `--quantize` mode (int8 and nf4 with bitsandbytes, fp8 and fp8-dynamic with torchao) on
a copy of the same T5: weight memory, throughput at 32 clients, and fidelity against bf16 (cosine similarity and max
|error| of prompt_embeds over a prompt set). Then each `--accelerated` set-up (the server as `--cuda-graphs`,
`--compile` and `--quantize` make it) at every client count, beside the same set-up's encoder alone. With
`--families flux2`, the same for a FLUX.2-dev-shaped encoder: the baseline is diffusers' path on the whole
Mistral3ForConditionalGeneration, the server runs the same weights cut after layer 30, as `Flux2Encoder` loads them.

    python bench/encoder_throughput.py --families flux1 --out bench/results/encoder_throughput_flux1.json  # CUDA, ~5 min
    python bench/encoder_throughput.py --tiny --out /tmp/encoder_throughput.json           # CPU smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import multiprocessing as mp
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import threading
import time
from unittest import mock

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable from a checkout, uninstalled
sys.path.insert(0, str(ROOT / "bench"))

from flux2_encoder import mistral3_config, sync  # noqa: E402 - the sibling benchmark's model shapes and helpers

WORDS = ("fox cat astronaut city river mountain neon portrait watercolor forest rain castle robot garden ocean desert "
         "lantern violin harbor dragon tram bakery glacier comet orchard").split()


def prompt(i: int, tag: str) -> str:
    words = " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(12))
    return f"{tag} {i}: a detailed photo of {words}, cinematic lighting, 35mm"


# ---------------------------------------------------------------------------------------------------- models

def flux1_encoder(device, dtype, tiny: bool, tokenizer_dir: pathlib.Path):
    """A real `Flux1Encoder` whose T5-XXL and CLIP-L are random weights in the real shapes."""
    from diffusers import FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    from encoder_server.families.base import Encoder, register_execution_device
    from encoder_server.families.flux1 import Flux1Encoder
    from shared.sources import resolve_source

    if tiny:
        t5 = T5Config(d_model=64, d_ff=160, num_layers=2, num_heads=4, d_kv=16, vocab_size=32128,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
        clip = CLIPTextConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                              vocab_size=49408, projection_dim=32)
    else:  # google/t5-v1_1-xxl encoder and openai/clip-vit-large-patch14 text model, as FLUX.1-dev ships them
        t5 = T5Config(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64, vocab_size=32128,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                      relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6)
        clip = CLIPTextConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                              vocab_size=49408, projection_dim=768, max_position_embeddings=77, hidden_act="quick_gelu")
    torch.manual_seed(0)
    with torch.device(device):
        text_encoder_2 = T5EncoderModel._from_config(t5, dtype=dtype).eval()
        text_encoder = CLIPTextModel._from_config(clip, dtype=dtype).eval()
    source = resolve_source(str(tokenizer_dir))
    encoder = Flux1Encoder.__new__(Flux1Encoder)
    Encoder.__init__(encoder, "flux1-dev-shaped", source, device, dtype)
    encoder.pipe = FluxPipeline(scheduler=None, vae=None, transformer=None, text_encoder=text_encoder,
                                tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir, subfolder="tokenizer"),
                                text_encoder_2=text_encoder_2,
                                tokenizer_2=T5TokenizerFast.from_pretrained(tokenizer_dir, subfolder="tokenizer_2"))
    encoder.default_max_sequence_length = 512
    for module in (text_encoder, text_encoder_2):  # as `Encoder.prepare_module` registers a served model's
        register_execution_device(module, device)
    return encoder


@contextlib.contextmanager
def plain_diffusers():
    """diffusers' own lookups, for the baseline: its execution-device walk over every submodule on each call,
    which the server answers from what it registered (`register_execution_device`)."""
    from encoder_server.families.base import EXECUTION_DEVICES

    registered = dict(EXECUTION_DEVICES.items())
    EXECUTION_DEVICES.clear()
    try:
        yield
    finally:
        EXECUTION_DEVICES.update(registered)


def flux1_flops_per_prompt(encoder, length: int = 512) -> float:
    """Matmul FLOPs of one prompt: T5 at `length` tokens, CLIP at 77 (attention scores included)."""
    t5, clip = encoder.pipe.text_encoder_2.config, encoder.pipe.text_encoder.config
    inner = t5.num_heads * t5.d_kv
    t5_layer = 2 * length * (4 * t5.d_model * inner + 3 * t5.d_model * t5.d_ff) + 4 * length * length * inner
    h = clip.hidden_size
    clip_layer = 2 * 77 * (4 * h * h + 2 * h * clip.intermediate_size) + 4 * 77 * 77 * h
    return t5.num_layers * t5_layer + clip.num_hidden_layers * clip_layer


def flux2_encoder(device, dtype, tiny: bool, tokenizer_dir: pathlib.Path):
    """A real `Flux2Encoder`. Until `after_baseline()` its text encoder is the whole random Mistral Small 3.1-shaped
    `Mistral3ForConditionalGeneration` (40 layers, lm_head, vision tower): what `Flux2Pipeline` runs, the baseline.
    `after_baseline()` cuts that same model after layer 30, as the server loads it."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from transformers import Mistral3ForConditionalGeneration

    from encoder_server.families.base import Encoder
    from encoder_server.families.flux2 import Flux2Encoder
    from encoder_server.families.truncated import TruncatedTextEncoder, load_tokenizer
    from shared.sources import resolve_source

    layers = Flux2Encoder.hidden_states_layers
    torch.manual_seed(0)
    with torch.device(device):
        model = Mistral3ForConditionalGeneration._from_config(mistral3_config(tiny), dtype=dtype).eval()
    source = resolve_source(str(tokenizer_dir))
    encoder = Flux2Encoder.__new__(Flux2Encoder)
    Encoder.__init__(encoder, "flux2-dev-shaped", source, device, dtype)
    encoder.text_encoder = model
    encoder.tokenizer = load_tokenizer(source)
    encoder.system_message = SYSTEM_MESSAGE
    encoder.default_max_sequence_length = encoder.max_sequence_length_limit = 512

    def after_baseline():
        language_model = model.model.language_model
        del language_model.layers[max(layers):]
        language_model.config.num_hidden_layers = max(layers)
        encoder.text_encoder = TruncatedTextEncoder(language_model, layers)
        encoder.text_model = language_model
        del model.lm_head, model.model.vision_tower, model.model.multi_modal_projector
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    encoder.after_baseline = after_baseline
    return encoder


def flux2_flops_per_prompt(encoder, length: int = 512) -> float:
    """Matmul FLOPs of the 30 layers the pipeline reads (what diffusers computes beyond them is not counted)."""
    from encoder_server.families.flux2 import Flux2Encoder

    if hasattr(encoder, "text_model"):  # the server's truncated decoder
        c = encoder.text_model.config
    else:  # diffusers' whole Mistral3, before `after_baseline`
        c = copy.copy(encoder.text_encoder.config.text_config)
        c.num_hidden_layers = max(Flux2Encoder.hidden_states_layers)
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    layer = 2 * length * (2 * c.hidden_size * q + 2 * c.hidden_size * kv + 3 * c.hidden_size * c.intermediate_size)
    return c.num_hidden_layers * (layer + 4 * length * length * q)


# ---------------------------------------------------------------------------------------------------- measuring

def matmul_peak(device, dtype, n: int) -> float:
    """TFLOP/s of an n^3 matmul: the MFU denominator."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / seconds_per_call(lambda: a @ b, device, warmup=3) / 1e12


def seconds_per_call(run, device, warmup: int = 1) -> float:
    """Mean seconds of `run()` once warm: 10 calls on CUDA, 2 on the CPU, synchronized at both ends."""
    for _ in range(warmup):
        run()
    sync(device)
    iters, start = 10 if device.type == "cuda" else 2, time.perf_counter()
    for _ in range(iters):
        run()
    sync(device)
    return (time.perf_counter() - start) / iters


def diffusers_loop(encoder, seconds: float, tag: str) -> dict:
    """diffusers' own call, batch 1, in a loop: the baseline (under no_grad, as `__call__` runs it)."""
    pipe, device = encoder.pipe if hasattr(encoder, "pipe") else None, encoder.device

    def once(text):
        with torch.no_grad(), plain_diffusers():
            if pipe is not None:
                out = pipe.encode_prompt(prompt=[text], prompt_2=None, device=device, max_sequence_length=512)[0]
            else:
                from diffusers import Flux2Pipeline

                out = Flux2Pipeline._get_mistral_3_small_prompt_embeds(
                    text_encoder=encoder.text_encoder, tokenizer=encoder.tokenizer, prompt=[text], device=device,
                    max_sequence_length=512, system_message=encoder.system_message,
                    hidden_states_layers=encoder.hidden_states_layers)
            out.cpu()  # what the caller gets; synchronizes like the server's copy to the host does

    for i in range(5):
        once(prompt(i, f"{tag}-warm"))
    latencies, start, i = [], time.perf_counter(), 0
    while time.perf_counter() - start < seconds or i < 3:
        t = time.perf_counter()
        once(prompt(i, tag))
        latencies.append(time.perf_counter() - t)
        i += 1
    return summarize(latencies, time.perf_counter() - start)


def summarize(latencies: list[float], elapsed: float) -> dict:
    ordered = sorted(latencies)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"requests": len(ordered), "prompts_per_s": round(len(ordered) / elapsed, 2),
            "p50_ms": round(1000 * statistics.median(ordered), 1), "p90_ms": round(1000 * pick(0.9), 1),
            "p99_ms": round(1000 * pick(0.99), 1), "max_ms": round(1000 * ordered[-1], 1)}


def log_gc_pauses() -> None:
    """With `--trace`: append each garbage collection of this process taking 1 ms or more to the file named by
    PROMPTCAST_BENCH_GC_LOG (the server's process and its model worker's both), as `pid time generation seconds`."""
    path = os.environ.get("PROMPTCAST_BENCH_GC_LOG")
    if not path:
        return
    began = [0.0]

    def timed(phase, info):
        if phase == "start":
            began[0] = time.perf_counter()
        elif (seconds := time.perf_counter() - began[0]) >= 0.001:
            with open(path, "a") as f:
                f.write(f"{os.getpid()} {time.time():.4f} {info['generation']} {seconds:.4f}\n")

    gc.callbacks.append(timed)


def gc_pauses(since: float, until: float) -> list:
    """The pauses `log_gc_pauses` wrote between two times: [ms from `since`, process, generation, ms]."""
    path = os.environ.get("PROMPTCAST_BENCH_GC_LOG")
    if not path or not os.path.exists(path):
        return []
    rows = [line.split() for line in open(path)]
    return [[round(1000 * (float(t) - since), 1), "server" if int(pid) == os.getpid() else "worker", int(gen),
             round(1000 * float(seconds), 1)] for pid, t, gen, seconds in rows if since <= float(t) <= until]


def client_process_init() -> None:
    sys.path.insert(0, str(ROOT))
    import denoiser_client  # noqa: F401 - imported before the first measurement, not during it


def client_process(job) -> tuple[list[tuple[float, float, str]], float]:
    """One load-generating process: `threads` closed-loop clients for `seconds`; (start, latency, client) of each
    completed call and when the last one ended."""
    address, threads, seconds, tag, start_at = job
    from denoiser_client import RemoteTextEncoder

    latencies, lock = [], threading.Lock()
    client = RemoteTextEncoder(address, timeout=120)
    client.models()  # connected before the clock starts: the first call's connection is no prompt's latency
    while time.time() < start_at:
        time.sleep(0.001)
    stop_at = time.time() + seconds

    def loop(t):
        i, name = 0, f"{tag}-{t}"
        while time.time() < stop_at:
            began, begin = time.time(), time.perf_counter()
            client.encode(prompt(i, name))
            with lock:
                latencies.append((began, time.perf_counter() - begin, name))
            i += 1

    workers = [threading.Thread(target=loop, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    client.close()
    return latencies, time.time()


def server_levels(encoder, clients: list[int], seconds: float, pool, processes: int, args, tag: str,
                  frozen: bool = False) -> dict:
    """The real server around `encoder`, driven at each concurrency; batcher stats per level. `frozen`: this
    process's heap is moved out of the garbage collector's sight once the server is warm (`gc.freeze`)."""
    from encoder_server.server import BackgroundServer, ModelSpec, ServerConfig

    config = ServerConfig([ModelSpec("bench", name=encoder.name)], port=0, cache_mem=0, cache_dir=None,
                          max_batch_size=args.max_batch_size, max_batch_tokens=args.max_batch_size * 512,
                          max_wait_ms=args.max_wait_ms, max_queue=4096, gpu_timeout=0)
    levels = {}
    # Start-up (warm-up) compiles and captures every batch bucket first: minutes with float8 and --compile.
    server = BackgroundServer(config, encoders=[encoder])
    try:
        server.start(timeout=args.start_timeout)
        if frozen:
            gc.collect()
            gc.freeze()
        batcher = server.server.service.batchers[encoder.name]
        batch_log, observe = [], batcher.on_batch

        def traced(rows, queue_seconds, encode_seconds):  # the finishing thread, once a batch is on the host
            batch_log.append((time.time(), rows, queue_seconds, encode_seconds))
            if observe is not None:
                observe(rows, queue_seconds, encode_seconds)

        batcher.on_batch = traced
        for n in clients:
            batch_log.clear()
            per = [n // processes + (k < n % processes) for k in range(min(processes, n))]
            before = (batcher.stats.batches, batcher.stats.prompts, batcher.stats.busy_seconds)
            start_at = time.time() + 0.5
            jobs = [(server.address, threads, seconds, f"{tag}-c{n}-p{k}", start_at) for k, threads in enumerate(per)]
            results = pool.map(client_process, jobs, chunksize=1)
            elapsed = max(end for _, end in results) - start_at
            calls = [call for r, _ in results for call in r]
            level = summarize([latency for _, latency, _ in calls], elapsed)
            # Past the first second: the calls of every client once the start's burst (all of them at once, on an
            # idle server) has gone through.
            steady = [latency for began, latency, _ in calls if began >= start_at + 1.0]
            if steady:
                level["steady"] = {k: v for k, v in summarize(steady, elapsed - 1.0).items() if k != "prompts_per_s"}
            batches, prompts = batcher.stats.batches - before[0], batcher.stats.prompts - before[1]
            level["mean_batch"] = round(prompts / max(batches, 1), 2)
            busy = batcher.stats.busy_seconds - before[2]
            level["worker_busy"] = round(busy / elapsed, 3)  # fraction of the time the GPU worker was encoding
            level["mean_batch_ms"] = round(1000 * busy / max(batches, 1), 1)
            if args.trace:  # every call and every batch, in ms from the level's start: the tail's shape
                level["trace"] = {
                    "calls": [[round(1000 * (began - start_at), 1), round(1000 * latency, 1), client]
                              for began, latency, client in sorted(calls)],
                    "batches": [[round(1000 * (ready - start_at), 1), rows, round(1000 * queued, 1),
                                 round(1000 * encoding, 1)] for ready, rows, queued, encoding in list(batch_log)],
                    "gc": gc_pauses(start_at, start_at + elapsed)}
            levels[str(n)] = level
            print(f"  {tag} {n:>4} clients: { {k: v for k, v in level.items() if k != 'trace'} }", flush=True)
    finally:
        server.stop()
        gc.unfreeze()
    return levels


def direct_batches(encoder, sizes: list[int], flops: float, peak: float) -> dict:
    """The encoder alone (no server, no wire) at fixed batch sizes: the ceiling the server can approach."""
    out = {}
    for size in sizes:
        prompts = [prompt(i, f"direct{size}") for i in range(size)]
        encoder.encode(prompts, None, 512)
        sync(encoder.device)
        iters, start = 3, time.perf_counter()
        for _ in range(iters):
            encoder.encode(prompts, None, 512)["prompt_embeds"].cpu()
        rate = size * iters / (time.perf_counter() - start)
        out[str(size)] = {"prompts_per_s": round(rate, 2), "mfu": round(rate * flops / 1e12 / peak, 3)}
    print(f"  direct encode (no server): {out}", flush=True)
    return out


def gemm_ceiling(encoder, sizes: list[int], peak: float, baseline: float) -> dict:
    """The encoder's own linear layers and nothing else: every `nn.Linear` call one real batch of `size` prompts makes,
    replayed back to back on inputs of the shapes that batch gave them (on CUDA as one graph: no launch gaps). The
    attention scores, norms, activations, tokenizing and copies are left out, so nothing that issues these matmuls in
    bf16 runs faster: its prompts/s bound what a server of the same kernels can reach. (Merged matmuls, q/k/v or
    gate/up as one, could go a little past it, with other bytes; the square matmul's peak is the hard bound.)"""
    out = {}
    for size in sizes:
        calls = []
        hooks = [m.register_forward_hook(lambda m, args, _out: calls.append((m, args[0].shape)))
                 for module in encoder_modules(encoder) for m in module.modules()
                 if isinstance(m, torch.nn.Linear)]
        try:
            encoder.encode([prompt(i, f"ceiling{size}") for i in range(size)], None, 512)
        finally:
            for hook in hooks:
                hook.remove()
        # One random input per shape and dtype, drawn once (the values do not change the time).
        inputs = {key: torch.randn(key[0], device=encoder.device, dtype=key[1])
                  for key in {(tuple(shape), m.weight.dtype) for m, shape in calls}}
        work = [(inputs[tuple(shape), m.weight.dtype], m.weight, m.bias) for m, shape in calls]
        flops = sum(2 * m.in_features * m.out_features * shape.numel() // shape[-1] for m, shape in calls)

        @torch.no_grad()
        def replay():
            for x, weight, bias in work:
                torch.nn.functional.linear(x, weight, bias)

        run, graph = replay, None
        if encoder.device.type == "cuda":
            replay()
            torch.cuda.synchronize(encoder.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                replay()
            run = graph.replay
        seconds = seconds_per_call(run, encoder.device)
        count, run, graph, inputs, work, calls = len(calls), None, None, None, None, None
        rate = size / seconds
        out[str(size)] = {"linear_calls": count, "prompts_per_s": round(rate, 2),
                          "linear_tflop_per_prompt": round(flops / size / 1e12, 4),
                          "tflops": round(flops / seconds / 1e12, 1), "of_peak": round(flops / seconds / 1e12 / peak, 3),
                          "x_diffusers": round(rate / baseline, 2)}
    print(f"  the linear layers alone (the bf16 ceiling): {out}", flush=True)
    return out


def embeds(encoder, prompts: list[str]) -> torch.Tensor:
    out = []
    for i in range(0, len(prompts), 8):
        out.append(encoder.encode(prompts[i:i + 8], None, 512)["prompt_embeds"].float().cpu())
    return torch.cat(out)


def fidelity(reference: torch.Tensor, got: torch.Tensor) -> dict:
    cos = torch.nn.functional.cosine_similarity(reference.flatten(1), got.flatten(1), dim=1)
    return {"cosine_min": round(cos.min().item(), 6), "cosine_mean": round(cos.mean().item(), 6),
            "max_abs_err": round((reference - got).abs().max().item(), 5),
            "max_abs_ref": round(reference.abs().max().item(), 5), "finite": bool(torch.isfinite(got).all())}


def module_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def quantized_variants(encoder, args, pool, processes, peak, flops) -> dict:
    """Each `--quantize` mode on a copy of the same bf16 T5: memory, speed at 32 clients, fidelity vs bf16."""
    from encoder_server.quantize import QUANTIZATIONS, check_quantize, quantize_module

    prompts = [prompt(i, "fidelity") for i in range(args.fidelity_prompts)]
    reference = embeds(encoder, prompts)
    bf16_t5 = encoder.pipe.text_encoder_2
    out = {"bf16": {"t5_weights_gib": round(module_bytes(bf16_t5) / 2**30, 3)}}
    for name in args.quantize:
        try:
            check_quantize(name, encoder.device)
        except ValueError as e:
            out[name] = {"status": f"not measured: {e}"}
            print(f"  {name}: not measured ({e})", flush=True)
            continue
        try:
            gc.collect()
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated()
            quantized = quantize_module(copy.deepcopy(bf16_t5).cpu(), name, encoder.device, encoder.dtype)
            gc.collect()
            torch.cuda.empty_cache()
            memory = torch.cuda.memory_allocated() - before
            encoder.pipe.text_encoder_2, encoder.quantize = quantized, name
            vars(encoder).pop("_fingerprint", None)
            result = {"library": QUANTIZATIONS[name], "t5_weights_gib": round(memory / 2**30, 3),
                      **fidelity(reference, embeds(encoder, prompts))}
            result["server"] = server_levels(encoder, [32], args.seconds, pool, processes, args, f"q{name}")
            result["server"]["32"]["mfu"] = round(result["server"]["32"]["prompts_per_s"] * flops / 1e12 / peak, 3)
            out[name] = result
        except Exception as e:  # noqa: BLE001 - one broken library must not lose the rest of the run
            out[name] = {"status": f"failed: {type(e).__name__}: {e}"}
            print(f"  {name}: failed: {e!r}", flush=True)
        finally:
            encoder.pipe.text_encoder_2, encoder.quantize = bf16_t5, None
            vars(encoder).pop("_fingerprint", None)
            quantized = None
            gc.collect()
    return out


def run_family(name, build, flops_of, args, device, dtype, pool, processes, peak, tokenizer_dir) -> dict:
    start = time.perf_counter()
    encoder = build(device, dtype, args.tiny, tokenizer_dir)
    sync(device)
    report = {"build_s": round(time.perf_counter() - start, 1)}
    flops = flops_of(encoder)
    report["tflop_per_prompt"] = round(flops / 1e12, 4)
    report["attention"] = sorted({getattr(getattr(m, "text_model", m).config, "_attn_implementation", "?")
                                  for m in encoder_modules(encoder)})
    print(f"{name}: built in {report['build_s']}s, {report['tflop_per_prompt']} TFLOP a prompt, "
          f"attention {report['attention']}", flush=True)
    report["diffusers_batch1"] = base = diffusers_loop(encoder, args.seconds, f"{name}-diffusers")
    base["mfu"] = round(base["prompts_per_s"] * flops / 1e12 / peak, 3)
    print(f"  diffusers loop: {base}", flush=True)
    if hasattr(encoder, "after_baseline"):
        encoder.after_baseline()  # FLUX.2: from diffusers' whole Mistral3 to the server's truncated decoder
    report["direct"] = direct_batches(encoder, args.direct_batches, flops, peak)
    if args.gemm_ceiling:
        report["gemm_ceiling"] = gemm_ceiling(encoder, args.gemm_ceiling, peak, base["prompts_per_s"])

    def served(label, clients, on=None, frozen=False):
        levels = server_levels(on or encoder, clients, args.seconds, pool, processes, args, label, frozen)
        for level in levels.values():
            level["mfu"] = round(level["prompts_per_s"] * flops / 1e12 / peak, 3)
            level["x_diffusers"] = round(level["prompts_per_s"] / base["prompts_per_s"], 2)
        return levels

    thread_clients = args.clients if args.thread_clients is None else args.thread_clients
    if thread_clients:
        report["server"] = served(name, thread_clients)
    # The same encoder built again in a child process (`--worker process`): eager, and replaying CUDA graphs (the
    # server's default on CUDA) when the graphs set-up is measured too.
    for variant in args.process_worker if device.type == "cuda" else [v for v in args.process_worker if not v]:
        from encoder_server.worker_process import ProcessEncoder

        parts = variant.split("+") if variant else []
        # `unfused`: the child without the fused elementwise kernels (it reads the switch from its environment).
        with fused_kernels_off("unfused" in parts):
            # `frozen`: both processes' heaps out of the garbage collector's sight once loaded (`gc.freeze`).
            child = ProcessEncoder(json.dumps({"family": name, "tiny": args.tiny, "frozen": "frozen" in parts,
                                               "tokenizer_dir": str(tokenizer_dir)}),
                                   name=encoder.name, device=str(device), dtype=dtype,
                                   factory="encoder_throughput:process_encoder", cuda_graphs="graphs" in parts,
                                   compile="compile" in parts)
        label = "_".join(["process_worker", *parts])
        try:
            report[label] = served(f"{name}-{label}", args.clients, on=child, frozen="frozen" in parts)
        finally:
            child.close()
    if name == "flux1" and args.quantize:
        report["quantized"] = quantized_variants(encoder, args, pool, processes, peak, flops)
    fidelity_prompts = [prompt(i, "variant") for i in range(8)]
    eager = embeds(encoder, fidelity_prompts)
    report["accelerated"] = {}
    for variant in args.accelerated if device.type == "cuda" else []:
        start = time.perf_counter()
        try:
            undo = accelerate(encoder, variant)
        except Exception as e:  # noqa: BLE001 - a library missing here must not lose the other variants
            report["accelerated"][variant] = {"status": f"failed: {type(e).__name__}: {e}"[:300]}
            print(f"  {variant}: failed: {e!r}", flush=True)
            continue
        try:
            levels = served(f"{name}-{variant}", args.clients)  # the server's warm-up compiles and captures
        except Exception as e:  # noqa: BLE001 - e.g. a start-up past --start-timeout: keep what was measured
            report["accelerated"][variant] = {"status": f"failed: {type(e).__name__}: {e}"[:300]}
            print(f"  {variant}: failed: {e!r}", flush=True)
            undo()
            continue
        try:
            # Against eager bf16 at batch 8: compile and fp8 change the kernels; graphs replay eager's at a bucket.
            result = {"levels": levels, **fidelity(eager, embeds(encoder, fidelity_prompts)),
                      "direct": direct_batches(encoder, args.direct_batches, flops, peak)}
        finally:
            undo()
        result["setup_and_run_s"] = round(time.perf_counter() - start, 1)
        report["accelerated"][variant] = result
    # Again, last: the host's speed drifts within a run, and an eager loop at batch 1 is bound by it. The faster of the
    # two runs is the baseline of every ratio. FLUX.2's loop needs the whole Mistral3, truncated by now: it is built
    # again (the same seed, so the same weights).
    if hasattr(encoder, "after_baseline"):
        encoder = None
        free_memory(device)
        encoder = build(device, dtype, args.tiny, tokenizer_dir)
    report["diffusers_batch1_again"] = again = diffusers_loop(encoder, args.seconds, f"{name}-diffusers-again")
    print(f"  diffusers loop, again: {again}", flush=True)
    if again["prompts_per_s"] > base["prompts_per_s"]:
        again["mfu"] = round(again["prompts_per_s"] * flops / 1e12 / peak, 3)
        report["diffusers_batch1"], report["diffusers_batch1_again"] = again, base
        for key, value in report.items():
            sets = [value] if key in ("server", "gemm_ceiling") or key.startswith("process_worker") else [
                v.get("levels", {}) for v in value.values()] if key == "accelerated" else []
            for level in (lvl for levels in sets for lvl in levels.values()):
                level["x_diffusers"] = round(level["prompts_per_s"] / again["prompts_per_s"], 2)
    encoder = None  # frees the weights before the next family is built
    free_memory(device)
    return report


def free_memory(device) -> None:
    gc.collect()  # an encoder is in a reference cycle (FLUX.2's `after_baseline` holds it)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def accelerate(encoder, variant: str):
    """Set the encoder up as `promptcast serve` does for `variant`: '+'-joined `graphs` (--cuda-graphs), `compile`
    (--compile) and a --quantize mode, applied to the large text encoder (T5 / Mistral; FLUX.1's CLIP stays bf16);
    graphs without `compile` fuse the elementwise kernels too, unless `unfused`.
    Returns a function that puts the eager bf16 encoder back."""
    from encoder_server.acceleration import accelerate_module, repeated_blocks
    from encoder_server.fused_kernels import unfuse_elementwise
    from encoder_server.quantize import QUANTIZATIONS, quantize_module

    parts = [p for p in variant.split("+") if p]
    unknown = [p for p in parts if p not in ("graphs", "compile", "unfused", *QUANTIZATIONS)]
    if unknown:
        raise ValueError(f"unknown acceleration {unknown} in {variant!r}")
    holder, attr = (encoder.pipe, "text_encoder_2") if hasattr(encoder, "pipe") else (encoder, "text_encoder")
    bf16 = getattr(holder, attr)
    quantize = next((p for p in parts if p in QUANTIZATIONS), None)
    if quantize:
        setattr(holder, attr, quantize_module(copy.deepcopy(bf16), quantize, encoder.device, encoder.dtype))
    with fused_kernels_off("unfused" in parts):
        for module in encoder_modules(encoder):  # as the server sets up each module
            accelerate_module(module, compile="compile" in parts, cuda_graphs="graphs" in parts)
    encoder.quantize, encoder.compile, encoder.cuda_graphs = quantize, "compile" in parts, "graphs" in parts
    vars(encoder).pop("_fingerprint", None)

    def undo():
        for module in encoder_modules(encoder):
            vars(module).pop("forward", None)  # back to the class's eager forward
            unfuse_elementwise(module)
            for block in repeated_blocks(module):
                block._compiled_call_impl = None
        setattr(holder, attr, bf16)
        encoder.quantize, encoder.compile, encoder.cuda_graphs = None, False, False
        vars(encoder).pop("_fingerprint", None)
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()

    return undo


def fused_kernels_off(off: bool):
    """`PROMPTCAST_FUSED_KERNELS=0` while in it, if `off` (`fused_kernels.available` reads it)."""
    return mock.patch.dict(os.environ, {"PROMPTCAST_FUSED_KERNELS": "0"} if off else {})


def process_encoder(source: str, *, device, dtype, cuda_graphs=False, compile=False, **_):
    """What a `--worker process` child builds for the benchmark: the same random-weight encoder, from the same seed
    (its blocks compiled and its forwards graphed as `--compile` and `--cuda-graphs` do, if asked)."""
    log_gc_pauses()
    spec = json.loads(source)
    build = {"flux1": flux1_encoder, "flux2": flux2_encoder}[spec["family"]]
    encoder = build(torch.device(device), dtype, spec["tiny"], pathlib.Path(spec["tokenizer_dir"]))
    if hasattr(encoder, "after_baseline"):
        encoder.after_baseline()
    accelerate(encoder, "+".join(p for p, on in (("compile", compile), ("graphs", cuda_graphs)) if on))
    if spec.get("frozen"):
        gc.collect()
        gc.freeze()
    return encoder


def encoder_modules(encoder):
    if hasattr(encoder, "pipe"):
        return [encoder.pipe.text_encoder, encoder.pipe.text_encoder_2]
    return [encoder.text_encoder]  # what `Flux2Encoder.prepare_module` gets: the truncated decoder


def table(report: dict) -> str:
    lines = [f"{report['device']}  matmul peak {report['matmul_peak_tflops']:.0f} TFLOP/s (bf16 "
             f"{report['matmul_n']}^3)  max_batch_size {report['max_batch_size']}  max_wait_ms {report['max_wait_ms']}",
             f"{'model':8} {'path':34} {'prompts/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'MFU':>6} {'x diffusers':>12} "
             f"{'batch':>6}"]
    for family, res in report["families"].items():
        if "skipped" in res:
            lines.append(f"{family:8} skipped: {res['skipped']}")
            continue
        b = res["diffusers_batch1"]
        lines.append(f"{family:8} encoder alone (no server): " + ", ".join(
            f"batch {n} {d['prompts_per_s']:.1f} prompts/s ({d['mfu']:.0%} MFU)" for n, d in res["direct"].items()))
        lines.append(f"{family:8} {'diffusers loop, b1':34} {b['prompts_per_s']:>10.2f} {b['p50_ms']:>8.1f} "
                     f"{b['p99_ms']:>8.1f} {b['mfu']:>6.1%} {'1.00x':>12} {1:>6}")
        for n, c in res.get("gemm_ceiling", {}).items():
            lines.append(f"{family:8} {'linear layers alone, batch ' + n:34} {c['prompts_per_s']:>10.2f} {'':>8} "
                         f"{'':>8} {c['of_peak']:>6.1%} {c['x_diffusers']:>11.2f}x {n:>6}")
        rows = [(f"server (eager), {n} clients", lvl) for n, lvl in res.get("server", {}).items()]
        for label, levels in res.items():
            if label.startswith("process_worker"):
                setup = "+".join(label.split("_")[2:]) or "eager"
                rows += [(f"{setup}, --worker process, {n} cl.", lvl) for n, lvl in levels.items()]
        for variant, acc in res.get("accelerated", {}).items():
            rows += [(f"{variant}, {n} clients", lvl) for n, lvl in acc.get("levels", {}).items()]
            if "direct" in acc:
                lines.append(f"{family:8} {variant} alone (no server): " + ", ".join(
                    f"batch {n} {d['prompts_per_s']:.1f} prompts/s" for n, d in acc["direct"].items()))
        for label, lvl in rows:
            lines.append(f"{family:8} {label:34} {lvl['prompts_per_s']:>10.2f} {lvl['p50_ms']:>8.1f} "
                         f"{lvl['p99_ms']:>8.1f} {lvl['mfu']:>6.1%} {lvl['x_diffusers']:>11.2f}x "
                         f"{lvl['mean_batch']:>6.1f}")
        for q, qres in res.get("quantized", {}).items():
            if q == "bf16":
                lines.append(f"{family:8} T5 weights bf16 {qres['t5_weights_gib']} GiB")
            elif "status" in qres:
                lines.append(f"{family:8} {q:6} {qres['status'][:100]}")
            else:
                s = qres["server"]["32"]
                lines.append(f"{family:8} {q:6} T5 {qres['t5_weights_gib']} GiB, 32 clients {s['prompts_per_s']:.2f} "
                             f"prompts/s (p99 {s['p99_ms']:.0f} ms), cosine min {qres['cosine_min']:.5f}, "
                             f"max |err| {qres['max_abs_err']:.4g} (max |ref| {qres['max_abs_ref']:.3g})")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "bench/results/encoder_throughput_flux1.json")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (smoke test)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--seconds", type=float, default=None, help="per measurement (default 5, tiny 1.5)")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--quantize", nargs="*", default=["int8", "nf4", "fp8", "fp8-dynamic"])
    parser.add_argument("--switch-interval", type=float, default=None,
                        help="sys.setswitchinterval for this process (server and its worker thread); default Python's "
                             "5 ms. 1 ms measured +7%% at 32 clients, -2%% at 128: no clear gain")
    parser.add_argument("--start-timeout", type=float, default=900, help="seconds a server may take to warm up")
    parser.add_argument("--accelerated", nargs="*", default=["graphs", "compile+graphs", "fp8-dynamic+compile+graphs"],
                        help="server set-ups also measured (CUDA): '+'-joined graphs, compile and a --quantize mode")
    parser.add_argument("--families", nargs="+", default=["flux1", "flux2"])
    parser.add_argument("--process-worker", nargs="*", default=None,
                        help="also serve the encoder from a child process (--worker process), as each '+'-joined "
                             "set-up of graphs and compile named (none: eager and graphs)")
    parser.add_argument("--fidelity-prompts", type=int, default=16)
    parser.add_argument("--direct-batches", type=int, nargs="*", default=[1, 16, 32])
    parser.add_argument("--gemm-ceiling", type=int, nargs="*", default=[16],
                        help="batch sizes at which the encoder's linear layers alone are timed: the bf16 ceiling")
    parser.add_argument("--processes", type=int, default=8, help="client processes (threads share them)")
    parser.add_argument("--thread-clients", type=int, nargs="*", default=None,
                        help="client counts for the server with its model on a thread (default: --clients; none: "
                             "only the --process-worker variants)")
    parser.add_argument("--trace", action="store_true",
                        help="keep every call's start and latency, every batch's size and times, and the server's "
                             "and its worker's garbage-collection pauses in the results")
    args = parser.parse_args()
    if args.trace:
        fd, os.environ["PROMPTCAST_BENCH_GC_LOG"] = tempfile.mkstemp(prefix="promptcast-gc-", suffix=".log")
        os.close(fd)
        log_gc_pauses()
    args.seconds = args.seconds or (1.5 if args.tiny else 5.0)
    args.process_worker = [] if args.process_worker is None else args.process_worker or ["", "graphs"]
    args.process_worker = ["" if v == "eager" else v for v in args.process_worker]
    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("full-size shapes need a CUDA device; pass --tiny to smoke-test on the CPU")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    if args.tiny:
        torch.set_num_threads(1)
    from promptcast.tiny_models import make_tiny_model

    n = 1024 if args.tiny else 8192
    peak = matmul_peak(device, dtype, n)
    print(f"matmul peak {peak:.1f} TFLOP/s", flush=True)
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."), "tiny": args.tiny,
              "matmul_n": n, "matmul_peak_tflops": round(peak, 1), "max_batch_size": args.max_batch_size,
              "max_wait_ms": args.max_wait_ms, "seconds_per_measurement": args.seconds, "clients": args.clients,
              "families": {}}
    builders = {"flux1": (flux1_encoder, flux1_flops_per_prompt), "flux2": (flux2_encoder, flux2_flops_per_prompt)}
    processes = max(1, min(args.processes, max(args.clients)))
    with tempfile.TemporaryDirectory() as tmp, mp.get_context("spawn").Pool(
            processes, initializer=client_process_init) as pool:
        pool.map(time.sleep, [0.5] * (4 * processes), chunksize=1)  # every client process up and imported
        for family in args.families:
            try:
                tokenizer_dir = make_tiny_model(pathlib.Path(tmp) / family, family)
                report["families"][family] = run_family(family, *builders[family], args, device, dtype, pool,
                                                        processes, peak, tokenizer_dir)
            except Exception as e:  # noqa: BLE001 - e.g. FLUX.2 family code not there yet: say so, keep FLUX.1
                report["families"][family] = {"skipped": f"{type(e).__name__}: {e}"}
                print(f"{family}: skipped: {e!r}", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
