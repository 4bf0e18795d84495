"""One client against the encoder server, phase by phase: where a lone caller's time goes, beside diffusers.

A single closed-loop `RemoteTextEncoder` (its own process) asks the real server (`BackgroundServer`, loopback, the
memory cache on as `promptcast serve` has it, every prompt new) for FLUX.1-dev-shaped embeddings (T5-XXL + CLIP-L,
random bf16 weights). Each call is cut into phases from timestamps taken on both sides (`time.perf_counter` is
CLOCK_MONOTONIC, one clock for every process of the host):

    request in      client's call -> the server's handler starts (gRPC, both directions' Python)
    to worker       handler -> the batch is launched (validation, cache lookup, the batcher, a thread hop)
    launch          tokenize and queue the forward pass and its copy to the host (eager: the whole encode, since
                    Python launching kernels is the bound; CUDA graphs: the replay is queued)
    device          launch returned -> the bytes are on the host and packing starts
    pack            packing for the wire and the memory tier (CRC-32 and the chunks), on the finishing thread
    answer out      packed -> the client has the tensors (filing in the memory tier, gRPC writes, the client's
                    decode and CRC-32)

Beside it, measured in the same run: diffusers' `FluxPipeline.encode_prompt` loop at batch 1 (the baseline of
"never slower than in-process", run first and last: the faster counts), the encoder alone at batch 1, and the raw loopback socket moving the same bytes
between two processes. Each server set-up: `--worker thread|process`, eager and `--cuda-graphs`, each with the
answer streamed and written into the client's shared memory (the default for a loopback client).

    python bench/encoder_one_client.py --out bench/results/encoder_one_client_h200.json   # CUDA, ~5 min
    python bench/encoder_one_client.py --tiny --out /tmp/one_client.json                 # CPU smoke test
"""

from __future__ import annotations

import argparse
import inspect
import json
import multiprocessing as mp
import pathlib
import socket
import statistics
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from encoder_throughput import client_process_init, diffusers_loop, flux1_encoder, prompt, summarize  # noqa: E402
from flux2_encoder import sync  # noqa: E402

PHASES = ("request_in", "to_worker", "launch", "device", "pack", "answer_out")


class Tracer:
    """Wraps the server's methods on the path of a miss; records (what, start, end) in perf_counter seconds."""

    def __init__(self):
        self.records: list[tuple[str, float, float]] = []
        self._undo = []

    def wrap(self, owner, name: str, label: str) -> None:
        """Time `owner.name` (a class's method, or a module's function) as `label`."""
        original = getattr(owner, name)
        records = self.records

        if inspect.iscoroutinefunction(original):
            async def traced(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return await original(*args, **kwargs)
                finally:
                    records.append((label, start, time.perf_counter()))
        else:
            def traced(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    records.append((label, start, time.perf_counter()))

        setattr(owner, name, traced)
        self._undo.append((owner, name, original))

    def __enter__(self):
        import encoder_server.service
        from encoder_server.batcher import DynamicBatcher
        from encoder_server.servicer import TextEncoderServicer

        self.wrap(TextEncoderServicer, "Encode", "handler")
        self.wrap(DynamicBatcher, "_launch", "launch")
        self.wrap(encoder_server.service, "pack_tensors", "pack")  # what each batcher gets as `pack`
        return self

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)

    def phases(self, calls: list[tuple[float, float]]) -> dict:
        """Median of each phase over the client's calls (each matched to the records inside its window)."""
        by = {label: sorted((r for r in self.records if r[0] == label), key=lambda r: r[1])
              for label in ("handler", "launch", "pack")}
        out = {phase: [] for phase in PHASES}
        for c0, c1 in calls:
            inside = {label: next((r for r in rs if c0 <= r[1] <= c1), None) for label, rs in by.items()}
            if any(r is None for r in inside.values()):
                continue
            h, la, p = (inside[k] for k in ("handler", "launch", "pack"))
            for phase, seconds in zip(PHASES, (h[1] - c0, la[1] - h[1], la[2] - la[1], p[1] - la[2], p[2] - p[1],
                                               c1 - p[2])):
                out[phase].append(seconds)
        return {"calls_matched": len(out["launch"]),
                **{phase: round(1000 * statistics.median(v), 2) if v else None for phase, v in out.items()}}


def one_client(job) -> list[tuple[float, float]]:
    """The client process: sequential calls, one new prompt each, for `seconds`; (start, end) of each."""
    address, seconds, tag, shared_memory = job
    from denoiser_client import RemoteTextEncoder

    calls = []
    with RemoteTextEncoder(address, timeout=120, shared_memory=shared_memory) as client:
        client.models()
        for i in range(3):
            client.encode(prompt(i, f"{tag}-warm"))
        stop_at, i = time.perf_counter() + seconds, 0
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            client.encode(prompt(i, tag))
            calls.append((start, time.perf_counter()))
            i += 1
    return calls


def raw_socket(size: int, iters: int) -> dict:
    """The same bytes between two processes over a loopback TCP socket: the transfer time no wire can beat."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    sender = mp.get_context("spawn").Process(target=_raw_sender, args=(port,), daemon=True)
    sender.start()
    sock = _connect(port)
    view, seconds = memoryview(bytearray(size)), []
    for _ in range(iters):
        start = time.perf_counter()
        sock.sendall(size.to_bytes(8, "little"))
        got = 0
        while got < size:
            got += sock.recv_into(view[got:size])
        seconds.append(time.perf_counter() - start)
    sock.close()
    sender.join(10)
    return {"bytes": size, "p50_ms": round(1000 * statistics.median(seconds), 3)}


def _connect(port: int):
    for _ in range(500):
        try:
            sock = socket.create_connection(("127.0.0.1", port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except ConnectionRefusedError:
            time.sleep(0.01)
    raise RuntimeError("the raw socket sender did not start")


def _raw_sender(port: int) -> None:
    with socket.create_server(("127.0.0.1", port)) as server:
        conn, _ = server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        payload = memoryview(bytearray(64 << 20))
        while header := conn.recv(8):
            conn.sendall(payload[:int.from_bytes(header, "little")])


def alone(encoder, seconds: float, tag: str) -> dict:
    """The encoder's own batch-1 path with its copy to the host, no server."""
    from encoder_server.host_copy import to_cpu

    for i in range(3):
        to_cpu(encoder.encode([prompt(i, f"{tag}-warm")], None, 512))
    latencies, start, i = [], time.perf_counter(), 0
    while time.perf_counter() - start < seconds or i < 3:
        t = time.perf_counter()
        to_cpu(encoder.encode([prompt(i, tag)], None, 512))
        latencies.append(time.perf_counter() - t)
        i += 1
    return summarize(latencies, time.perf_counter() - start)


def cpu_profile(encoder, tag: str, calls: int = 30, top: int = 15) -> list:
    """cProfile of the encoder's batch-1 path: where the host's time goes between the device's kernels."""
    import cProfile
    import pstats

    from encoder_server.host_copy import to_cpu

    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(calls):
        to_cpu(encoder.encode([prompt(i, tag)], None, 512))
    profiler.disable()
    stats = pstats.Stats(profiler)
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]  # by own (total minus callees') time
    return [{"function": f"{pathlib.Path(file).name}:{line}:{name}", "own_ms_per_call": round(1000 * tt / calls, 3),
             "cumulative_ms_per_call": round(1000 * ct / calls, 3)} for (file, line, name), (_, _, tt, ct, _) in rows]


