"""One soak client process: a closed loop of mixed calls against the replicas, every answer checked.

Calls, drawn at random: `hit` (a prompt of a pool every client shares: memory or Redis hits after the first),
`miss` (a prompt nobody asked before), `duplicate` (the prompt of the current half-second, which every client asks
for at about the same time: single flight on a replica, a race for Redis across them), `multi` (several prompts in
one call, a repeat among them), `large` (8 pool prompts at 512 tokens: streams long enough for cuts and kills to land
in), `cancel` (a raw stream of 16 prompts at 512 tokens, read a little, then cancelled) and `deadline` (a call with a
deadline of a few milliseconds).

Every embedding that comes back is compared with diffusers' own `FluxPipeline.encode_prompt` on the same tiny model,
run here at batch 1 under `no_grad` (how the pipeline's `__call__` runs it): bit for bit (`exact`), else within 1e-5
of its own prompt's reference and the pair's nearest (`close`: merged batches may round differently on some CPUs),
else `wrong`. A call either returns checked embeddings or raises a clear status (a `PromptcastError` from the
client; a gRPC status on the raw cancel stream); anything else is `unexpected`.
"""

from __future__ import annotations

import os
import random
import time
import traceback
import uuid

SHORT, LONG = 64, 512  # max_sequence_length of most calls / of large streams
POOL = 24
WEIGHTS = {"hit": 30, "miss": 15, "duplicate": 15, "multi": 10, "large": 10, "cancel": 10, "deadline": 10}
MAX_FAILURES_KEPT = 20


class Checker:
    """References from diffusers, computed once per prompt and length."""

    def __init__(self, model_dir: str):
        import torch
        from diffusers import FluxPipeline

        torch.set_num_threads(1)
        self.torch = torch
        self.pipe = FluxPipeline.from_pretrained(model_dir, transformer=None, vae=None)
        self.references: dict[tuple[str, int], dict] = {}

    def reference(self, prompt: str, length: int) -> dict:
        key = (prompt, length)
        if key not in self.references:
            with self.torch.no_grad():
                embeds, pooled, _ = self.pipe.encode_prompt([prompt], prompt_2=None, max_sequence_length=length)
            self.references[key] = {"prompt_embeds": embeds[0], "pooled_prompt_embeds": pooled[0]}
        return self.references[key]

    def verdict(self, prompts: list[str], length: int, got: dict) -> str:
        """`exact`, `close` or `wrong` for the whole answer (its worst row)."""
        torch = self.torch
        if set(got) != {"prompt_embeds", "pooled_prompt_embeds"} or any(len(t) != len(prompts) for t in got.values()):
            return "wrong"
        worst = "exact"
        for row, prompt in enumerate(prompts):
            want = self.reference(prompt, length)
            if all(got[n][row].dtype == want[n].dtype and torch.equal(got[n][row], want[n]) for n in want):
                continue
            if not all(got[n][row].shape == want[n].shape and torch.allclose(got[n][row], want[n], rtol=0, atol=1e-5)
                       for n in want):
                return "wrong"
            worst = "close"
        return worst


