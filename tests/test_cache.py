"""The embedding cache: disk entries verified on every read, LRU bounds, restarts, single flight, the
client's local tier, `promptcast encode` exports and `promptcast cache`; damaged entries are misses."""

from __future__ import annotations

import contextlib
import json
import re
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import BackgroundServer, ModelSpec, ServerConfig, assert_same, expected, run_cli
from conftest import batcher_stats as stats
from conftest import cache_tier as tier
from denoiser_client import RemoteTextEncoder
from denoiser_client.errors import ServerUnavailable
from encoder_server.cache import MemoryTier, nbytes
from shared.cache_keys import embedding_key
from shared.disk_cache import CorruptEntry, DiskTier, pack, unpack

MODEL = "tiny-flux1"


@contextlib.contextmanager
def server(tiny_flux1, **config):
    with BackgroundServer(ServerConfig([ModelSpec(str(tiny_flux1), name=MODEL)], port=0, **config)) as s:
        yield s


def entry(seed: int, rows: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"prompt_embeds": torch.randn(rows, 48, generator=g).to(torch.bfloat16),
            "pooled_prompt_embeds": torch.randn(32, generator=g)}


def key(n: int) -> str:
    return embedding_key("f" * 64, 512, f"prompt {n}", None)


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(data[: len(data) - 100])
    elif how == "bit_flip":
        data[-3] ^= 0x10  # inside the tensor bytes: safetensors parses fine, only the checksum can tell
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(b"\x00" * len(data))


# Disk entries on their own.

@pytest.mark.parametrize("how", ["truncated", "bit_flip", "zeroed", "foreign"])
def test_damaged_or_foreign_disk_entry_is_a_logged_miss_and_deleted(tmp_path, how, caplog):
    disk = DiskTier(tmp_path, 1 << 20)
    disk.put(key(1), entry(1))
    assert_same(disk.get(key(1)), entry(1))
    if how == "foreign":  # a valid entry of another key, copied under this one
        disk.put(key(2), entry(2))
        disk.path(key(1)).write_bytes(disk.path(key(2)).read_bytes())
    else:
        damage(disk.path(key(1)), how)
    assert disk.get(key(1)) is None
    assert not disk.path(key(1)).exists() and disk.corrupt == 1
    assert "damaged" in caplog.text and key(1) in caplog.text
    disk.put(key(1), entry(1))  # recomputed and rewritten
    assert_same(disk.get(key(1)), entry(1))


