"""`promptcast batch`: job files, bad lines, crash safety (kill -9), resume, shards, prefetch, VRAM options."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import copy_model, free_port, run_cli
from denoiser_client import RemoteTextEncoder
from denoiser_client.batch import BatchOptions, run_batch
from denoiser_client.embeddings import RemoteEmbedder
from denoiser_client.errors import InvalidArgument
from denoiser_client.jobs import JobDefaults, read_job_file
from denoiser_client.pipeline import load_denoiser
from denoiser_client.vram import VramOptions
from encoder_server.families import get_encoder
from encoder_server.server import BackgroundServer, ModelSpec, ServerConfig

MIXED = [
    {"conversations": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "first turn"},
                       {"role": "assistant", "content": "ok"}, {"role": "user", "content": "a red fox in snow"}],
     "id": "fox"},
    {"prompt": "a cat on a mat", "seed": 3, "width": 64, "height": 48, "extra": {"kept": True}},
    "{this is not json",
    {"prompt": "a dog", "width": 60},
    {"id": "no-prompt"},
    {"prompt": "a bird", "seed": "seven"},
    {"prompt": {"scene": "a lake at dawn", "style": "watercolor"}, "steps": 1},
    {"prompt": "a red fox in snow", "id": "fox-again", "seed": 5},
]
GOOD_LINES, BAD_LINES = {1, 2, 7, 8}, {3: "malformed JSON", 4: "width=60", 5: "no 'prompt'", 6: "'seed'"}


def write_job(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def results(out_dir) -> list[dict]:
    path = out_dir / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def pipe(tiny_flux1):
    pipe, _ = load_denoiser(str(tiny_flux1))
    pipe.set_progress_bar_config(disable=True)
    return pipe


DEFAULTS = dict(steps=2, width=32, height=32, max_sequence_length=16)


def batch_args(job, out_dir, server, *extra):
    return ["batch", job, "--encoder", server.address, "--model", server.model_source, "--out-dir", out_dir,
            "--steps", "2", "--width", "32", "--height", "32", "--max-sequence-length", "16", "--device", "cpu",
            *extra]


@pytest.fixture(scope="module")
def server(flux1_server, tiny_flux1):
    flux1_server.model_source = str(tiny_flux1)
    return flux1_server


def test_mixed_job_file_through_the_cli(server, tmp_path):
    job = write_job(tmp_path / "job.jsonl", MIXED)
    out = tmp_path / "out"
    first = run_cli(*batch_args(job, out, server))
    assert first.returncode == 1, first.stderr  # some lines failed: the exit code says so
    report = first.stdout + first.stderr
    for line, reason in BAD_LINES.items():
        assert f"failed line {line}: " in report and reason in report, (line, report)
    assert "done 4, skipped 0, failed 4" in first.stdout
    rows = results(out)
    assert {row["line"] for row in rows} == GOOD_LINES
    by_line = {row["line"]: row for row in rows}
    assert by_line[1]["params"]["prompt"] == "a red fox in snow"  # DataFlow: the last user turn
    assert by_line[2]["extra"] == {"kept": True} and by_line[2]["params"]["width"] == 64  # line fields win
    assert by_line[2]["params"]["height"] == 48 and by_line[2]["params"]["seed"] == 3
    assert by_line[7]["params"]["prompt"] == '{"scene":"a lake at dawn","style":"watercolor"}'
    assert by_line[7]["params"]["steps"] == 1 and by_line[1]["params"]["steps"] == 2  # CLI options are defaults
    for row in rows:
        (image,) = row["images"]
        assert not os.path.isabs(image)
        with Image.open(out / image) as im:
            assert im.size == (row["params"]["width"], row["params"]["height"])
    # Same command again: everything finished is skipped, the bad lines are still reported.
    again = run_cli(*batch_args(job, out, server))
    assert again.returncode == 1 and "done 0, skipped 4, failed 4" in again.stdout
    assert len(results(out)) == 4


def test_strict_stops_at_the_first_bad_line(server, tmp_path):
    job = write_job(tmp_path / "job.jsonl", MIXED)
    done = run_cli(*batch_args(job, tmp_path / "out", server, "--strict"))
    assert done.returncode != 0 and ":3: malformed JSON" in done.stderr and "--strict" in done.stderr
    assert results(tmp_path / "out") == []


def test_kill_9_mid_run_then_rerun_makes_every_item_exactly_once(server, tmp_path):
    items = [{"prompt": f"a slow picture number {i}", "id": f"item{i}"} for i in range(5)]
    job = write_job(tmp_path / "job.jsonl", items)
    out = tmp_path / "out"
    args = batch_args(job, out, server)
    args[args.index("--steps") + 1] = "8"
    for flag in ("--width", "--height"):
        args[args.index(flag) + 1] = "128"
    proc = subprocess.Popen([sys.executable, "-m", "promptcast", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not results(out) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert results(out), "no result line appeared"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    finished = len(results(out))
    assert 1 <= finished < len(items), "the kill must land mid-run (make items slower)"
    with open(out / "results.jsonl", "a") as f:  # and a line torn by the crash, as a kill mid-write leaves it
        f.write('{"prompt": "a slow picture number 4", "images": ["images/it')
    rerun = run_cli(*args)
    assert rerun.returncode == 0, rerun.stderr
    rows = results(out)
    assert sorted(row["id"] for row in rows) == [f"item{i}" for i in range(5)]  # each exactly once
    assert len({row["key"] for row in rows}) == 5
    files = sorted(os.listdir(out / "images"))
    assert files == sorted(os.path.basename(row["images"][0]) for row in rows)  # no stray temp files
    for name in files:
        with Image.open(out / "images" / name) as im:
            im.load()  # a partial PNG fails here
            assert im.size == (128, 128)


def test_shards_cover_the_file_exactly_once(pipe, client, tmp_path):
    lines = [{"prompt": f"shard prompt {i}", "seed": i} for i in range(10)] + ["not json"]
    job = write_job(tmp_path / "job.jsonl", lines)
    embedder = RemoteEmbedder(client, "tiny-flux1", 16)
    keys, bad = [], []
    for index in range(3):
        summary = run_batch(job, tmp_path / f"out{index}", pipe=pipe, embedder=embedder,
                            defaults=JobDefaults(**DEFAULTS),
                            options=BatchOptions(shard=(index, 3), max_sequence_length=16, progress=False))
        keys += [row["key"] for row in results(tmp_path / f"out{index}")]
        bad += [line for line, _ in summary.failed]
    everything, _ = read_job_file(job, JobDefaults(**DEFAULTS))
    assert sorted(keys) == sorted(item.key for item in everything) and len(keys) == 10  # merged: each once
    assert bad == [11]  # the bad line is reported by exactly one shard


def test_duplicates_are_encoded_once_and_batches_denoise_together(pipe, client, tmp_path):
    lines = [{"prompt": "the same prompt", "seed": s} for s in range(4)] + [{"prompt": "another prompt"}]
    job = write_job(tmp_path / "job.jsonl", lines)

    class CountingEmbedder(RemoteEmbedder):
        texts: list = []

        def encode(self, texts):
            self.texts += texts
            return super().encode(texts)

    embedder = CountingEmbedder(client, "tiny-flux1", 16)
    batch_sizes = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: batch_sizes.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    try:
        summary = run_batch(job, tmp_path / "out", pipe=pipe, embedder=embedder, defaults=JobDefaults(**DEFAULTS),
                            options=BatchOptions(batch_size=4, max_sequence_length=16, progress=False))
    finally:
        hook.remove()
    assert summary.done == 5 and summary.ok
    assert sorted(embedder.texts) == ["another prompt", "the same prompt"]  # each distinct text once
    assert summary.cache_hits >= 3
    assert sorted(set(batch_sizes)) == [1, 4]  # the four same-parameter items went through in one call
    images = [np.asarray(Image.open(tmp_path / "out" / row["images"][0])) for row in results(tmp_path / "out")]
    assert not np.array_equal(images[0], images[1])  # their own seeds


def test_encoder_unreachable_stops_the_job_once_and_says_how_to_resume(pipe, client, tmp_path):
    job = write_job(tmp_path / "job.jsonl", [{"prompt": f"unreachable {i}", "batch_size": 1} for i in range(3)])
    dead = RemoteTextEncoder(f"127.0.0.1:{free_port()}", retries=2, backoff=0.01, timeout=5)
    options = BatchOptions(max_sequence_length=16, progress=False, prefetch=0)
    calls = []

    class Counting(RemoteEmbedder):
        def encode(self, texts):
            calls.append(texts)
            return super().encode(texts)

    summary = run_batch(job, tmp_path / "out", pipe=pipe, embedder=Counting(dead, "tiny-flux1", 16),
                        defaults=JobDefaults(**DEFAULTS), options=options)
    dead.close()
    assert summary.done == 0 and summary.failed == [] and summary.stopped and not summary.ok
    assert len(calls) == 1  # the client's retries are spent once, not once per remaining item
    report = "\n".join(summary.lines())
    assert "no encoder server answered" in report and "3 image(s) not made: rerun the same command to resume" in report
    assert results(tmp_path / "out") == []
    summary = run_batch(job, tmp_path / "out", pipe=pipe, embedder=RemoteEmbedder(client, "tiny-flux1", 16),
                        defaults=JobDefaults(**DEFAULTS), options=options)
    assert summary.done == 3 and summary.ok and len(results(tmp_path / "out")) == 3


class SlowEncoder:
    """A real encoder whose every call first sleeps: an encoder server that is slow to answer."""

    def __init__(self, inner, delay: float):
        self._inner, self.delay = inner, delay

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def encode(self, *args, **kwargs):
        time.sleep(self.delay)
        return self._inner.encode(*args, **kwargs)


def test_prefetch_overlaps_encoding_with_denoising(pipe, tiny_flux1, tmp_path):
    n, encode_s, denoise_s, steps = 6, 0.3, 0.3, 2
    slow = SlowEncoder(get_encoder(str(tiny_flux1), name="slow"), encode_s)
    # A deliberately slow denoiser: each transformer step sleeps, so one item takes denoise_s more.
    hook = pipe.transformer.register_forward_hook(lambda *a: time.sleep(denoise_s / steps))
    config = ServerConfig([ModelSpec(str(tiny_flux1), name="slow")], port=0, cache_dir=None, max_wait_ms=0)
    try:
        with BackgroundServer(config, encoders=[slow]) as server, RemoteTextEncoder(server.address) as enc:
            def timed(prefetch, tag):
                job = write_job(tmp_path / f"{tag}.jsonl", [{"prompt": f"{tag} prompt {i}"} for i in range(n)])
                start = time.perf_counter()
                summary = run_batch(job, tmp_path / tag, pipe=pipe, embedder=RemoteEmbedder(enc, "slow", 16),
                                    defaults=JobDefaults(**DEFAULTS),
                                    options=BatchOptions(prefetch=prefetch, max_sequence_length=16, progress=False))
                assert summary.done == n
                return time.perf_counter() - start

            sequential, overlapped = timed(0, "sequential"), timed(3, "prefetched")
    finally:
        hook.remove()
    total = n * (encode_s + denoise_s)  # no overlap
    best = max(n * encode_s, n * denoise_s) + min(encode_s, denoise_s)  # full overlap, plus the first item's wait
    assert sequential >= 0.95 * total, (sequential, total)  # the control: without prefetch it is the sum
    assert best * 0.95 <= overlapped < best + 0.4 * (total - best), (overlapped, best, total)


def test_quantize_nf4_on_cpu_is_refused_before_loading(tmp_path, server):
    with pytest.raises(InvalidArgument, match="needs a CUDA device"):
        load_denoiser(str(tmp_path / "no-model-here"), vram=VramOptions(quantize="nf4"))
    job = write_job(tmp_path / "job.jsonl", [{"prompt": "x"}])
    done = run_cli(*batch_args(job, tmp_path / "out", server, "--quantize", "nf4"))
    assert done.returncode == 1 and "--quantize nf4 uses bitsandbytes, which needs a CUDA device" in done.stderr
    with pytest.raises(InvalidArgument, match="--offload model moves weights"):
        VramOptions(offload="model").check("cpu")


def test_quantize_fp8_on_cpu_stores_float8_and_never_loads_text_encoders(tiny_flux1, client, tmp_path):
    no_text = copy_model(tiny_flux1, tmp_path / "m", drop=("text_encoder", "text_encoder_2", "tokenizer",
                                                            "tokenizer_2"))
    fp8, _ = load_denoiser(str(no_text), vram=VramOptions(quantize="fp8", vae_tiling=True))
    base, _ = load_denoiser(str(no_text))
    assert fp8.text_encoder is None and fp8.text_encoder_2 is None
    weights = dict(fp8.transformer.named_parameters())
    stored = {weights[name].dtype for name in weights if name.endswith(("to_q.weight", "norm1.linear.weight"))}
    assert stored == {torch.float8_e4m3fn}  # attention and AdaLN modulation Linears: float8
    assert weights["norm_out.linear.weight"].dtype == weights["x_embedder.weight"].dtype == torch.float32
    embeds = client.encode(["an fp8 fox"], "tiny-flux1", max_sequence_length=16)
    call = dict(num_inference_steps=2, width=32, height=32, output_type="np")
    got = fp8(**embeds, generator=torch.Generator().manual_seed(0), **call).images
    want = base(**embeds, generator=torch.Generator().manual_seed(0), **call).images
    assert np.isfinite(got).all() and got.shape == want.shape
    assert np.abs(got - want).mean() < 0.1  # float8 weights: close to the fp32 image, not equal


def test_a_flux2_klein_job_with_a_structured_prompt(tiny_models, tmp_path):
    model = tiny_models["flux2-klein"]  # read only: the server and the node load it
    structured = {"scene": "a lake at dawn", "subjects": [{"type": "heron"}], "style": "ink"}
    job = write_job(tmp_path / "job.jsonl", [{"prompt": structured, "id": "heron"}, {"prompt": "a plain fox"}])
    pipe, _ = load_denoiser(str(model))
    pipe.set_progress_bar_config(disable=True)
    config = ServerConfig([ModelSpec(str(model), name="klein")], port=0, cache_dir=None)
    with BackgroundServer(config) as server, RemoteTextEncoder(server.address) as enc:
        summary = run_batch(job, tmp_path / "out", pipe=pipe, embedder=RemoteEmbedder(enc, "klein", 64),
                            defaults=JobDefaults(steps=2, width=32, height=32, max_sequence_length=64),
                            options=BatchOptions(max_sequence_length=64, progress=False))
    assert summary.done == 2 and summary.ok
    rows = {row["line"]: row for row in results(tmp_path / "out")}
    assert rows[1]["params"]["prompt"] == json.dumps(structured, separators=(",", ":"), ensure_ascii=False)
    assert rows[1]["prompt"] == structured  # the input object is echoed as given