def run(index: int, targets: str, model_dir: str, ready, go, stop_at, results, seed: int) -> None:
    """Client process entry point: load, say so on `ready`, wait for `go`, loop until `stop_at.value` (a shared
    `time.time()`), put one summary on `results`."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    summary = {"client": index, "calls": {}, "latency_ms": {}, "failures": [], "close": 0}
    try:
        _loop(index, targets, model_dir, ready, go, stop_at, random.Random(seed), summary)
    except BaseException as e:  # noqa: BLE001 - the parent must hear about a client that died
        summary["failures"].append(f"client {index} died: {type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}")
        ready.put(index)  # the parent waits for every client before it starts the clock (a repeat is ignored)
    results.put(summary)


def _loop(index, targets, model_dir, ready, go, stop_at, rng, summary) -> None:
    import grpc

    from denoiser_client import RemoteTextEncoder
    from denoiser_client.errors import PayloadError, PromptcastError
    from shared.promptcast.v1 import encoder_pb2 as pb
    from shared.promptcast.v1 import encoder_pb2_grpc as pb_grpc

    checker = Checker(model_dir)
    pool = [f"soak pool prompt {i}: a lighthouse at dawn, oil painting" for i in range(POOL)]
    for prompt in pool:  # every client checks every pool prompt: compute the references before the clock starts
        checker.reference(prompt, SHORT)
    enc = RemoteTextEncoder(targets, timeout=30, retries=6, backoff=0.1)
    hurried = RemoteTextEncoder(targets, timeout=0.01, retries=1)
    raw = [grpc.insecure_channel(t, [("grpc.max_receive_message_length", 8 << 20)]) for t in targets.split(",")]
    ops, weights = list(WEIGHTS), list(WEIGHTS.values())
    ready.put(index)
    go.wait()
    n = 0
    while time.time() < stop_at.value:
        op = rng.choices(ops, weights)[0]
        n += 1
        started = time.perf_counter()
        outcome = "ok"
        try:
            if op == "cancel":
                outcome = _cancel(rng.choice(raw), pb, pb_grpc, grpc, pool, rng)
            else:
                prompts, length, client = _call(op, index, n, pool, rng, enc, hurried)
                if op == "deadline":
                    hurried.timeout = rng.uniform(0.002, 0.03)
                got = client.encode(prompts, max_sequence_length=length)
                outcome = checker.verdict(prompts, length, got)
                if outcome == "close":
                    summary["close"] += 1
                    outcome = "ok"
                elif outcome == "exact":
                    outcome = "ok"
                else:
                    _keep(summary, f"{op}: WRONG embedding for {prompts!r} at {length}")
        except PayloadError as e:  # a torn or inconsistent stream reached the assembler
            outcome = "wrong"
            _keep(summary, f"{op}: torn stream: {e}")
        except PromptcastError as e:
            outcome = f"status:{type(e).__name__}"
            if op != "deadline":
                _keep(summary, f"{op}: {type(e).__name__}: {e}"[:400])
        except Exception as e:  # noqa: BLE001 - counted, never fatal: the soak must see every call end
            outcome = "unexpected"
            _keep(summary, f"{op}: unexpected {type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}")
        calls = summary["calls"].setdefault(op, {})
        calls[outcome] = calls.get(outcome, 0) + 1
        summary["latency_ms"].setdefault(op, []).append(round((time.perf_counter() - started) * 1000, 2))
    enc.close()
    hurried.close()
    for channel in raw:
        channel.close()


def _call(op, index, n, pool, rng, enc, hurried):
    """(prompts, max_sequence_length, client) of one checked call."""
    if op == "hit":
        return [rng.choice(pool)], SHORT, enc
    if op == "miss":
        return [f"soak miss {index}.{n} {uuid.uuid4().hex[:8]}"], SHORT, enc
    if op == "duplicate":
        return [f"soak duplicate of slot {int(time.time() * 2)}"], SHORT, enc
    if op == "multi":
        fresh = f"soak multi {index}.{n} {uuid.uuid4().hex[:8]}"
        prompts = [rng.choice(pool), fresh, rng.choice(pool), fresh]
        rng.shuffle(prompts)
        return prompts, SHORT, enc
    if op == "large":
        return rng.sample(pool, 8), LONG, enc
    return [f"soak deadline {index}.{n} {uuid.uuid4().hex[:8]}"], SHORT, hurried  # "deadline"


def _cancel(channel, pb, pb_grpc, grpc, pool, rng) -> str:
    stream = pb_grpc.TextEncoderStub(channel).Encode(
        pb.EncodeRequest(prompts=rng.sample(pool, 16), max_sequence_length=LONG), timeout=30)
    try:
        for _ in range(rng.randint(1, 3)):
            next(stream)
    except grpc.RpcError as e:  # a replica down, a cut connection: a clear status either way
        return f"status:{e.code().name}"
    except StopIteration:
        return "ok"
    stream.cancel()
    return "cancelled"


def _keep(summary, text: str) -> None:
    if len(summary["failures"]) < MAX_FAILURES_KEPT:
        summary["failures"].append(text)