def serve_one_client(encoder, pool, seconds: float, tag: str, start_timeout: float, shared_memory: bool) -> dict:
    from encoder_server.server import BackgroundServer, ModelSpec, ServerConfig

    config = ServerConfig([ModelSpec("bench", name=encoder.name)], port=0, cache_mem=1 << 30, cache_dir=None,
                          max_batch_size=32, max_batch_tokens=32 * 512, gpu_timeout=0)
    with Tracer() as tracer:  # before the server exists: its handlers are bound when it is built
        server = BackgroundServer(config, encoders=[encoder])
        try:
            server.start(timeout=start_timeout)
            calls = pool.apply(one_client, ((server.address, seconds, tag, shared_memory),))
        finally:
            server.stop()
    level = summarize([c1 - c0 for c0, c1 in calls], calls[-1][1] - calls[0][0])
    level["phases_ms"] = tracer.phases(calls)
    print(f"  {tag}: {level}", flush=True)
    return level


def process_encoder(encoder, tiny: bool, tokenizer_dir, cuda_graphs: bool):
    from encoder_server.worker_process import ProcessEncoder

    return ProcessEncoder(json.dumps({"family": "flux1", "tiny": tiny, "tokenizer_dir": str(tokenizer_dir),
                                      "cuda_graphs": cuda_graphs}),
                          name=encoder.name, device=str(encoder.device), dtype=encoder.dtype,
                          factory="encoder_one_client:child_encoder", cuda_graphs=cuda_graphs)


def child_encoder(source: str, *, device, dtype, **_):
    """What the `--worker process` child builds here: the same random weights from the same seed, graphed as
    `Encoder.prepare_module` does under `--cuda-graphs`."""
    from encoder_server.acceleration import enable_cuda_graphs

    spec = json.loads(source)
    encoder = flux1_encoder(torch.device(device), dtype, spec["tiny"], pathlib.Path(spec["tokenizer_dir"]))
    if spec["cuda_graphs"]:
        set_graphs(encoder, True, enable_cuda_graphs)
    return encoder


