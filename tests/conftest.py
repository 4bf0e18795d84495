"""Shared fixtures: tiny models built once per session, real servers on free loopback ports."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import grpc
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests read MP4s back with imageio in a process with gRPC threads. imageio-ffmpeg starts ffmpeg with
# preexec_fn=os.setpgrp, which forces a fork, and gRPC's fork handlers then run in the child: they wrote into its
# stderr in 109 of 300 such forks measured beside a busy server, and once left ffmpeg with no output at all (imageio:
# "Could not load meta information"). Without the preexec_fn the child is spawned, as `denoiser_client.media` spawns
# the ffmpeg that writes them.
os.environ.setdefault("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "1")
# Servers keep a disk cache by default (~/.cache/promptcast): give the session its own empty cache home, so a
# rerun never finds the last run's embeddings (tiny models are deterministic, so their cache keys repeat).
_CACHE_HOME = tempfile.mkdtemp(prefix="promptcast-test-cache-")
os.environ["XDG_CACHE_HOME"] = _CACHE_HOME
atexit.register(shutil.rmtree, _CACHE_HOME, ignore_errors=True)

from encoder_server.server import BackgroundServer, ModelSpec, ServerConfig, health_status  # noqa: E402
from promptcast.tiny_models import make_tiny_model  # noqa: E402


def wait_for(predicate, timeout=20.0, interval=0.05):
    """Poll `predicate` until it holds (True) or `timeout` seconds pass (False): assert on the result."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """One tiny model folder per family, built once per session. Tests only read them: copy before changing."""
    from promptcast.tiny_models import FAMILIES

    root = tmp_path_factory.mktemp("models")
    return {family: make_tiny_model(root / f"tiny-{family}", family) for family in FAMILIES}


@pytest.fixture(scope="session")
def tiny_flux1(tiny_models):
    return tiny_models["flux1"]


@pytest.fixture(scope="session")
def flux1_server(tiny_flux1):
    with BackgroundServer(ServerConfig([ModelSpec(str(tiny_flux1), name="tiny-flux1")], port=0)) as server:
        yield server


@pytest.fixture
def client(flux1_server):
    from denoiser_client import RemoteTextEncoder

    with RemoteTextEncoder(flux1_server.address, timeout=60) as enc:
        yield enc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_model(src, dst, drop=()):
    """A copy of a model folder without some components (to prove they are never read)."""
    shutil.copytree(src, dst)
    for component in drop:
        shutil.rmtree(dst / component)
    return dst


class ServerProcess:
    """`promptcast serve` as a real subprocess on a free port. Its output goes to a file, not a pipe: a model worker
    process inherits it, and reading a pipe it still holds open would wait for that process instead of failing."""

    def __init__(self, args: list[str], env: dict | None = None):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "promptcast", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args],
            stdout=self.log, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})

    def wait_serving(self, timeout: float = 120) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.output()}")
                try:
                    if health_status(channel) == "SERVING":
                        return self
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"server at {self.address} not SERVING after {timeout}s")

    def stop(self, sig=None) -> int:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(sig or signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def output(self) -> str:
        if self.proc.poll() is None:
            return ""
        self.log.seek(0)
        return self.log.read()


@pytest.fixture
def server_process():
    started = []

    def start(*args, env=None):
        server = ServerProcess(list(args), env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def run_cli(*args, timeout=300, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "promptcast", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def no_grad_encode(pipe, *args, **kwargs):
    """`encode_prompt` as diffusers' `__call__` runs it: under `torch.no_grad()` (grad mode picks
    other attention kernels on CPU, so this is the reference the image actually uses)."""
    with torch.no_grad():
        return pipe.encode_prompt(*args, **kwargs)


@pytest.fixture(scope="session")
def reference(tiny_flux1):
    """Plain diffusers' FLUX.1 pipeline on the tiny model: what the split must equal. Read only (a test that loads
    LoRAs into it builds its own)."""
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(tiny_flux1)


def expected(reference, prompt, max_sequence_length):
    """diffusers' own FLUX.1 embeddings of one prompt, as the server must return them."""
    prompt_embeds, pooled, _ = no_grad_encode(reference, [prompt], max_sequence_length=max_sequence_length)
    return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}


def assert_same(a: dict, b: dict) -> None:
    """The same tensors bit for bit, dtype included; a variable-length output's list prompt by prompt."""
    assert set(a) == set(b)
    for name, value in b.items():
        if isinstance(value, list):
            assert isinstance(a[name], list) and len(a[name]) == len(value), name
            assert all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a[name], value)), name
        else:
            assert a[name].dtype == value.dtype and torch.equal(a[name], value), name


def batcher_stats(background, model: str = "tiny-flux1"):
    return background.server.service.batchers[model].stats


def cache_tier(background, name: str):
    return next(t for t in background.server.service.cache.tiers if t.name == name)


def pytest_addoption(parser):
    parser.addoption("--shard", default=None, metavar="I/N",
                     help="run the I-th of N shards (1-based), for N pytest processes side by side: tests that share a "
                     "module-scoped fixture (a server) stay in one shard")


def pytest_collection_modifyitems(config, items):
    """tests/gpu is the GPU suite: real commands on CUDA (`bench/run_on_gpu.sh --tests`); skipped without CUDA."""
    skip = pytest.mark.skip(reason="needs a CUDA device (the GPU suite runs on the GPU machine)")
    for item in items:
        if "/tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip)
    if config.getoption("--shard"):
        index, count = map(int, config.getoption("--shard").split("/"))
        if not 1 <= index <= count:
            raise pytest.UsageError(f"--shard {index}/{count}: I must be 1 to N")
        keep = set(shard_of(items, count)[index - 1])
        config.hook.pytest_deselected(items=[item for item in items if item not in keep])
        items[:] = [item for item in items if item in keep]


def shard_of(items, count: int) -> list[list]:
    """Split `items` into `count` shards of about as many tests each. Tests that use the same instance of a
    module-scoped fixture (a parametrized server, say) form one group, which no shard splits: each shard starts only
    the servers its own tests use."""
    groups: dict = {}
    for item in items:
        infos = getattr(item, "_fixtureinfo", None)
        defs = infos.name2fixturedefs if infos is not None else {}
        params = getattr(getattr(item, "callspec", None), "params", {})
        shared = tuple((item.module.__name__, name, repr(params.get(name))) for name in item.fixturenames
                       if name in defs and defs[name][-1].scope == "module")
        groups.setdefault(shared or item.nodeid, []).append(item)
    shards: list[list] = [[] for _ in range(count)]
    for group in sorted(groups.values(), key=len, reverse=True):  # largest first, each to the emptiest shard
        min(shards, key=len).extend(group)
    return shards
