"""Assemble and run the encoder server: gRPC (aio) + health + reflection (+ the HTTP gateway), load, warm, drain."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import signal
import threading
import time
from dataclasses import dataclass, field

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from encoder_server.cache import build_cache, default_memory_bytes
from encoder_server.families import get_encoder
from encoder_server.interceptors import CallScope, ClientGoneFilter
from encoder_server.metrics import ServerMetrics
from encoder_server.service import EmbeddingService, Limits
from encoder_server.worker_process import default_worker
from encoder_server.servicer import SERVICE_NAME, TextEncoderServicer, add_to_server
from shared.config import check_port, parse_dtype
from shared.disk_cache import default_cache_dir

logger = logging.getLogger(__name__)

UNWIND_SECONDS = 10.0  # most a drain waits, once the server has stopped, for the calls it cancelled to unwind

SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),
    # Clients ping every 30s to find dead links (keepalive), also mid-encode: no GOAWAY "too_many_pings" for that.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    # Flow control's BDP pings can come closer than that on a busy server; 2 strikes would GOAWAY the connection.
    ("grpc.http2.max_ping_strikes", 0),
    # Clients reconnect every few minutes, re-resolving dns:/// names: new replicas get traffic.
    # In-flight calls keep their connection for up to the grace period.
    ("grpc.max_connection_age_ms", 300_000),
    ("grpc.max_connection_age_grace_ms", 120_000),
]


@dataclass
class ModelSpec:
    """One `--model [NAME=]SRC` entry."""

    source: str
    name: str | None = None
    family: str | None = None

    @classmethod
    def parse(cls, text: str, family: str | None = None) -> "ModelSpec":
        name, sep, source = text.partition("=")
        return cls(source=source, name=name, family=family) if sep else cls(source=text, family=family)


@dataclass
class ServerConfig:
    models: list[ModelSpec]
    host: str = "127.0.0.1"
    port: int = 50051
    device: str = "cpu"
    dtype: str = "auto"
    grace: float = 30.0
    limits: Limits = field(default_factory=Limits)
    max_batch_size: int = 16
    max_wait_ms: float = 2.0
    max_queue: int = 256
    cache_mem: int = field(default_factory=default_memory_bytes)  # bytes; 0 disables the memory tier
    cache_dir: str | None = field(default_factory=lambda: str(default_cache_dir()))  # None or "none" disables
    cache_disk_max: int = 20 << 30
    cache_redis: str | None = None  # redis://host:port/db, shared by every replica
    cache_shm: int = 512 << 20  # memory hits published in /dev/shm for same-host clients; 0 = off
    # Production operation (TLS, tokens, metrics, health port, GPU watchdog); None/0 = off.
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    token_file: str | None = None
    metrics_port: int | None = None
    health_port: int | None = None  # plaintext health-only port, for probes that cannot speak TLS (kubelet)
    http_port: int | None = None  # the HTTP gateway (hosted FLUX.2 text encoder's /predict, /v1/encode, /healthz)
    gpu_timeout: float = 300.0
    max_batch_tokens: int = 16 * 512  # padded tokens in one forward pass (prompts x max_sequence_length)
    compile: bool = False  # torch.compile the encoders' repeated blocks, warmed at start-up
    quantize: str | None = None  # int8 | nf4 (bitsandbytes), fp8 (torchao): the large text encoder only
    # Replay the encoders' forwards as CUDA graphs, captured at start-up per batch bucket. None: on CUDA, for every
    # family whose pipeline pads its prompts to a fixed length.
    cuda_graphs: bool | None = None
    worker: str | None = None  # "thread" or "process" (a child process per model); None: `default_worker(device)`


class EncoderServer:
    """The whole server. `await start()` binds the port at once (health NOT_SERVING), then loads
    and warms the models; health turns SERVING only after that."""

    def __init__(self, config: ServerConfig, *, encoders=None, interceptors=(), credentials=None):
        self.config = config
        self._preloaded = encoders
        self._owned: list = []  # encoders this server loaded (and so closes)
        batcher_options = dict(max_batch_size=config.max_batch_size, max_wait_ms=config.max_wait_ms,
                               max_queue=config.max_queue, max_batch_tokens=config.max_batch_tokens)
        self.metrics = ServerMetrics()
        cache = build_cache(config.cache_mem, config.cache_dir, config.cache_disk_max, config.cache_redis)
        self.service = EmbeddingService(cache, config.limits,
                                        batcher_options, metrics=self.metrics)
        self.metrics.bind(self.service)
        self.auth = None
        if config.token_file:
            from encoder_server.auth import TokenAuth

            self.auth = TokenAuth(config.token_file)
        if credentials is None and config.tls_cert:
            from encoder_server.tls import server_credentials

            credentials = server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
        if self.auth is not None and credentials is None:
            logger.warning("--token-file without TLS: tokens cross the network in the clear (add --tls-cert/--tls-key)")
        self.health = health.aio.HealthServicer()
        # Counting, metrics (refused calls too), the token check and error mapping, around any other interceptor.
        self.calls = CallScope(self.metrics, self.auth)
        ClientGoneFilter.install()
        self.server = aio.server(interceptors=[self.calls, *interceptors], options=SERVER_OPTIONS)
        self.servicer = TextEncoderServicer(self.service, config.cache_shm)
        add_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME],
                                            self.server)
        self.port = _bind(self.server, config.host, config.port, credentials, "--port")
        self.health_server = None
        if config.health_port is not None:
            self.health_server = aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            self.health_port = _bind(self.health_server, config.host, config.health_port, None, "--health-port")
        self.serving = False
        self.gateway = None
        if config.http_port is not None:
            from encoder_server.http_gateway import HttpGateway

            self.gateway = HttpGateway(self.service, self.metrics, host=config.host, port=config.http_port,
                                       serving=lambda: self.serving, auth=self.auth, tls_cert=config.tls_cert,
                                       tls_key=config.tls_key, tls_client_ca=config.tls_client_ca,
                                       executor=self.servicer.packers)
        self.metrics_port: int | None = None
        self._watchdog: asyncio.Task | None = None
        self.stopped = asyncio.Event()

    @property
    def http_port(self) -> int | None:
        return self.gateway.port if self.gateway is not None else None

    @property
    def active_calls(self) -> int:
        """promptcast calls being handled now, over gRPC and HTTP."""
        return self.calls.active + (self.gateway.active if self.gateway is not None else 0)

    async def _set_health(self, status) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)
        self.serving = status == health_pb2.HealthCheckResponse.SERVING
        self.metrics.serving.set(self.serving)

    async def start(self) -> None:
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.start_http(self.config.host, self.config.metrics_port)
            logger.info("metrics on http://%s:%d/metrics", self.config.host, self.metrics_port)
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()
        if self.gateway is not None:
            await self.gateway.start()
            logger.info("HTTP gateway on %s://%s:%d", self.gateway.scheme, self.config.host, self.gateway.port)
        logger.info("listening on %s:%d (NOT_SERVING until the models are warm)", self.config.host, self.port)
        encoders = self._preloaded if self._preloaded is not None else await asyncio.to_thread(self._load)
        loop = asyncio.get_running_loop()
        for encoder in encoders:
            if hasattr(encoder, "on_state"):  # a worker process that dies and restarts: health follows it
                encoder.on_state = lambda ready: loop.call_soon_threadsafe(self._worker_state, ready)
            self.service.add(encoder)
        await self.service.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        if self.config.gpu_timeout and self.config.gpu_timeout > 0:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch_workers(), name="gpu-watchdog")
        logger.info("serving %s", ", ".join(f"{e.name} ({e.family})" for e in encoders))

    def _load(self):
        dtype = parse_dtype(self.config.dtype, self.config.device)
        options = {k: v for k, v in (("compile", self.config.compile), ("quantize", self.config.quantize)) if v}
        options["cuda_graphs"] = self.config.cuda_graphs
        load = get_encoder
        if (self.config.worker or default_worker(self.config.device)) == "process":
            from encoder_server.worker_process import ProcessEncoder as load
        for spec in self.config.models:
            logger.info("loading the text encoders of %s", spec.source)
            self._owned.append(load(spec.source, name=spec.name, family=spec.family, device=self.config.device,
                                    dtype=dtype, **options))
        return list(self._owned)

    def _worker_state(self, ready: bool) -> None:
        if not self.service.draining:
            status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
            asyncio.get_running_loop().create_task(self._set_health(status))

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new calls, let in-flight streams finish within `grace`, then cancel what is
        left. The model workers and packing threads are released only once every call's handler has returned."""
        grace = self.config.grace if grace is None else grace
        logger.info("draining (grace %.1fs)", grace)
        self.service.draining = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.enter_graceful_shutdown()  # pinned: nothing turns it back to SERVING
        # New Encode calls (gRPC, HTTP) are refused (UNAVAILABLE, 503) from here on by the draining service. Health
        # Watch streams (client-side health checks) never end on their own and would hold a `server.stop(grace)` for
        # the whole grace period: wait for our own calls only, then stop once. (One `stop` call only: two
        # overlapping shutdowns of a grpc.aio server can crash its core.)
        deadline = time.monotonic() + grace
        while self.active_calls and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.calls.active:
            logger.warning("grace period over with %d calls in flight; cancelling them", self.calls.active)
        await self.server.stop(0)
        if self.health_server is not None:
            await self.health_server.stop(0)
        if self.gateway is not None:
            await self.gateway.stop()
        # `stop(0)` cancels in gRPC's core every call still open; their handlers unwind on this loop afterwards.
        # Closing the batchers and the packing threads before they have would fail or strand what they wait on.
        await self._wait_for_calls(UNWIND_SECONDS)
        await self.service.close()
        for encoder in self._owned:  # worker processes stop once their batchers are closed
            close = getattr(encoder, "close", None)
            if close is not None:
                await asyncio.to_thread(close)
        await self.servicer.close()
        self.metrics.stop_http()
        logger.info("drained")
        self.stopped.set()

    async def _wait_for_calls(self, timeout: float) -> None:
        tasks = set(self.calls.tasks)
        if tasks:
            _, running = await asyncio.wait(tasks, timeout=timeout)
            if running:
                logger.error("%d calls still running %.0fs after the server stopped", len(running), timeout)

    async def _watch_workers(self) -> None:
        """NOT_SERVING while a model's worker has been inside one batch longer than --gpu-timeout (a
        GPU that stopped answering): probes, load balancers and client health checks then move the
        traffic elsewhere (and a liveness probe restarts the pod). SERVING again once it answers."""
        timeout = self.config.gpu_timeout
        while not self.service.draining:
            for name, batcher in list(self.service.batchers.items()):
                # The worker and the finishing thread are one thread each: a no-op queued on them runs as soon as
                # the batch each has ends.
                probe = asyncio.ensure_future(batcher.probe())
                done, _ = await asyncio.wait({probe}, timeout=timeout)
                if done:
                    continue
                logger.error("model %r: a batch has been running for over %.0fs (--gpu-timeout); the device "
                             "looks stuck, health is NOT_SERVING until it answers", name, timeout)
                await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
                await asyncio.gather(probe, return_exceptions=True)
                if self.service.draining:
                    return
                logger.warning("model %r answers again; health back to SERVING", name)
                await self._set_health(health_pb2.HealthCheckResponse.SERVING)
            await asyncio.sleep(min(5.0, timeout / 4))

    def reload_tokens(self) -> None:
        if self.auth is not None:
            self.auth.reload()
        else:
            logger.info("SIGHUP ignored: no --token-file to reload")

    async def run_until_signal(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: stopping or stopping.append(loop.create_task(self.stop())))
        loop.add_signal_handler(signal.SIGHUP, self.reload_tokens)
        try:
            await self.start()
        except BaseException:
            await self.server.stop(0)
            if self.gateway is not None:
                await self.gateway.stop()
            self.metrics.stop_http()
            raise
        await self.stopped.wait()
        await _finish_other_tasks(UNWIND_SECONDS)


