"""Memory hits published in the server's own shared memory: the same bytes as the stream, read in place by every
client on the host; a caller's writes reach neither the server nor the next answer; a slab that is gone, full or
refused costs a copy, never a wrong answer."""

from __future__ import annotations

import logging
import os
import uuid

import grpc
import numpy as np
import pytest
import torch

from conftest import assert_same, wait_for
from denoiser_client import RemoteTextEncoder
from encoder_server.server import BackgroundServer, ModelSpec, ServerConfig
from shared import published_memory as published, shared_memory as same_host
from shared.promptcast.v1 import encoder_pb2 as pb
from shared.promptcast.v1 import encoder_pb2_grpc as pb_grpc

pytestmark = pytest.mark.skipif(not same_host.supported(), reason="POSIX shared memory in /dev/shm (Linux)")


@pytest.fixture
def server(tiny_flux1):
    config = ServerConfig([ModelSpec(str(tiny_flux1), name="tiny-flux1")], port=0, cache_dir=None)
    with BackgroundServer(config) as background:
        yield background


def publisher(server) -> published.Publisher:
    return server.server.servicer.published


def in_a_slab(tensor: torch.Tensor) -> bool:
    """Whether the tensor's bytes lie in a server slab this process has mapped."""
    for mapped in published.SLABS.mapped.values():
        start = np.frombuffer(mapped, np.uint8).ctypes.data
        if start <= tensor.data_ptr() < start + len(mapped):
            return True
    return False


def published_hit(server, prompt: str):
    """Encode `prompt` until its memory hit is published (the first hit makes the slab in the background)."""
    with RemoteTextEncoder(server.address, timeout=60) as enc:
        enc.encode(prompt, max_sequence_length=16)  # the miss
        enc.encode(prompt, max_sequence_length=16)  # the first hit: asks for a slab
        assert wait_for(lambda: publisher(server).slabs)
        enc.encode(prompt, max_sequence_length=16)  # published now
        assert len(publisher(server).index) == 1


def test_a_memory_hit_is_published_once_and_every_same_host_client_reads_it_in_place(server):
    prompt = f"a published fox {uuid.uuid4()}"
    published_hit(server, prompt)
    slab = publisher(server).slabs[0]
    writes = []
    real = published.Publisher.publish
    published.Publisher.publish = lambda self, *args: writes.append(args) or real(self, *args)
    try:
        with RemoteTextEncoder(server.address, timeout=60) as near, \
                RemoteTextEncoder(server.address, timeout=60, shared_memory=False) as far:
            got, info = near.encode(prompt, max_sequence_length=16, with_info=True)
            assert info.cache_status == ["memory"] and info.shared_memory == 1
            assert_same(got, far.encode(prompt, max_sequence_length=16))
            assert all(in_a_slab(t) for t in got.values())  # no copy on the client's side either
            several = near.encode([prompt, prompt], max_sequence_length=16)  # two prompts: copied out of the slab
            assert not any(in_a_slab(t) for t in several.values())
            assert_same({k: v[:1] for k, v in several.items()}, got)
    finally:
        published.Publisher.publish = real
    assert writes == []  # nothing written for it again
    info = os.stat(os.path.join(same_host.SHM_DIR, slab.name))
    assert info.st_uid == os.getuid() and info.st_mode & 0o077 == 0  # this user's alone


def test_a_callers_writes_to_a_lent_tensor_reach_neither_the_server_nor_the_next_answer(server):
    prompt = f"a written fox {uuid.uuid4()}"
    published_hit(server, prompt)
    with RemoteTextEncoder(server.address, timeout=60) as near, \
            RemoteTextEncoder(server.address, timeout=60, shared_memory=False) as far:
        reference = far.encode(prompt, max_sequence_length=16)
        first = near.encode(prompt, max_sequence_length=16)
        second = near.encode(prompt, max_sequence_length=16)  # while `first` is alive: its own bytes
        first["prompt_embeds"].add_(1.0)  # copy-on-write: this process's page only
        assert_same(second, reference)
        third = near.encode(prompt, max_sequence_length=16)  # `first`'s changed bytes fail their check: mapped anew
        assert_same(third, reference)
        assert torch.equal(first["prompt_embeds"], reference["prompt_embeds"] + 1.0)
        del first, second
        assert_same(near.encode(prompt, max_sequence_length=16), reference)
        assert_same(far.encode(prompt, max_sequence_length=16), reference)  # the server's bytes: as they were


