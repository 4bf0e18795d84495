"""Soak: many client processes against two replicas that share a Redis cache, while things break.

Two real `promptcast serve` replicas (the tiny FLUX.1 model, CPU) share one real `redis-server` (`--cache-redis`);
each sits behind a loopback `FaultProxy`, and the clients (`soak_client.py`, one process each) dial the two proxies as
`RemoteTextEncoder`'s comma list of targets. During the run, on a schedule scaled to `--duration`: Redis is killed
and restarted twice (empty again: no persistence), replica B is SIGKILLed with streams in flight and restarted on its
port, the proxies add delay for a while, and cut the connections that are streaming (TCP resets), three times.

What it checks and reports (JSON, `--out`):
  * every call ends: `ok` (every embedding equal to diffusers' own, see soak_client.py), or a clear status;
    `wrong` and `unexpected` must be 0;
  * each fault is logged once by the soak, and each replica logs each Redis outage it lived through once
    (unreachable) and its recovery once; no replica logs a traceback;
  * server memory (VmRSS) and open file descriptors, sampled from /proc every half second: their spread and drift
    after warm-up (the first quarter of each server process's life).

    python bench/soak.py                                         # 64 clients, 10 minutes
    python bench/soak.py --clients 8 --duration 120 --out bench/results/soak_cpu.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pathlib
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from fault_proxy import FaultProxy  # noqa: E402

# When each fault happens, as a fraction of the run.
SCHEDULE = [(0.15, "redis_restart"), (0.25, "cut"), (0.35, "kill_replica"), (0.45, "delay"), (0.55, "cut"),
            (0.65, "redis_restart"), (0.8, "cut")]
REDIS_DOWN_SECONDS = 1.0
REPLICA_DOWN_SECONDS = 1.0
REDIS_RETRY_SECONDS = 2.0  # how long a server skips Redis after finding it unreachable (RedisCache.retry_interval)


def import_path() -> str:
    """This checkout first, then whatever the caller's path had (wheels unpacked beside the system's site)."""
    return os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    def __init__(self, binary: str):
        self.binary, self.port = binary, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None
        self.up_since = 0.0  # time.monotonic() when it last answered a ping after starting

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--maxmemory", "64mb", "--maxmemory-policy",
                                      "allkeys-lru"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                self.up_since = time.monotonic()
                return
            except redis.exceptions.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Replica:
    """`promptcast serve` on a fixed port (a restart comes back where the proxy forwards), log kept per life."""

    def __init__(self, name: str, model: str, redis_url: str, work: pathlib.Path):
        self.name, self.port = name, free_port()
        self.args = [sys.executable, "-m", "promptcast", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                     "--model", f"tiny-flux1={model}", "--device", "cpu", "--cache-redis", redis_url,
                     "--cache-dir", str(work / f"cache-{name}"), "--cache-disk-max", "64MiB",
                     "--cache-mem", "8MiB", "--grace", "5"]
        self.work = work
        self.lives: list[dict] = []  # one per process: pid, log path, samples
        self.proc = None
        self.restarting: threading.Thread | None = None

    def start(self) -> None:
        log = self.work / f"{self.name}-{len(self.lives)}.log"
        # One torch thread each: two replicas and the clients share the host's cores, and torch's spinning worker
        # threads turn an oversubscribed CPU into latencies of seconds.
        self.proc = subprocess.Popen(self.args, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, "PYTHONPATH": import_path(), "OMP_NUM_THREADS": "1"})
        self.lives.append({"pid": self.proc.pid, "log": log, "samples": [], "started": time.monotonic(),
                           "redis_outages": 0})

    def wait_serving(self, timeout: float = 180) -> None:
        import grpc

        from encoder_server.server import health_status

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"replica {self.name} exited {self.proc.returncode}")
                try:
                    if health_status(channel) == "SERVING":
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"replica {self.name} not SERVING after {timeout}s")

    def sample(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pid = self.proc.pid
        try:
            status = pathlib.Path(f"/proc/{pid}/status").read_text()
            fields = {line.split(":")[0]: line.split()[1] for line in status.splitlines()
                      if line.startswith(("VmRSS:", "RssShmem:"))}
            # Pages of the server's published slabs (/dev/shm, bounded by --cache-shm) are counted apart.
            rss, shmem = int(fields["VmRSS"]) * 1024, int(fields.get("RssShmem", 0)) * 1024
            links = [_readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except (OSError, KeyError):
            return
        # Mappings of clients' shared-memory arenas each hold a descriptor, bounded by the server's mapping cache:
        # counted apart, so the rest must stay flat.
        arenas = sum(link.startswith("/dev/shm/promptcast-") for link in links)
        life = self.lives[-1]
        life["samples"].append((round(time.monotonic() - life["started"], 2), rss - shmem, len(links) - arenas, arenas,
                                shmem))


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:  # closed since it was listed
        return ""


def resources(samples: list[tuple[float, int, int, int, int]]) -> dict:
    """Spread and drift of RSS and fds after warm-up (the first quarter of the samples); fds of shared-memory
    arenas and the pages of published slabs apart."""
    if len(samples) < 8:
        return {"samples": len(samples)}
    after = samples[len(samples) // 4:]
    t = [s[0] for s in after]
    rss = [s[1] / 2**20 for s in after]
    fds = [s[2] for s in after]
    quarter = max(1, len(after) // 4)
    slope = statistics.linear_regression(t, rss).slope * 60 if len(set(t)) > 1 else 0.0
    return {"samples": len(samples), "warm_up_ends_s": after[0][0], "seconds": round(t[-1] - t[0], 1),
            "rss_mib": {"first": round(rss[0], 1), "min": round(min(rss), 1), "max": round(max(rss), 1),
                        "last": round(rss[-1], 1), "first_quarter_median": round(statistics.median(rss[:quarter]), 1),
                        "last_quarter_median": round(statistics.median(rss[-quarter:]), 1),
                        "slope_mib_per_min": round(slope, 2),
                        # the median of each minute after warm-up: whether a rise levels off or goes on
                        "minute_medians": [round(statistics.median(v), 1) for v in minutes(t, rss)]},
            "fds": {"first": fds[0], "min": min(fds), "max": max(fds), "last": fds[-1]},
            "arena_fds": {"max": max(s[3] for s in after), "last": after[-1][3]},
            "published_slab_mib": {"max": round(max(s[4] for s in after) / 2**20, 1),
                                   "last": round(after[-1][4] / 2**20, 1)}}


def minutes(t: list[float], values: list[float]) -> list[list[float]]:
    buckets: dict[int, list[float]] = {}
    for when, value in zip(t, values):
        buckets.setdefault(int((when - t[0]) // 60), []).append(value)
    return [buckets[k] for k in sorted(buckets)]


def log_findings(path: pathlib.Path) -> dict:
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if "Traceback" in line or "ExecuteBatchError" in line]
    excerpts = ["\n".join(lines[max(0, i - 2):i + 14]) for i in starts[:3]]
    return {"log_excerpts": excerpts, "redis_unreachable": text.count("is unreachable"), "redis_back": text.count("is reachable again"),
            "tracebacks": text.count("Traceback"), "execute_batch_errors": text.count("ExecuteBatchError"),
            "encode_lines": text.count("promptcast.requests: encode")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of traffic")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "bench/results/soak.json")
    parser.add_argument("--redis-server", default=shutil.which("redis-server"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.redis_server:
        sys.exit("error: --redis-server: no redis-server binary found (apt-get install redis-server)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from promptcast.tiny_models import make_tiny_model

    work = pathlib.Path(tempfile.mkdtemp(prefix="promptcast-soak-"))
    faults: list[dict] = []
    began = time.monotonic()

    def fault(kind: str, **details) -> None:
        faults.append({"at_s": round(time.monotonic() - began, 2), "fault": kind, **details})
        print(f"[{faults[-1]['at_s']:7.2f}s] fault {len(faults)}: {kind} {details or ''}", flush=True)

    redis = Redis(args.redis_server)
    replicas, proxies, clients = [], [], []
    try:
        model = str(make_tiny_model(work / "tiny-flux1", "flux1"))
        redis.start()
        replicas = [Replica(name, model, redis.url, work) for name in ("a", "b")]
        for replica in replicas:
            replica.start()
        for replica in replicas:
            replica.wait_serving()
        proxies = [FaultProxy(r.port).start() for r in replicas]
        targets = ",".join(f"127.0.0.1:{p.port}" for p in proxies)
        from soak_client import run

        spawn = mp.get_context("spawn")
        results, ready, go, stop_at = spawn.Queue(), spawn.Queue(), spawn.Event(), spawn.Value("d", 0.0)
        # Half the clients list replica B first: the client keeps to the last target that answered, and both
        # replicas must carry streams when one is killed.
        orders = [targets, ",".join(reversed(targets.split(",")))]
        clients = [spawn.Process(target=run, args=(i, orders[i % 2], model, ready, go, stop_at, results,
                                                   args.seed + i), daemon=True) for i in range(args.clients)]
        for client in clients:
            client.start()
        for _ in clients:  # every client has loaded torch, its references and channels: the clock starts now
            ready.get(timeout=600)
        stop_at.value = time.time() + args.duration
        go.set()
        began = time.monotonic()
        print(f"traffic: {args.clients} clients, {args.duration:.0f}s, targets {targets}", flush=True)
        schedule = [(at * args.duration, kind) for at, kind in SCHEDULE]
        while time.time() < stop_at.value:
            for replica in replicas:
                replica.sample()
            now = time.monotonic() - began
            while schedule and now >= schedule[0][0]:
                _, kind = schedule.pop(0)
                inject(kind, redis, replicas, proxies, fault)
            time.sleep(0.5)
        summaries = [results.get(timeout=120) for _ in clients]
        for client in clients:
            client.join(30)
        for replica in replicas:
            replica.sample()
            if replica.restarting is not None:
                replica.restarting.join(180)
        settle(replicas, redis)
        codes = {r.name: _stop(r) for r in replicas}
    finally:
        for proxy in proxies:
            proxy.stop()
        for replica in replicas:
            if replica.proc is not None and replica.proc.poll() is None:
                replica.proc.kill()
        if redis.proc is not None and redis.proc.poll() is None:
            redis.kill()
        for client in clients:
            if client.is_alive():
                client.kill()
    report = build_report(args, summaries, faults, replicas, proxies, codes)
    shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("totals", "verdict")}, indent=2))
    print(f"wrote {args.out}")
    sys.exit(0 if report["verdict"]["passed"] else 1)


def settle(replicas, redis) -> None:
    """One cache miss on each replica once its Redis retry interval has passed since Redis came back: an outage it
    noticed is then followed by its "reachable again" line before it is stopped, however little traffic it had at
    the end of a short run."""
    from denoiser_client import RemoteTextEncoder

    time.sleep(max(0.0, redis.up_since + REDIS_RETRY_SECONDS + 0.5 - time.monotonic()))
    for replica in replicas:
        if replica.proc.poll() is None:
            with RemoteTextEncoder(f"127.0.0.1:{replica.port}", timeout=60) as client:
                client.encode(f"settle probe for replica {replica.name} at {time.time()}")


def inject(kind, redis, replicas, proxies, fault) -> None:
    if kind == "redis_restart":
        redis.kill()
        fault("redis_killed")
        time.sleep(REDIS_DOWN_SECONDS)
        redis.start()
        for replica in replicas:
            if replica.proc.poll() is None:
                replica.lives[-1]["redis_outages"] += 1
        fault("redis_restarted", down_s=REDIS_DOWN_SECONDS)
    elif kind == "cut":
        fault("connections_cut", streams=[p.cut_busy() for p in proxies])
    elif kind == "delay":
        for proxy in proxies:
            proxy.delay = 0.05
        fault("delay_on", seconds_per_chunk=0.05)
        time.sleep(3)
        for proxy in proxies:
            proxy.delay = 0.0
        fault("delay_off")
    elif kind == "kill_replica":
        victim = replicas[1]
        victim.sample()
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait()
        victim.lives[-1]["killed"] = True
        fault("replica_killed", replica=victim.name, pid=victim.lives[-1]["pid"])
        time.sleep(REPLICA_DOWN_SECONDS)
        victim.start()

        def serving():  # loading takes seconds: the schedule goes on meanwhile
            victim.wait_serving()
            fault("replica_restarted", replica=victim.name, pid=victim.lives[-1]["pid"])

        victim.restarting = threading.Thread(target=serving, daemon=True)
        victim.restarting.start()


def _stop(replica) -> int:
    replica.proc.send_signal(signal.SIGTERM)
    try:
        return replica.proc.wait(60)
    except subprocess.TimeoutExpired:
        replica.proc.kill()
        return replica.proc.wait()


def build_report(args, summaries, faults, replicas, proxies, codes) -> dict:
    totals: dict[str, dict[str, int]] = {}
    latency: dict[str, list[float]] = {}
    failures, close = [], 0
    for s in summaries:
        close += s["close"]
        failures += s["failures"]
        for op, outcomes in s["calls"].items():
            for outcome, n in outcomes.items():
                totals.setdefault(op, {}).setdefault(outcome, 0)
                totals[op][outcome] += n
        for op, values in s["latency_ms"].items():
            latency.setdefault(op, []).extend(values)
    calls = sum(n for outcomes in totals.values() for n in outcomes.values())
    wrong = sum(o.get("wrong", 0) for o in totals.values())
    unexpected = sum(o.get("unexpected", 0) for o in totals.values())
    failed_statuses = sum(n for op, o in totals.items() if op not in ("deadline", "cancel")
                          for outcome, n in o.items() if outcome.startswith("status:"))
    lives = []
    for replica in replicas:
        for number, life in enumerate(replica.lives):
            lives.append({"replica": replica.name, "life": number, "pid": life["pid"], "killed": life.get("killed", False),
                          "redis_outages_lived_through": life["redis_outages"], **log_findings(life["log"]),
                          "resources": resources(life["samples"])})
    logs_ok = all(life["tracebacks"] == 0 and life["execute_batch_errors"] == 0
                  and life["redis_unreachable"] <= life["redis_outages_lived_through"]
                  and (life["redis_back"] == life["redis_unreachable"] or life["killed"]) for life in lives)
    kinds = [f["fault"] for f in faults]
    passed = (wrong == 0 and unexpected == 0 and not any("died" in f for f in failures) and logs_ok
              and kinds.count("redis_restarted") == 2 and kinds.count("replica_restarted") == 1
              and all(code == 0 for code in codes.values()))
    return {
        "benchmark": "soak", "clients": args.clients, "duration_s": args.duration, "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "schedule": SCHEDULE, "faults": faults,
        "totals": {"calls": calls, "calls_per_s": round(calls / args.duration, 1), "wrong": wrong,
                   "unexpected": unexpected, "failed_with_status_outside_deadline_and_cancel": failed_statuses,
                   "close_not_exact_rows": close, "by_op": totals},
        "latency_ms": {op: {"p50": round(statistics.median(v), 1), "p99": round(sorted(v)[int(len(v) * 0.99)], 1),
                            "max": round(max(v), 1)} for op, v in latency.items() if v},
        "proxies": [{"connections": p.connections, "refused": p.refused, "cut": p.cut, "mib": round(p.bytes / 2**20)}
                    for p in proxies],
        "replicas": lives, "exit_codes_on_sigterm": codes, "failures_kept": failures[:40],
        "verdict": {"passed": passed, "logs_ok": logs_ok},
    }


if __name__ == "__main__":
    main()