async def _finish_other_tasks(timeout: float) -> None:
    """Let every other task of this loop end on its own before `asyncio.run` cancels what is left, so that none of
    gRPC's per-call tasks is cancelled while it still waits on an operation in gRPC's core."""
    others = asyncio.all_tasks() - {asyncio.current_task()}
    if others:
        _, running = await asyncio.wait(others, timeout=timeout)
        if running:
            logger.warning("%d tasks still running at exit: %s", len(running),
                           ", ".join(sorted(t.get_name() for t in running)))


def _bind(server, host: str, port: int, credentials, option: str) -> int:
    """Add a listening port; an `OSError` naming the option when it cannot be had (gRPC would wrap a port over 65535
    around, and raise a bare RuntimeError for one in use)."""
    check_port(port, option)
    address = f"{host}:{port}"
    try:
        bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(f"{option} {port}: cannot listen on {address} (in use, or not an address of this machine); "
                      f"pick another {option}, or {option} 0 for a free one")
    return bound


def health_status(channel: grpc.Channel, service: str = "", timeout: float = 2.0) -> str:
    """SERVING / NOT_SERVING / ... of a server, for clients and tests."""
    stub = health_pb2_grpc.HealthStub(channel)
    response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


_SHARED_LOOP: asyncio.AbstractEventLoop | None = None
_SHARED_LOOP_LOCK = threading.Lock()


