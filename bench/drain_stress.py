"""Drains under the worst client: streams that stop reading, then are cancelled during the grace period (or never).

Each run starts a real `promptcast serve` (the tiny FLUX.2 model on `--device`), opens `--streams` Encode streams of
256 prompts at 512 tokens (50 MB each in fp32, 25 MB in bf16: far more than flow control sends unread), reads one
message of each, sends SIGTERM, and cancels the streams at a random moment inside the grace period (or, one run in
four, never: the grace period runs out). It records the exit code (a crash is negative: -11 is SIGSEGV) and whether
the log shows `ExecuteBatchError`, a traceback, or a call still running after the server stopped.

    python bench/drain_stress.py --runs 30 --device cuda --out bench/results/drain_stress.json
    python bench/drain_stress.py --runs 5                              # CPU
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import signal
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def one_run(model: str, device: str, streams: int, grace: float, cancel_at: float | None) -> dict:
    import grpc

    from conftest import ServerProcess
    from shared.promptcast.v1 import encoder_pb2 as pb
    from shared.promptcast.v1 import encoder_pb2_grpc as pb_grpc

    server = ServerProcess(["--model", f"tiny-flux2={model}", "--device", device, "--grace", str(grace),
                            "--cache-dir", "none", "--max-prompts-per-call", "256"]).wait_serving()
    prompts = [f"drain stress {time.time()}"] * 256
    channels, calls = [], []
    try:
        for _ in range(streams):
            channels.append(grpc.insecure_channel(server.address, [("grpc.max_receive_message_length", 8 << 20)]))
            calls.append(pb_grpc.TextEncoderStub(channels[-1]).Encode(
                pb.EncodeRequest(prompts=prompts, max_sequence_length=512), timeout=120))
        for call in calls:
            next(call)
        time.sleep(0.3)
        server.proc.send_signal(signal.SIGTERM)
        if cancel_at is not None:
            time.sleep(cancel_at)
            for call in calls:
                call.cancel()
        code = server.proc.wait(grace + 60)
    finally:
        for channel in channels:
            channel.close()
        if server.proc.poll() is None:
            server.proc.kill()
    log = server.output()
    return {"exit_code": code, "cancel_at_s": cancel_at, "execute_batch_error": "ExecuteBatchError" in log,
            "traceback": "Traceback" in log, "still_running": "still running" in log}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--streams", type=int, default=2)
    parser.add_argument("--grace", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "bench/results/drain_stress.json")
    args = parser.parse_args()
    from promptcast.tiny_models import make_tiny_model

    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        model = str(make_tiny_model(pathlib.Path(tmp) / "tiny-flux2", "flux2"))
        runs = []
        for i in range(args.runs):
            cancel_at = None if i % 4 == 3 else rng.uniform(0.05, args.grace * 0.8)
            runs.append(one_run(model, args.device, args.streams, args.grace, cancel_at))
            print(i, runs[-1], flush=True)
    codes = [r["exit_code"] for r in runs]
    report = {"benchmark": "drain_stress", "device": args.device, "streams": args.streams, "grace_s": args.grace,
              "runs": runs, "exit_codes": {str(c): codes.count(c) for c in sorted(set(codes))},
              "with_execute_batch_error": sum(r["execute_batch_error"] for r in runs),
              "with_traceback": sum(r["traceback"] for r in runs), "all_exit_zero": set(codes) == {0}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))
    sys.exit(0 if report["all_exit_zero"] else 1)


if __name__ == "__main__":
    main()