def set_graphs(encoder, on: bool, enable=None) -> None:
    for module in (encoder.pipe.text_encoder, encoder.pipe.text_encoder_2):
        if on:
            enable(module)
        else:
            vars(module).pop("forward", None)
    encoder.cuda_graphs = on
    vars(encoder).pop("_fingerprint", None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "bench/results/encoder_one_client.json")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (smoke test)")
    parser.add_argument("--seconds", type=float, default=None, help="per measurement (default 8, tiny 2)")
    parser.add_argument("--workers", nargs="+", default=["thread", "process"])
    parser.add_argument("--transports", nargs="+", choices=["stream", "shared_memory"],
                        default=["stream", "shared_memory"], help="how the answer reaches the client (the client "
                        "on loopback uses shared memory by default; stream: shared_memory=False)")
    parser.add_argument("--start-timeout", type=float, default=600)
    parser.add_argument("--modes", nargs="+", choices=["eager", "graphs"], default=["eager", "graphs"],
                        help="server set-ups: --no-cuda-graphs and the default graphs (CUDA only)")
    args = parser.parse_args()
    seconds = args.seconds or (2.0 if args.tiny else 8.0)
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    if args.tiny:
        torch.set_num_threads(1)
    from encoder_server.acceleration import enable_cuda_graphs
    from promptcast.tiny_models import make_tiny_model

    graph_modes = [mode == "graphs" for mode in args.modes if device.type == "cuda" or mode == "eager"]
    report = {"benchmark": "encoder_one_client", "device": torch.cuda.get_device_name() if device.type == "cuda"
              else "cpu", "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."),
              "seconds_per_measurement": seconds, "phases": list(PHASES), "servers": {}}
    with tempfile.TemporaryDirectory() as tmp, mp.get_context("spawn").Pool(1, initializer=client_process_init) as pool:
        tokenizer_dir = make_tiny_model(pathlib.Path(tmp) / "flux1", "flux1")
        encoder = flux1_encoder(device, dtype, args.tiny, tokenizer_dir)
        sync(device)
        report["diffusers_batch1"] = diffusers_loop(encoder, seconds, "diffusers")
        print(f"  diffusers loop: {report['diffusers_batch1']}", flush=True)
        out = encoder.encode([prompt(0, "size")], None, 512)
        size = sum(t.numel() * t.element_size() for t in out.values())
        report["raw_socket"] = raw_socket(size, 200)
        print(f"  raw socket, {size} bytes: {report['raw_socket']}", flush=True)
        for graphs in graph_modes:
            set_graphs(encoder, graphs, enable_cuda_graphs)
            report[f"alone_{'graphs' if graphs else 'eager'}"] = level = alone(encoder, seconds, f"alone-{graphs}")
            print(f"  encoder alone, graphs={graphs}: {level}", flush=True)
            level["cpu_profile"] = cpu_profile(encoder, f"profile-{graphs}")
            print("  " + "\n  ".join(f"{r['own_ms_per_call']:>7.3f} {r['cumulative_ms_per_call']:>7.3f} "
                                      f"{r['function']}" for r in level["cpu_profile"]), flush=True)
            for worker in args.workers:
                served = encoder if worker == "thread" else process_encoder(encoder, args.tiny, tokenizer_dir, graphs)
                try:
                    for transport in args.transports:
                        label = f"{worker}_{'graphs' if graphs else 'eager'}_{transport}"
                        report["servers"][label] = level = serve_one_client(
                            served, pool, seconds, label, args.start_timeout, transport == "shared_memory")
                        level["x_diffusers"] = round(level["prompts_per_s"] /
                                                     report["diffusers_batch1"]["prompts_per_s"], 3)
                        args.out.parent.mkdir(parents=True, exist_ok=True)
                        args.out.write_text(json.dumps(report, indent=2) + "\n")
                finally:
                    if served is not encoder:
                        served.close()
            set_graphs(encoder, False)
        # The diffusers loop again, last: on a shared machine the host's speed drifts within a run, and an eager loop
        # at batch 1 is bound by it. The faster of its two runs is the baseline.
        report["diffusers_batch1_again"] = again = diffusers_loop(encoder, seconds, "diffusers-again")
        print(f"  diffusers loop, again: {again}", flush=True)
        if again["prompts_per_s"] > report["diffusers_batch1"]["prompts_per_s"]:
            report["diffusers_batch1"], report["diffusers_batch1_again"] = again, report["diffusers_batch1"]
        for level in report["servers"].values():
            level["x_diffusers"] = round(level["prompts_per_s"] / report["diffusers_batch1"]["prompts_per_s"], 3)
    base = report["diffusers_batch1"]
    print(f"{'path':36} {'prompts/s':>10} {'p50 ms':>8} {'x diffusers':>12}  " + " ".join(f"{p:>10}" for p in PHASES))
    print(f"{'diffusers loop, batch 1':36} {base['prompts_per_s']:>10.2f} {base['p50_ms']:>8.1f} {1:>12.2f}")
    for label, level in report["servers"].items():
        phases = level["phases_ms"]
        print(f"{'server ' + label:36} {level['prompts_per_s']:>10.2f} {level['p50_ms']:>8.1f} "
              f"{level['x_diffusers']:>12.2f}  " + " ".join(f"{phases[p] or 0:>10.2f}" for p in PHASES))
    print(f"raw socket p50 {report['raw_socket']['p50_ms']} ms for {report['raw_socket']['bytes']} bytes")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
