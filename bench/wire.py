"""The wire alone: memory-cache hits of real-size embeddings through `promptcast serve` and `RemoteTextEncoder`, next
to a raw loopback TCP socket moving the same bytes between two processes, measured in the same run.

The server is a real `promptcast serve` subprocess (the tiny FLUX.1 model: no encode is measured here). Entries of
the real sizes are written into its disk cache before it starts, under the keys it computes: a FLUX.1 entry (T5
(512, 4096) + CLIP pooled (768,), bf16: 4 MiB) and a FLUX.2-dev one ((512, 15360) bf16: 15 MiB). The first request
of each is a disk hit that fills the memory tier; every measured request after it is a memory hit. Sequential
latency alternates rounds of each transport (the bytes streamed over gRPC; written by the server into the client's
shared memory, `RemoteTextEncoder(shared_memory=True)`) and raw-socket transfers, so all see the same machine. Then `--clients` concurrent
clients (threads over `--client-procs` processes, one channel each) ask for memory hits for `--seconds`: the
aggregate rate the server streams at.

    python bench/wire.py --out bench/results/wire.json                   # any machine, about a minute
    python bench/wire.py --pin --iters 150 --out bench/results/wire_cpu.json   # a small shared CPU machine
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pathlib
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from soak import import_path  # noqa: E402

LENGTH = 512
# A 4 KiB entry measures what a hit costs apart from its bytes: the call itself (the time a bare health check takes,
# measured beside it) plus the server's lookup and the client's assembly.
SIZES = {"tiny_4kib": {"prompt_embeds": (1, 2048)},
         "flux1_4mib": {"prompt_embeds": (LENGTH, 4096), "pooled_prompt_embeds": (768,)},
         "flux2_15mib": {"prompt_embeds": (LENGTH, 15360)}}
RAW_SERVER = r"""
import socket, sys
listener = socket.socket(); listener.bind(("127.0.0.1", 0)); listener.listen(64)
print(listener.getsockname()[1], flush=True)
payload = bytes(int(sys.argv[1]))
while True:
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while (request := conn.recv(8)):
        conn.sendall(memoryview(payload)[:int.from_bytes(request, "little")])
    conn.close()