def test_unpack_checks_key_and_checksums():
    data = pack(key(1), entry(1))
    assert_same(unpack(key(1), data), entry(1))
    with pytest.raises(CorruptEntry, match="another model"):
        unpack(key(2), data)
    with pytest.raises(CorruptEntry):
        unpack(key(1), data[:-1])
    with pytest.raises(CorruptEntry, match="not a promptcast cache entry"):
        unpack(key(1), b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")


def test_memory_and_disk_eviction_keep_their_bounds_and_keep_recent_entries(tmp_path):
    size = nbytes(entry(0))
    memory = MemoryTier(3 * size + size // 2)
    file_size = len(pack(key(0), entry(0)))
    disk = DiskTier(tmp_path, 3 * file_size + file_size // 2)
    for n in range(10):
        for t in (memory, disk):
            t.put(key(n), entry(n))
            t.get(key(0))  # keep touching the first: least recently used is not least recently written
        assert memory.bytes <= memory.max_bytes
        on_disk = sum(p.stat().st_size for p in tmp_path.rglob("*.safetensors"))
        assert on_disk == disk.bytes <= disk.max_bytes
    for t in (memory, disk):
        assert len(t) == 3 and t.get(key(0)) is not None and t.get(key(9)) is not None and t.get(key(5)) is None
    # A restart with a smaller bound scans the folder and evicts the least recently used.
    smaller = DiskTier(tmp_path, 2 * file_size)
    assert len(smaller) == 2 and smaller.bytes <= smaller.max_bytes and smaller.get(key(0)) is not None


# The server's tiers.

def test_key_covers_model_dtype_length_and_prompt_2(tiny_flux1, tmp_path):
    from encoder_server.families import get_encoder
    from promptcast.tiny_models import make_tiny_model

    other = make_tiny_model(tmp_path / "other", "flux1", seed=1)
    fingerprints = {get_encoder(str(tiny_flux1)).fingerprint, get_encoder(str(other)).fingerprint,
                    get_encoder(str(tiny_flux1), dtype=torch.bfloat16).fingerprint}
    assert len(fingerprints) == 3
    fp = next(iter(fingerprints))
    keys = {embedding_key(fp, 512, "a cat", None), embedding_key(fp, 256, "a cat", None),
            embedding_key(fp, 512, "a cat", "a cat"), embedding_key(fp, 512, "a cat ", None)}
    assert len(keys) == 4 and all(re.fullmatch(r"[0-9a-f]{64}", k) for k in keys)


def test_restart_with_same_cache_dir_serves_from_disk(tiny_flux1, tmp_path, server_process):
    args = ["--model", f"{MODEL}={tiny_flux1}", "--cache-dir", str(tmp_path / "cache"), "--cache-mem", "64MiB"]
    first = server_process(*args).wait_serving()
    with RemoteTextEncoder(first.address, timeout=60) as client:
        before, info = client.encode("a fox at the restart", max_sequence_length=16, with_info=True)
    assert info.cache_status == ["miss"]
    assert first.stop() == 0
    second = server_process(*args).wait_serving()
    with RemoteTextEncoder(second.address, timeout=60) as client:
        after, info = client.encode("a fox at the restart", max_sequence_length=16, with_info=True)
        _, again = client.encode("a fox at the restart", max_sequence_length=16, with_info=True)
    assert info.cache_status == ["disk"] and again.cache_status == ["memory"]
    assert_same(after, before)


@pytest.mark.parametrize("how", ["truncated", "bit_flip"])
def test_damaged_disk_file_is_a_miss_recomputed_correctly_and_rewritten(tiny_flux1, tmp_path, reference, how):
    prompt = f"a heron in the rain, {how}"
    with server(tiny_flux1, cache_mem=0, cache_dir=str(tmp_path)) as s, \
            RemoteTextEncoder(s.address, timeout=60) as client:
        _, first = client.encode(prompt, max_sequence_length=16, with_info=True)
        s.server.service.cache.flush()  # disk is written in the background
        path = tier(s, "disk").path(first.cache_keys[0])
        assert first.cache_status == ["miss"] and path.is_file()
        damage(path, how)
        got, info = client.encode(prompt, max_sequence_length=16, with_info=True)
        assert info.cache_status == ["miss"] and tier(s, "disk").corrupt == 1
        assert_same(got, expected(reference, prompt, 16))
        s.server.service.cache.flush()
        unpack(first.cache_keys[0], path.read_bytes())  # rewritten whole
        again, info = client.encode(prompt, max_sequence_length=16, with_info=True)
        assert info.cache_status == ["disk"]
        assert_same(again, got)


def test_server_tiers_stay_under_their_bounds(tiny_flux1, tmp_path):
    one = 16 * 48 * 4 + 32 * 4  # fp32 prompt_embeds (16, 48) + pooled (32,); a file adds a ~550-byte header
    with server(tiny_flux1, cache_mem=3 * one, cache_dir=str(tmp_path), cache_disk_max=4 * one + 4 * 600) as s, \
            RemoteTextEncoder(s.address, timeout=60) as client:
        client.encode([f"prompt number {n}" for n in range(8)], max_sequence_length=16)
        s.server.service.cache.flush()  # disk is written in the background
        memory, disk = tier(s, "memory"), tier(s, "disk")
        assert 0 < memory.bytes <= memory.max_bytes and len(memory) == 3
        on_disk = sum(p.stat().st_size for p in tmp_path.rglob("*.safetensors"))
        assert 0 < on_disk == disk.bytes <= disk.max_bytes and len(disk) == 4


def test_32_concurrent_identical_requests_encode_once(tiny_flux1, tmp_path):
    # A long batching window keeps the one encode open while the other 31 requests arrive.
    with server(tiny_flux1, cache_dir=str(tmp_path), max_wait_ms=400) as s, \
            RemoteTextEncoder(s.address, timeout=60) as client:
        before = (stats(s).encodes, stats(s).prompts)
        barrier, results = threading.Barrier(32), [None] * 32

        def call(i):
            barrier.wait()
            results[i] = client.encode("thirty-two foxes at once", max_sequence_length=16, with_info=True)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert (stats(s).encodes - before[0], stats(s).prompts - before[1]) == (1, 1)
        statuses = [info.cache_status[0] for _, info in results]
        assert statuses.count("miss") >= 2, statuses  # they overlapped: several waited on the one encode
        for tensors, _ in results[1:]:
            assert_same(tensors, results[0][0])


# The client's tier.

def test_client_cache_dir_serves_repeats_locally_without_any_rpc(tiny_flux1, tmp_path, reference):
    s = server(tiny_flux1, cache_dir=None)
    background = s.__enter__()
    client = RemoteTextEncoder(background.address, timeout=10, retries=1, cache_dir=tmp_path / "node")
    try:
        first, info = client.encode(["a local fox", "a local owl"], max_sequence_length=16, with_info=True)
        assert info.cache_status == ["miss", "miss"]
    finally:
        s.__exit__(None, None, None)  # the server is gone: only the node's disk can answer now
    second, info = client.encode(["a local fox", "a local owl"], max_sequence_length=16, with_info=True)
    assert info.cache_status == ["local", "local"] and info.bytes_received == 0 and info.attempts == 0
    assert_same(second, first)
    assert_same({k: v[:1] for k, v in second.items()}, expected(reference, "a local fox", 16))
    with pytest.raises(ServerUnavailable):  # proof that nothing answered over the network
        client.encode("a prompt never seen", max_sequence_length=16)
    client.close()


def test_generate_cache_dir_reads_the_repeated_prompt_from_the_node(tiny_flux1, flux1_server, tmp_path):
    from promptcast.cli import app

    args = ["generate", "--encoder", flux1_server.address, "--model", str(tiny_flux1), "--prompt", "a node-cached fox",
            "--steps", "1", "--width", "32", "--height", "32", "--max-sequence-length", "16",
            "--cache-dir", str(tmp_path / "node")]
    first = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "1.png")])
    second = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "2.png")])
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    assert "cache local" not in first.stdout and "cache local" in second.stdout
    assert (tmp_path / "1.png").read_bytes() == (tmp_path / "2.png").read_bytes()


