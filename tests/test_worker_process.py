"""`promptcast serve --worker process`: each model in a child process of its own. The embeddings equal the in-process
encoder's bit for bit (fixed and variable-length outputs); a batch the child cannot fit is split as in the thread
worker; NaN rows fail their request alone; a child that dies fails its requests as UNAVAILABLE, health turns
NOT_SERVING, a new child loads and health returns to SERVING; a drain stops the child and leaves no shared memory."""

from __future__ import annotations

import os

import grpc
import pytest
import torch

from conftest import assert_same, batcher_stats, wait_for
from denoiser_client import RemoteTextEncoder
from denoiser_client.errors import EncodeError, ServerUnavailable
from encoder_server.families import get_encoder
from encoder_server.server import BackgroundServer, ModelSpec, ServerConfig, health_status
from encoder_server.worker_process import ProcessEncoder

LENGTH = 32


def segments() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("psm_")} if os.path.isdir("/dev/shm") else set()


def rows(out: dict, i: int) -> dict:
    return {name: t[i] for name, t in out.items()}


@pytest.mark.parametrize("family", ["flux1", "z-image"])
def test_a_process_worker_serves_the_in_process_encoders_bytes(tiny_models, family):
    before = segments()
    model = str(tiny_models[family])
    config = ServerConfig([ModelSpec(model, name="tiny")], port=0, cache_dir=None, cache_mem=0, worker="process")
    reference = get_encoder(model, name="tiny")
    with BackgroundServer(config) as server:
        encoder = server.server.service.batchers["tiny"].encoder
        assert isinstance(encoder, ProcessEncoder) and encoder.fingerprint == reference.fingerprint
        child = encoder._child.process
        with RemoteTextEncoder(server.address, timeout=60) as client:
            for prompt in ("a fox in the snow", "a lighthouse at night, oil painting"):
                got = client.encode(prompt, max_sequence_length=LENGTH)
                want = reference.encode([prompt], None, LENGTH)
                for name, value in want.items():
                    if isinstance(value, list):  # variable length: one tensor a prompt, on both sides
                        assert torch.equal(got[name][0], value[0]), name
                    else:
                        assert torch.equal(got[name], value), name
    assert child.poll() is not None  # the drain stopped the child
    assert segments() <= before  # and it unlinked its shared memory


@pytest.fixture
def faulty(tiny_flux1):
    encoder = ProcessEncoder(str(tiny_flux1), name="tiny-flux1", wrap="worker_faults:wrap")
    config = ServerConfig([ModelSpec("unused", name="tiny-flux1")], port=0, cache_dir=None, cache_mem=0,
                          max_wait_ms=50.0)
    with BackgroundServer(config, encoders=[encoder]) as server:
        yield server, encoder
    encoder.close()


def test_oom_splits_and_nan_fails_alone_in_the_child(faulty, tiny_flux1):
    server, _ = faulty
    reference = get_encoder(str(tiny_flux1), name="tiny-flux1")
    prompts = ["OOM a red fox", "OOM a blue fox", "OOM a green fox"]
    with RemoteTextEncoder(server.address, timeout=60) as client:
        got = client.encode(prompts, max_sequence_length=LENGTH)
        for i, prompt in enumerate(prompts):
            assert_same({k: v[i] for k, v in got.items()}, rows(reference.encode([prompt], None, LENGTH), 0))
        assert batcher_stats(server).oom_splits >= 1
        with pytest.raises(EncodeError, match="NaN or Inf in prompt_embeds"):
            client.encode("POISON a fox", max_sequence_length=LENGTH)
        assert client.encode("a fox after the poison", max_sequence_length=LENGTH)["prompt_embeds"].isfinite().all()


def test_a_child_that_dies_fails_its_request_as_unavailable_and_is_replaced(faulty, caplog):
    server, encoder = faulty
    first = encoder._child.process
    with RemoteTextEncoder(server.address, timeout=60) as client:
        # UNAVAILABLE: the client retries (on another replica, if it has one), then says the server is not serving.
        with pytest.raises(ServerUnavailable):
            client.encode("CRASH now", max_sequence_length=LENGTH)
        assert "worker process" in caplog.text and "exited (exit code 7); 1 requests failed" in caplog.text
        with grpc.insecure_channel(server.address) as channel:
            assert wait_for(lambda: encoder._child.process is not first and health_status(channel) == "SERVING",
                            timeout=120)
        assert first.poll() == 7
        assert client.encode("a fox after the crash", max_sequence_length=LENGTH)["prompt_embeds"].shape[1] == LENGTH


