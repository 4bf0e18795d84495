"""Why the server's batch-1 encode is slower than diffusers' `encode_prompt` loop: each suspect switched on alone.

Every variant encodes one prompt at a time (FLUX.1-dev-shaped T5-XXL + CLIP-L with random bf16 weights, as in
bench/encoder_throughput.py) and returns once the bytes the caller needs are on the host. They run in interleaved
rounds, so clock and thermal drift falls on all of them alike; each reports prompts/s, p50 and p99, and how many
synchronizing CUDA calls one encode makes (`torch.cuda.set_sync_debug_mode`).

| variant | what changes against the one above it |
| --- | --- |
| `diffusers` | the baseline: `encode_prompt` under `no_grad`, `prompt_embeds.cpu()` (what encoder_throughput times) |
| `inference_mode` | `inference_mode` instead of `no_grad` (what `Flux1Encoder.encode` uses) |
| `both_outputs` | the pooled CLIP output copied too (pageable) |
| `t5_first` | T5 before CLIP (diffusers runs CLIP first; each blocking input copy waits for the other model's work) |
| `encoder` | `Flux1Encoder.encode` (the family's code: the encoders' execution device registered, no walk), both outputs, pageable copies |
| `pinned` | both outputs into pinned memory with `non_blocking`, one event wait (`_to_cpu`) |
| `finite` | plus the NaN/Inf flags computed on the device and copied with them: the server worker's exact path |
| `thread` | that path on a worker thread, the main thread idle (as in the server) |
| `thread_gil` | that, while another thread does what the event loop does under load: 4 MiB of framing and copies |
| `graphs` | `finite` with both encoders' forwards replayed as CUDA graphs (the server's default on CUDA) |
| `graphs_thread` | that on a worker thread (the default server's worker, without its event loop) |

`--timeline` then cuts 20 calls of the `graphs` path into host phases (each tokenizer call, each forward's launch, the
rest of diffusers' glue, the wait for the host copy) beside each graph replay's device time (CUDA events), and times
packing a prompt for the wire straight after its copy to the host against packing the same bytes again (in cache).

    python bench/encoder_batch1.py --out bench/results/encoder_batch1.json     # CUDA, about 3 minutes
    python bench/encoder_batch1.py --tiny --rounds 2 --out /tmp/encoder_batch1.json   # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from encoder_throughput import flux1_encoder, plain_diffusers, prompt, sync  # noqa: E402

LENGTH = 512


def variants(encoder, batcher, worker: ThreadPoolExecutor) -> tuple[dict, dict]:
    from encoder_server.acceleration import CUDAGraphForward
    from encoder_server.host_copy import to_cpu as _to_cpu

    pipe, device = encoder.pipe, encoder.device

    def diffusers(text, mode=torch.no_grad, both=False):
        with mode(), plain_diffusers():
            embeds, pooled, _ = pipe.encode_prompt(prompt=[text], prompt_2=None, device=device,
                                                   max_sequence_length=LENGTH)
            embeds.cpu()
            if both:
                pooled.cpu()

    def t5_first(text):
        with torch.inference_mode(), plain_diffusers():
            embeds = pipe._get_t5_prompt_embeds(prompt=[text], max_sequence_length=LENGTH, device=device)
            pooled = pipe._get_clip_prompt_embeds(prompt=[text], device=device)
            embeds.cpu()
            pooled.cpu()

    def encoder_path(text):
        for t in encoder.encode([text], None, LENGTH).values():
            t.cpu()

    def finite(text):
        batcher._launch_rows([], [text], None, LENGTH).wait()

    cuda = device.type == "cuda"  # on the CPU (smoke test) the timeline times the eager forwards
    graphed = {module: CUDAGraphForward(module.forward) if cuda else module.forward
               for module in (pipe.text_encoder, pipe.text_encoder_2)}

    def with_graphs(fn):
        def run(text):
            for module, forward in graphed.items():
                module.forward = forward
            try:
                return fn(text)
            finally:
                for module in graphed:
                    del module.forward
        return run

    return {
        "diffusers": diffusers,
        "inference_mode": lambda text: diffusers(text, torch.inference_mode),
        "both_outputs": lambda text: diffusers(text, torch.inference_mode, both=True),
        "t5_first": t5_first,
        "encoder": encoder_path,
        "pinned": lambda text: _to_cpu(encoder.encode([text], None, LENGTH)),
        "finite": finite,
        "thread": lambda text: worker.submit(finite, text).result(),
        "thread_gil": lambda text: worker.submit(finite, text).result(),  # with `LoopLoad` running
        **({"graphs": with_graphs(finite),
            "graphs_thread": lambda text: worker.submit(with_graphs(finite), text).result()}
           if cuda else {}),
    }, graphed


class LoopLoad:
    """A thread doing what the server's event loop does while it streams: frame and copy 4 MiB, over and over."""

    def __init__(self):
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        from shared.tensor_codec import pack_tensors

        tensors = {"prompt_embeds": torch.randn(LENGTH, 4096).to(torch.bfloat16)}
        while not self.stop.is_set():
            pack_tensors(tensors)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def timeline(encoder, batcher, graphed: dict, calls: int = 20) -> dict:
    """Median host milliseconds of each phase of a graphs-path encode (`finite` with graphs), each replay's device
    milliseconds, and packing for the wire straight after the copy to the host against the same bytes in cache."""
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    from shared.tensor_codec import pack_tensors

    pipe, cuda = encoder.pipe, encoder.device.type == "cuda"
    names = {id(pipe.tokenizer): "tokenize_clip", id(pipe.tokenizer_2): "tokenize_t5",
             id(pipe.text_encoder): "clip", id(pipe.text_encoder_2): "t5"}
    marks: list = []
    tokenize = PreTrainedTokenizerBase.__call__

    def timed_tokenize(self, *a, **k):
        started = time.perf_counter()
        try:
            return tokenize(self, *a, **k)
        finally:
            marks.append((names.get(id(self), "tokenize_other"), started, time.perf_counter(), None))

    def timed_forward(module, forward):
        def run(*a, **k):
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if cuda else None
            started = time.perf_counter()
            _ = events and events[0].record()
            out = forward(*a, **k)
            _ = events and events[1].record()
            marks.append((names[id(module)], started, time.perf_counter(), events))
            return out
        return run

    phases: dict[str, list] = {}
    PreTrainedTokenizerBase.__call__ = timed_tokenize
    try:
        for i in range(calls):
            marks.clear()
            for module, forward in graphed.items():
                module.forward = timed_forward(module, forward)
            started = time.perf_counter()
            try:
                on_device = batcher._launch_rows([], [prompt(i, "timeline")], None, LENGTH)
                launched = time.perf_counter()
                on_device.wait()
            finally:
                for module in graphed:
                    del module.forward
            ended = time.perf_counter()
            row = {name: t[0] for name, t in on_device.host.items()}
            fresh = time.perf_counter()
            pack_tensors(row)
            packed = time.perf_counter()
            pack_tensors(row)
            again = time.perf_counter()
            sums: dict[str, float] = {}
            for name, begin, end, events in marks:
                sums[f"host_{name}"] = sums.get(f"host_{name}", 0.0) + end - begin
                if events is not None:
                    sums[f"device_{name}"] = events[0].elapsed_time(events[1]) / 1000
            sums["host_glue"] = launched - started - sum(v for k, v in sums.items() if k.startswith("host_"))
            sums.update(launch=launched - started, wait_for_host_copy=ended - launched, total=ended - started,
                        pack_after_copy=packed - fresh, pack_in_cache=again - packed)
            for name, seconds in sums.items():
                phases.setdefault(name, []).append(seconds)
    finally:
        PreTrainedTokenizerBase.__call__ = tokenize
    return {name: round(1000 * statistics.median(v), 3) for name, v in phases.items()}