# `promptcast encode` and `promptcast cache`.

def test_encode_export_loads_in_plain_diffusers_and_gives_the_split_image(tiny_flux1, flux1_server, reference,
                                                                          client, tmp_path):
    from denoiser_client.pipeline import load_denoiser, remote_embeddings

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join([
        json.dumps({"prompt": "a red fox in the snow"}),
        "{not json",
        json.dumps({"conversations": [{"role": "user", "content": "an old turn"},
                                      {"role": "assistant", "content": "ok"},
                                      {"role": "user", "content": "a blue owl at night"}]}),
        "",
        json.dumps({"width": 64}),
    ]) + "\n")
    result = run_cli("encode", jobs, "--prompt", "a prompt from the command line", "--encoder", flux1_server.address,
                     "--out", tmp_path / "out", "--max-sequence-length", "32")
    assert result.returncode == 1, result.stderr  # two bad lines, reported by number; the others exported
    assert "line 2: not JSON" in result.stderr and "line 5: no prompt" in result.stderr
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert sorted(index) == ["a blue owl at night", "a prompt from the command line", "a red fox in the snow"]
    lines = [json.loads(line) for line in (tmp_path / "out" / "index.jsonl").read_text().splitlines()]
    assert [r["line"] for r in lines] == [0, 1, 3]  # 0: --prompt

    tensors = load_file(tmp_path / "out" / index["a red fox in the snow"])
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"prompt_embeds": (1, 32, 48),
                                                               "pooled_prompt_embeds": (1, 32)}
    call = dict(num_inference_steps=2, width=64, height=64, guidance_scale=3.5, output_type="np")
    plain = reference(**tensors, generator=torch.Generator().manual_seed(5), **call).images
    pipe, _ = load_denoiser(str(tiny_flux1))
    split = pipe(**remote_embeddings(client, MODEL, "a red fox in the snow", max_sequence_length=32),
                 generator=torch.Generator().manual_seed(5), **call).images
    assert plain.shape == (1, 64, 64, 3) and (plain == split).all()


def test_cache_stats_verify_clear(tmp_path):
    from promptcast.cli import app

    disk = DiskTier(tmp_path, 1 << 30)
    for n in range(3):
        disk.put(key(n), entry(n))
    runner = CliRunner()
    result = runner.invoke(app, ["cache", "stats", "--cache-dir", str(tmp_path), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["entries"] == 3
    assert runner.invoke(app, ["cache", "verify", "--cache-dir", str(tmp_path)]).exit_code == 0
    damage(disk.path(key(1)), "bit_flip")
    result = runner.invoke(app, ["cache", "verify", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 1 and f"BAD {disk.path(key(1))}" in result.stdout and "checksum" in result.stdout
    assert "3 entries checked, 1 bad" in result.stdout
    assert runner.invoke(app, ["cache", "verify", "--cache-dir", str(tmp_path), "--delete"]).exit_code == 1
    assert runner.invoke(app, ["cache", "verify", "--cache-dir", str(tmp_path)]).exit_code == 0
    result = runner.invoke(app, ["cache", "clear", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 0 and "removed 2 files" in result.stdout
    assert not list(tmp_path.rglob("*.safetensors"))
    result = runner.invoke(app, ["cache", "stats", "--cache-dir", str(tmp_path / "missing")])
    assert result.exit_code != 0