def test_serve_worker_process_as_a_real_command(tiny_flux1, server_process):
    server = server_process("--model", str(tiny_flux1), "--cache-dir", "none", "--worker", "process").wait_serving()
    with RemoteTextEncoder(server.address, timeout=60) as client:
        assert client.encode("a fox", max_sequence_length=LENGTH)["prompt_embeds"].shape == (1, LENGTH, 48)
    assert server.stop() == 0
    out = server.output()
    assert "runs in worker process" in out and "drained" in out and "Traceback" not in out, out[-3000:]


def test_closing_a_worker_unmaps_each_segment_once(tiny_flux1, monkeypatch):
    """`close()` and the reply reader, which sees the child exit, both let go of the mapped segments, on two threads:
    neither may close one the other closed (a reader thread dying of EBADF at every shutdown)."""
    import threading
    import time
    from multiprocessing import shared_memory

    errors, closes = [], []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    original = shared_memory.SharedMemory.close

    def slow_close(segment):  # both threads reach the segments while the first is still closing one
        if segment._mmap is not None:  # still mapped (its finalizer calls close again, on a closed one)
            closes.append(segment.name)
            time.sleep(0.3)
        original(segment)

    monkeypatch.setattr(shared_memory.SharedMemory, "close", slow_close)
    for _ in range(2):
        encoder = ProcessEncoder(str(tiny_flux1), name="tiny-flux1")
        encoder.encode(["a fox in the snow"], None, LENGTH)
        assert encoder._segments  # one mapped here
        reader = encoder._child.reader
        encoder.close()
        reader.join(30)
        assert not reader.is_alive() and not encoder._segments
    assert errors == [] and len(closes) == len(set(closes)) == 2


def test_a_dev_shm_too_small_for_a_batch_is_an_error_that_says_what_to_do(monkeypatch):
    """Docker gives a container 64 MiB of /dev/shm: a batch's segment past it would SIGBUS the child as its outputs
    reach an unbacked page. Allocating every page first makes it an error, and leaves nothing behind."""
    import errno

    from encoder_server import worker_child

    made = []
    create = worker_child.shared_memory.SharedMemory

    def recorded(*args, **kwargs):
        made.append(create(*args, **kwargs))
        return made[-1]

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(worker_child.shared_memory, "SharedMemory", recorded)
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(worker_child.SharedMemoryFull, match=r"no room for a 128 MiB batch .*--shm-size 2g.*"
                                                            r"--worker thread") as raised:
        worker_child._allocated_segment(128 << 20)
    assert raised.value.errno == errno.ENOSPC
    assert not os.path.exists(f"/dev/shm/{made[0].name.lstrip('/')}")


def test_a_batch_launched_behind_another_of_its_size_takes_a_spare_segment_not_a_new_one(monkeypatch):
    """Allocating and pinning a batch's shared memory stalls every batch in flight: warm-up, one batch at a time,
    leaves a spare beside each segment it makes, so the pipeline's second batch under load allocates nothing; a
    smaller batch takes the smallest free segment it fits, whatever its size class."""
    import types

    from encoder_server import worker_child

    made = []
    allocate = worker_child._allocated_segment
    monkeypatch.setattr(worker_child, "_allocated_segment", lambda size: made.append(size) or allocate(size))
    worker = worker_child._Worker(types.SimpleNamespace(device=torch.device("cpu")), conn=None)
    try:
        warm = worker.take(5 << 20)  # warm-up's batch: an 8 MiB segment and its spare
        assert made == [8 << 20, 8 << 20]
        worker.give_back(warm.name)
        pool = {segment.name for segment in worker.free}
        assert len(pool) == 2 and warm.name in pool
        first, second = worker.take(5 << 20), worker.take(6 << 20)  # two in flight under load
        assert {first.name, second.name} == pool and made == [8 << 20, 8 << 20] and not worker.free
        worker.give_back(first.name)
        worker.give_back(second.name)
        larger = worker.take(20 << 20)
        assert made[2:] == [32 << 20, 32 << 20]
        small = worker.take(1 << 20)  # an 8 MiB one is free: no new 1 MiB segment
        assert small.size == 8 << 20 and len(made) == 4
        worker.give_back(larger.name)
        worker.give_back(small.name)
    finally:
        for segment in [*worker.used.values(), *worker.free]:
            segment.close()
            segment.unlink()
