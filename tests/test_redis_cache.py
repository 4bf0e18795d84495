"""The Redis tier against a real `redis-server` (Debian package `redis-server`): replicas share it,
tampered or foreign values are misses, and a Redis outage is never a server outage."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time

import grpc
import pytest

from conftest import (BackgroundServer, ModelSpec, ServerConfig, assert_same, cache_tier, expected, free_port,
                      health_status, wait_for)
from conftest import batcher_stats as stats
from denoiser_client import RemoteTextEncoder
from shared.disk_cache import unpack

redis = pytest.importorskip("redis")
MODEL = "tiny-flux1"
PREFIX = "promptcast:embedding:"


class RedisProcess:
    """`redis-server` on a free loopback port, no persistence; can be killed and started again on that port."""

    def __init__(self, binary: str):
        self.binary, self.port = binary, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None
        self.start()

    def start(self) -> "RedisProcess":
        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--protected-mode", "yes"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return self
            except redis.exceptions.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def client(self):
        return redis.Redis(port=self.port)


@pytest.fixture(scope="module")
def redis_binary():
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("PROMPTCAST_REQUIRE_REDIS") == "1":
            pytest.fail("redis-server is not installed (apt-get install redis-server) and PROMPTCAST_REQUIRE_REDIS=1")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    return binary


@pytest.fixture
def start_redis(redis_binary):
    started = []

    def start():
        started.append(RedisProcess(redis_binary))
        return started[-1]

    yield start
    for r in started:
        r.kill()


@pytest.fixture(scope="module")
def shared_redis(redis_binary):
    r = RedisProcess(redis_binary)
    yield r
    r.kill()


@contextlib.contextmanager
def replica(tiny_flux1, cache_dir, redis_url, **config):
    config = ServerConfig([ModelSpec(str(tiny_flux1), name=MODEL)], port=0, cache_dir=str(cache_dir),
                          cache_redis=redis_url, **config)
    with BackgroundServer(config) as s, RemoteTextEncoder(s.address, timeout=30) as client:
        yield s, client


@pytest.fixture(scope="module")
def replicas(tiny_flux1, shared_redis, tmp_path_factory):
    """Two servers with their own memory and disk tiers and one Redis between them."""
    with replica(tiny_flux1, tmp_path_factory.mktemp("a"), shared_redis.url) as a, \
            replica(tiny_flux1, tmp_path_factory.mktemp("b"), shared_redis.url) as b:
        yield a, b


def redis_tier(background):
    return cache_tier(background, "redis")


def test_second_replica_serves_what_the_first_encoded_with_zero_encodes(replicas):
    (a, client_a), (b, client_b) = replicas
    encoded, info_a = client_a.encode("a fox shared by replicas", max_sequence_length=16, with_info=True)
    a.server.service.cache.flush()  # disk and Redis are written in the background, just after the answer
    before = (stats(b).encodes, stats(b).prompts)
    served, info_b = client_b.encode("a fox shared by replicas", max_sequence_length=16, with_info=True)
    assert info_a.cache_status == ["miss"] and info_b.cache_status == ["redis"]
    assert (stats(b).encodes, stats(b).prompts) == before
    assert info_b.cache_keys == info_a.cache_keys
    assert_same(served, encoded)
    _, again = client_b.encode("a fox shared by replicas", max_sequence_length=16, with_info=True)
    assert again.cache_status == ["memory"]  # a Redis hit fills the tiers above it: memory at once...
    b.server.service.cache.flush()  # ...and disk in the background
    disk = next(t for t in b.server.service.cache.tiers if t.name == "disk")
    stored = unpack(info_b.cache_keys[0], disk.path(info_b.cache_keys[0]).read_bytes())
    assert_same(stored, {name: t[0] for name, t in encoded.items()})


def test_tampered_redis_value_is_a_miss_deleted_and_recomputed(replicas, shared_redis, reference, caplog):
    (a, client_a), (b, client_b) = replicas
    _, info = client_a.encode("a tampered owl", max_sequence_length=16, with_info=True)
    a.server.service.cache.flush()
    name = PREFIX + info.cache_keys[0]
    value = bytearray(shared_redis.client().get(name))
    value[-5] ^= 0x01  # one bit of the tensor bytes
    shared_redis.client().set(name, bytes(value))
    before, corrupt = stats(b).prompts, redis_tier(b).corrupt
    got, info_b = client_b.encode("a tampered owl", max_sequence_length=16, with_info=True)
    b.server.service.cache.flush()
    assert info_b.cache_status == ["miss"] and stats(b).prompts == before + 1
    assert redis_tier(b).corrupt == corrupt + 1 and "checksum mismatch" in caplog.text
    assert_same(got, expected(reference, "a tampered owl", 16))
    unpack(info.cache_keys[0], shared_redis.client().get(name))  # rewritten whole by b's miss


@pytest.mark.parametrize("other", ["length", "prompt"])
def test_redis_value_written_for_another_key_is_a_miss(replicas, shared_redis, reference, other):
    (a, client_a), (b, client_b) = replicas
    prompt = f"a foreign heron ({other})"
    source = dict(prompt=prompt, max_sequence_length=16) if other == "length" else \
        dict(prompt=prompt + " elsewhere", max_sequence_length=32)
    _, written = client_a.encode(source["prompt"], max_sequence_length=source["max_sequence_length"], with_info=True)
    a.server.service.cache.flush()
    # The key b will look up (prompt at length 32), computed like the server does, holding the other entry.
    fingerprint = client_b.model_info(MODEL).fingerprint
    from shared.cache_keys import embedding_key

    target = embedding_key(fingerprint, 32, prompt, None)
    assert target != written.cache_keys[0]
    shared_redis.client().set(PREFIX + target, shared_redis.client().get(PREFIX + written.cache_keys[0]))
    got, info = client_b.encode(prompt, max_sequence_length=32, with_info=True)
    b.server.service.cache.flush()
    assert info.cache_status == ["miss"] and info.cache_keys == [target]
    assert_same(got, expected(reference, prompt, 32))
    unpack(target, shared_redis.client().get(PREFIX + target))  # replaced by the right entry


def test_redis_killed_mid_run_keeps_serving_and_reconnects(tiny_flux1, tmp_path, start_redis, caplog):
    r = start_redis()
    with replica(tiny_flux1, tmp_path, r.url) as (s, client):
        tier = redis_tier(s)
        tier.retry_interval = 0.3
        failures, done, served = [], threading.Event(), []

        def traffic():
            n = 0
            while not done.is_set():
                try:
                    _, info = client.encode(f"traffic prompt {n}", max_sequence_length=16, with_info=True)
                    served.append(info.cache_status[0])
                except Exception as e:  # noqa: BLE001 - any failure fails the test below
                    failures.append(e)
                n += 1

        thread = threading.Thread(target=traffic)
        thread.start()
        assert wait_for(lambda: len(served) >= 5, timeout=60), failures
        r.kill()
        killed_at = len(served)
        assert wait_for(lambda: len(served) >= killed_at + 10, timeout=60), failures
        with grpc.insecure_channel(s.address) as channel:
            assert health_status(channel) == "SERVING"
        assert not tier.healthy and tier.errors >= 1
        done.set()
        thread.join(30)
        assert failures == [] and served.count("miss") == len(served)
        assert caplog.text.count("is unreachable") == 1  # once per outage, not once per request

        r.start()  # same port: the tier must find it again
        time.sleep(tier.retry_interval + 0.1)
        _, info = client.encode("after the outage", max_sequence_length=16, with_info=True)
        s.server.service.cache.flush()  # Redis is written in the background
        assert tier.healthy and "reachable again" in caplog.text
        assert r.client().exists(PREFIX + info.cache_keys[0])


def test_server_starts_and_serves_when_redis_is_down_from_the_start(tiny_flux1, tmp_path):
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with replica(tiny_flux1, tmp_path, url) as (s, client):
        _, info = client.encode("no redis at all", max_sequence_length=16, with_info=True)
        _, again = client.encode("no redis at all", max_sequence_length=16, with_info=True)
        assert info.cache_status == ["miss"] and again.cache_status == ["memory"]
        assert not redis_tier(s).healthy
        assert s.server.service.cache.stats()["redis"]["healthy"] is False