def syncs_per_call(fn, text: str, device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn(text)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "bench/results/encoder_batch1.json")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (smoke test)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=20, help="timed calls per variant and round")
    parser.add_argument("--only", nargs="*", help="variants to run (default: all)")
    parser.add_argument("--timeline", action="store_true", help="phases of the graphs path (eager on the CPU)")
    parser.add_argument("--trace", type=pathlib.Path, help="also write a torch.profiler trace (Chrome JSON) of 3 "
                        "calls of the first variant named by --only")
    args = parser.parse_args()
    from encoder_server.batcher import DynamicBatcher
    from promptcast.tiny_models import make_tiny_model

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    with tempfile.TemporaryDirectory() as tmp:
        encoder = flux1_encoder(device, dtype, args.tiny, make_tiny_model(pathlib.Path(tmp) / "flux1", "flux1"))
    batcher = DynamicBatcher(encoder)
    worker = ThreadPoolExecutor(1, thread_name_prefix="encode")
    table, graphed = variants(encoder, batcher, worker)
    names = [n for n in table if not args.only or n in args.only]
    for name in names:  # warm every path (cuBLAS handles, pinned blocks, the worker thread)
        for i in range(3):
            table[name](prompt(i, f"warm-{name}"))
    sync(device)
    latencies = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names:
            load = LoopLoad() if name == "thread_gil" else None
            if load:
                load.__enter__()
            try:
                for i in range(args.calls):
                    started = time.perf_counter()
                    table[name](prompt(r * args.calls + i, name))
                    latencies[name].append(time.perf_counter() - started)
            finally:
                if load:
                    load.__exit__()
        print(f"round {r + 1}/{args.rounds}", flush=True)
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "dtype": str(dtype).removeprefix("torch."), "rounds": args.rounds, "calls": args.calls, "variants": {}}
    base = statistics.median(latencies[names[0]])
    for name in names:
        ordered = sorted(latencies[name])
        p50 = statistics.median(ordered)
        report["variants"][name] = {"prompts_per_s": round(len(ordered) / sum(ordered), 2),
                                    "p50_ms": round(p50 * 1000, 2),
                                    "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000, 2),
                                    f"p50_over_{names[0]}": round(p50 / base, 3),
                                    "syncs_per_call": syncs_per_call(table[name], prompt(0, "syncs"), device)}
        print(f"{name:16} {report['variants'][name]}", flush=True)
    if args.trace:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                    + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []),
                                    with_stack=True) as profile:
            for i in range(3):
                table[names[0]](prompt(i, "trace"))
        profile.export_chrome_trace(str(args.trace))
        print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
    if args.timeline:
        report["timeline_ms"] = timeline(encoder, batcher, graphed)
        print("timeline (graphs, ms, median of 20 calls):", report["timeline_ms"], flush=True)
    worker.shutdown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