def test_an_old_client_that_does_not_read_slabs_gets_its_bytes_copied_into_its_arena(server):
    prompt = f"an old fox {uuid.uuid4()}"
    published_hit(server, prompt)
    arena = same_host.Arena(1 << 20)
    try:
        request = pb.EncodeRequest(prompts=[prompt], max_sequence_length=16, shared_memory=arena.target())
        assert not request.shared_memory.reads_published
        with grpc.insecure_channel(server.address) as channel:
            messages = list(pb_grpc.TextEncoderStub(channel).Encode(request, timeout=30))
        where = messages[0].header.in_shared_memory
        assert len(messages) == 1 and where.name == "" and where.offset == same_host.DATA_START
        request.shared_memory.reads_published = True
        with grpc.insecure_channel(server.address) as channel:
            messages = list(pb_grpc.TextEncoderStub(channel).Encode(request, timeout=30))
        assert messages[0].header.in_shared_memory.name == publisher(server).slabs[0].name
    finally:
        arena.close()


def test_a_slab_unlinked_by_something_else_is_dropped_and_the_entry_answered_anew(server, caplog):
    prompt = f"an unlinked fox {uuid.uuid4()}"
    published_hit(server, prompt)
    slab = publisher(server).slabs[0]
    os.unlink(os.path.join(same_host.SHM_DIR, slab.name))  # a cleanup of /dev/shm, say
    published.SLABS.mapped.clear()  # this process had mapped it: as a client that never had
    with RemoteTextEncoder(server.address, timeout=60) as near, \
            RemoteTextEncoder(server.address, timeout=60, shared_memory=False) as far:
        with caplog.at_level(logging.WARNING, logger="shared.published_memory"):
            got, info = near.encode(prompt, max_sequence_length=16, with_info=True)
        assert info.shared_memory == 1 and info.attempts == 1
        assert_same(got, far.encode(prompt, max_sequence_length=16))
    assert "unlinked by something else" in caplog.text and slab not in publisher(server).slabs


def test_a_slab_gone_before_the_client_maps_it_is_asked_for_again(server, monkeypatch):
    prompt = f"a vanishing fox {uuid.uuid4()}"
    published_hit(server, prompt)
    published.SLABS.mapped.clear()
    real, calls = published._map, []

    def gone_once(name):
        calls.append(name)
        if len(calls) == 1:
            raise published.SlabGone(f"slab {name} is gone")
        return real(name)

    monkeypatch.setattr(published, "_map", gone_once)
    with RemoteTextEncoder(server.address, timeout=60) as near, \
            RemoteTextEncoder(server.address, timeout=60, shared_memory=False) as far:
        got, info = near.encode(prompt, max_sequence_length=16, with_info=True)
        assert info.attempts == 2 and len(calls) == 2
        assert_same(got, far.encode(prompt, max_sequence_length=16))


def test_no_room_for_a_slab_is_one_warning_and_copies(tiny_flux1, monkeypatch, caplog):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(published, "allocated", full)
    config = ServerConfig([ModelSpec(str(tiny_flux1), name="tiny-flux1")], port=0, cache_dir=None)
    prompts = [f"a crowded fox {i} {uuid.uuid4()}" for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="shared.published_memory"), BackgroundServer(config) as server, \
            RemoteTextEncoder(server.address, timeout=60) as near, \
            RemoteTextEncoder(server.address, timeout=60, shared_memory=False) as far:
        for _ in range(3):
            got, info = near.encode(prompts, max_sequence_length=16, with_info=True)
            assert info.shared_memory == 3
            assert_same(got, far.encode(prompts, max_sequence_length=16))
        assert not publisher(server).slabs
    assert caplog.text.count("no room in /dev/shm for a") == 1