def _shared_loop() -> asyncio.AbstractEventLoop:
    """One event loop thread for every in-process server: grpc.aio binds its completion-queue poller to a
    single loop per process, and servers on several loops crash it (seen as a segfault in `server.stop`)."""
    global _SHARED_LOOP
    with _SHARED_LOOP_LOCK:
        if _SHARED_LOOP is None:
            _SHARED_LOOP = asyncio.new_event_loop()
            threading.Thread(target=_SHARED_LOOP.run_forever, daemon=True, name="promptcast-servers").start()
        return _SHARED_LOOP


class BackgroundServer:
    """Run an `EncoderServer` on the process's server event loop, in a daemon thread (demo, tests, notebooks).

    Example: `with BackgroundServer(ServerConfig([ModelSpec(path)], port=0)) as server: server.port`.
    """

    def __init__(self, config: ServerConfig, **server_kwargs):
        self.config, self._kwargs = config, server_kwargs
        self.loop = _shared_loop()
        self.server: EncoderServer | None = None

    def begin(self) -> concurrent.futures.Future:
        """Bind and start loading; `self.server` exists at once, the returned future completes once warm."""
        created = threading.Event()

        async def boot():
            self.server = EncoderServer(self.config, **self._kwargs)
            created.set()
            await self.server.start()

        future = asyncio.run_coroutine_threadsafe(boot(), self.loop)
        while not created.wait(0.05):
            if future.done():
                future.result()  # the constructor failed: raise its error here
        return future

    def start(self, timeout: float = 300) -> "BackgroundServer":
        self.begin().result(timeout)
        return self

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    @property
    def http_url(self) -> str:
        """`http(s)://host:port` of the HTTP gateway (`ServerConfig(http_port=...)`)."""
        return f"{self.server.gateway.scheme}://{self.config.host}:{self.server.http_port}"

    def stop(self, grace: float = 0) -> None:
        if self.server is not None and not self.server.stopped.is_set():
            asyncio.run_coroutine_threadsafe(self.server.stop(grace), self.loop).result()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