"""


def add_client_options(options: list[str]) -> None:
    """Give every channel this process opens these extra options (`NAME=INT` or `NAME=TEXT`): for trying gRPC
    settings on the client side without changing `RemoteTextEncoder`."""
    import grpc

    parsed = [(name, int(value) if value.lstrip("-").isdigit() else value)
              for name, _, value in (option.partition("=") for option in options)]
    if not parsed:
        return
    plain = grpc.insecure_channel

    def channel(target, options=None, *args, **kwargs):
        return plain(target, [*(options or []), *parsed], *args, **kwargs)

    grpc.insecure_channel = channel


def prompt_of(name: str, i: int) -> str:
    return f"wire bench {name} entry {i}"


def write_entries(cache_dir: pathlib.Path, fingerprint: str, per_size: int) -> dict[str, int]:
    import torch

    from shared.cache_keys import embedding_key
    from shared.disk_cache import DiskTier

    disk = DiskTier(cache_dir, 64 << 30)
    sizes = {}
    for name, shapes in SIZES.items():
        for i in range(per_size):
            tensors = {out: torch.randn(shape).to(torch.bfloat16) for out, shape in shapes.items()}
            disk.put(embedding_key(fingerprint, LENGTH, prompt_of(name, i), None), tensors)
            sizes[name] = sum(t.numel() * t.element_size() for t in tensors.values())
    return sizes


def start_server(model: str, cache_dir: pathlib.Path, extra: list[str]):
    import grpc

    from encoder_server.server import health_status

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "promptcast", "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--model", f"tiny-flux1={model}", "--device", "cpu", "--cache-dir", str(cache_dir),
                             "--cache-mem", "4GiB", *extra], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": import_path()})
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        for _ in range(600):
            try:
                if health_status(channel) == "SERVING":
                    return proc, f"127.0.0.1:{port}"
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise RuntimeError("the server did not start")


def pin(pids: list[int], cpus: set[int]) -> None:
    for pid in pids:
        for task in os.listdir(f"/proc/{pid}/task"):  # every thread it has (new ones inherit from their creator)
            os.sched_setaffinity(int(task), cpus)


def raw_transfer(sock, view: memoryview, size: int) -> None:
    sock.sendall(size.to_bytes(8, "little"))
    got = 0
    while got < size:
        got += sock.recv_into(view[got:size])


def summary(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1000
    return {"n": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3), "mean_ms": round(float(ms.mean()), 3)}


TRANSPORTS = {"stream": False, "shared_memory": True}  # RemoteTextEncoder(shared_memory=...)


def sequential(address: str, raw_port: int, sizes: dict[str, int], per_size: int, iters: int) -> dict:
    """Memory hits through each transport (the bytes streamed over gRPC; written into the client's shared memory),
    in rounds alternating with raw-socket transfers of the same size."""
    import grpc

    from denoiser_client import RemoteTextEncoder
    from encoder_server.server import health_status

    results = {}
    with grpc.insecure_channel(address) as channel:  # a bare unary call's round trip on this machine
        health_status(channel)
        rtts = []
        for _ in range(iters):
            started = time.perf_counter()
            health_status(channel)
            rtts.append(time.perf_counter() - started)
    results["health_check"] = summary(rtts)
    print(f"health check: p50 {results['health_check']['p50_ms']:.3f} ms", flush=True)
    clients = {name: RemoteTextEncoder(address, timeout=60, shared_memory=on) for name, on in TRANSPORTS.items()}
    with socket.create_connection(("127.0.0.1", raw_port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffer = memoryview(bytearray(max(sizes.values())))
        for name, size in sizes.items():
            for i in range(per_size):  # disk hits: fill the memory tier
                clients["stream"].encode(prompt_of(name, i), max_sequence_length=LENGTH)
            clients["shared_memory"].encode(prompt_of(name, 0), max_sequence_length=LENGTH)  # its arena's size
            times: dict[str, list[float]] = {transport: [] for transport in [*clients, "raw"]}
            for round_start in range(0, iters, 10):
                for transport, enc in clients.items():
                    for i in range(round_start, min(iters, round_start + 10)):
                        started = time.perf_counter()
                        _, info = enc.encode(prompt_of(name, i % per_size), max_sequence_length=LENGTH,
                                             with_info=True)
                        times[transport].append(time.perf_counter() - started)
                        assert info.cache_status == ["memory"], info.cache_status
                        assert info.shared_memory == TRANSPORTS[transport], (transport, info)
                for _ in range(10):
                    started = time.perf_counter()
                    raw_transfer(sock, buffer, size)
                    times["raw"].append(time.perf_counter() - started)
            g, m, r = summary(times["stream"]), summary(times["shared_memory"]), summary(times["raw"])
            results[name] = {"bytes": size, "grpc_memory_hit": g, "shared_memory_hit": m, "raw_socket": r,
                             "p50_ratio": round(g["p50_ms"] / r["p50_ms"], 2),
                             "shared_memory_p50_ratio": round(m["p50_ms"] / r["p50_ms"], 2),
                             "grpc_p50_gb_per_s": round(size / g["p50_ms"] / 1e6, 2),
                             "shared_memory_p50_gb_per_s": round(size / m["p50_ms"] / 1e6, 2),
                             "raw_p50_gb_per_s": round(size / r["p50_ms"] / 1e6, 2)}
            print(f"{name}: streamed p50 {g['p50_ms']:.2f} ms, shared memory p50 {m['p50_ms']:.2f} ms, raw socket "
                  f"p50 {r['p50_ms']:.2f} ms; ratios {results[name]['p50_ratio']:.2f}x, "
                  f"{results[name]['shared_memory_p50_ratio']:.2f}x", flush=True)
    for enc in clients.values():
        enc.close()
    return results


def _hammer(address: str, name: str, threads: int, per_size: int, start_at: float, stop_at: float, out,
            client_options: list[str], shared_memory: bool) -> None:
    """A client process: `threads` threads, one channel each, asking for memory hits until `stop_at`."""
    sys.path.insert(0, str(ROOT))
    add_client_options(client_options)
    from denoiser_client import RemoteTextEncoder

    counts = [0] * threads

    def loop(t):
        with RemoteTextEncoder(address, timeout=120, shared_memory=shared_memory) as enc:
            enc.encode(prompt_of(name, t % per_size), max_sequence_length=LENGTH)  # connect before the clock
            while time.time() < start_at:
                time.sleep(0.01)
            while time.time() < stop_at:
                enc.encode(prompt_of(name, t % per_size), max_sequence_length=LENGTH)
                counts[t] += 1

    workers = [threading.Thread(target=loop, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out.put(sum(counts))


def concurrent(address: str, name: str, size: int, clients: int, procs: int, per_size: int, seconds: float,
               client_options: list[str], transport: str = "stream") -> dict:
    spawn = mp.get_context("spawn")
    out = spawn.Queue()
    start_at = time.time() + 8 + procs
    stop_at = start_at + seconds
    threads = [clients // procs + (1 if p < clients % procs else 0) for p in range(procs)]
    workers = [spawn.Process(target=_hammer, args=(address, name, n, per_size, start_at, stop_at, out, client_options,
                                                   TRANSPORTS[transport])) for n in threads if n]
    for w in workers:
        w.start()
    answers = sum(out.get(timeout=seconds + 300) for _ in workers)
    for w in workers:
        w.join(30)
    rate = answers * size / seconds
    print(f"{name}, {transport}: {clients} clients, {answers / seconds:.1f} hits/s, {rate / 1e9:.2f} GB/s", flush=True)
    return {"transport": transport, "clients": clients, "client_processes": len(workers), "seconds": seconds,
            "hits_per_s": round(answers / seconds, 1), "gb_per_s": round(rate / 1e9, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "bench/results/wire.json")
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--entries", type=int, default=4, help="distinct entries per size")
    parser.add_argument("--clients", type=int, default=32, help="0: sequential latency only")
    parser.add_argument("--client-procs", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--transports", nargs="+", choices=list(TRANSPORTS), default=list(TRANSPORTS),
                        help="the concurrent part's transports, each measured in turn")
    parser.add_argument("--server-arg", action="append", default=[], help="extra `promptcast serve` argument")
    parser.add_argument("--client-option", action="append", default=[], help="extra channel option NAME=VALUE")
    parser.add_argument("--pin", action="store_true", help="sequential part: servers (gRPC and raw) on CPU 0, this "
                        "client on CPU 1, steadier figures on a small shared machine (the concurrent part is unpinned)")
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    add_client_options(args.client_option)
    from encoder_server.families import get_encoder
    from promptcast.tiny_models import make_tiny_model

    work = pathlib.Path(tempfile.mkdtemp(prefix="promptcast-wire-"))
    model = str(make_tiny_model(work / "tiny-flux1", "flux1"))
    fingerprint = get_encoder(model, name="tiny-flux1").fingerprint  # what the server will key its cache with
    sizes = write_entries(work / "cache", fingerprint, args.entries)
    largest = max(sizes.values())
    raw = subprocess.Popen([sys.executable, "-c", RAW_SERVER, str(largest)], stdout=subprocess.PIPE, text=True)
    server = None
    try:
        raw_port = int(raw.stdout.readline())
        server, address = start_server(model, work / "cache", args.server_arg)
        every_cpu = os.sched_getaffinity(0)
        if args.pin:
            pin([raw.pid, server.pid], {0})
            os.sched_setaffinity(0, {1})
        report = {"benchmark": "wire", "label": args.label, "cpu_count": os.cpu_count(),
                  "python": platform.python_version(), "server_args": args.server_arg,
                  "client_options": args.client_option, "pinned_sequential": args.pin,
                  "sequential": sequential(address, raw_port, sizes, args.entries, args.iters)}
        if args.pin:
            pin([server.pid], every_cpu)
            os.sched_setaffinity(0, every_cpu)
        report["concurrent"] = {
            name if transport == "stream" else f"{name}_{transport}": concurrent(
                address, name, size, args.clients, args.client_procs, args.entries, args.seconds, args.client_option,
                transport)
            for name, size in sizes.items() for transport in args.transports} if args.clients else {}
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
        raw.kill()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