def test_an_entry_encoded_again_with_other_bytes_is_published_anew_never_answered_from_the_old(server):
    """One key, two versions: encoded again in another batch, or by another replica through Redis, an entry may
    differ in its last bits. The slab holds the version the header's checksums describe, or none."""
    import asyncio

    from shared.tensor_codec import pack_tensors

    prompt = f"a re-encoded fox {uuid.uuid4()}"
    published_hit(server, prompt)
    with RemoteTextEncoder(server.address, timeout=60, shared_memory=False) as far:
        first, info = far.encode(prompt, max_sequence_length=16, with_info=True)
    again = {name: t[0].clone() for name, t in first.items()}
    again["pooled_prompt_embeds"][0] += 1e-6  # the last bits of a re-encode
    cache = server.server.service.cache
    asyncio.run_coroutine_threadsafe(asyncio.to_thread(cache.put, info.cache_keys[0], again, pack_tensors(again)),
                                     server.loop).result(10)
    with RemoteTextEncoder(server.address, timeout=60) as near:
        got = near.encode(prompt, max_sequence_length=16)
        assert_same(got, {name: t[None] for name, t in again.items()})
        assert all(in_a_slab(t) for t in got.values())  # the new version, published by that call
        assert len(publisher(server).index) == 1
        del got
        assert_same(near.encode(prompt, max_sequence_length=16), {name: t[None] for name, t in again.items()})


def test_cache_shm_0_publishes_nothing(tiny_flux1):
    config = ServerConfig([ModelSpec(str(tiny_flux1), name="tiny-flux1")], port=0, cache_dir=None, cache_shm=0)
    with BackgroundServer(config) as server:
        assert server.server.servicer.published is None


def test_the_publisher_unlinks_only_slabs_idle_long_enough_and_keeps_within_its_bytes():
    made, V = [], ("specs",)

    def fill(pub: published.Publisher, key: str, nbytes: int):
        reservation = pub.reserve(key, V, nbytes)
        if reservation is None:  # no room: a new slab (made at once here, with no executor), then room
            reservation = pub.reserve(key, V, nbytes)
        if reservation is None:
            return None
        made.append(reservation.slab.name)
        return pub.publish(reservation, [np.full(nbytes, len(made), np.uint8)])

    pub = published.Publisher(max_bytes=2 << 20, slab_bytes=1 << 20, idle_seconds=3600)
    try:
        for i in range(4):  # two 512 KiB entries (page-aligned) a slab
            assert fill(pub, f"k{i}", 512 << 10) is not None
        assert len(pub.slabs) == 2 and pub.held_bytes == 2 << 20
        assert fill(pub, "k4", 512 << 10) is None  # full, and no slab idle long enough: copies instead
        assert pub.find("k0", V) is not None and len(pub.slabs) == 2
        pub.idle_seconds = 0  # now every slab is idle enough: the oldest goes, and its entries with it
        oldest = pub.slabs[0]
        assert fill(pub, "k4", 512 << 10) is not None
        assert oldest not in pub.slabs and pub.find("k0", V) is None and pub.find("k2", V) is not None
        assert not os.path.exists(os.path.join(same_host.SHM_DIR, oldest.name)) and pub.held_bytes == 2 << 20
        name, offset = pub.find("k4", V)
        mapped = published._map(name)
        assert mapped[offset:offset + 4] == bytes([5] * 4) and offset % published.PAGE == 0
        assert pub.reserve("k4", V, 16) is None  # published already
        assert pub.find("k4", ("another",)) is None  # another version of the entry: not these bytes
        assert pub.publish(pub.reserve("k4", ("another",), 16), [np.zeros(16, np.uint8)]) != (name, offset)
    finally:
        pub.close()
    assert not any(os.path.exists(os.path.join(same_host.SHM_DIR, s)) for s in set(made))
