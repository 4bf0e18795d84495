"""Assemble and run the encoder server: gRPC (aio) + health + reflection, load, warm, drain."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from encoder_server.cache import EmbeddingCache, MemoryTier
from encoder_server.families import get_encoder
from encoder_server.interceptors import ErrorMappingInterceptor
from encoder_server.service import EmbeddingService, Limits
from encoder_server.servicer import TextEncoderServicer
from shared.config import parse_dtype
from shared.promptcast.v1 import encoder_pb2 as pb
from shared.promptcast.v1 import encoder_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TextEncoder"].full_name


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
    cache_mem: int = 2 << 30


class EncoderServer:
    """The whole server. `await start()` binds the port at once (health NOT_SERVING), then loads
    and warms the models; health turns SERVING only after that."""

    def __init__(self, config: ServerConfig, *, encoders=None, interceptors=(), credentials=None):
        self.config = config
        self._preloaded = encoders
        batcher_options = dict(max_batch_size=config.max_batch_size, max_wait_ms=config.max_wait_ms,
                               max_queue=config.max_queue)
        self.service = EmbeddingService(EmbeddingCache([MemoryTier(config.cache_mem)]), config.limits,
                                        batcher_options)
        self.health = health.aio.HealthServicer()
        self.server = aio.server(interceptors=[*interceptors, ErrorMappingInterceptor()],
                                 options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_TextEncoderServicer_to_server(TextEncoderServicer(self.service), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME],
                                            self.server)
        address = f"{config.host}:{config.port}"
        self.port = (self.server.add_secure_port(address, credentials) if credentials
                     else self.server.add_insecure_port(address))
        if self.port == 0:
            raise OSError(f"could not bind {address}")
        self.stopped = asyncio.Event()

    async def _set_health(self, status) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def start(self) -> None:
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        logger.info("listening on %s:%d (NOT_SERVING until the models are warm)", self.config.host, self.port)
        encoders = self._preloaded if self._preloaded is not None else await asyncio.to_thread(self._load)
        for encoder in encoders:
            self.service.add(encoder)
        await self.service.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        logger.info("serving %s", ", ".join(f"{e.name} ({e.family})" for e in encoders))

    def _load(self):
        dtype = parse_dtype(self.config.dtype, self.config.device)
        encoders = []
        for spec in self.config.models:
            logger.info("loading the text encoders of %s", spec.source)
            encoders.append(get_encoder(spec.source, name=spec.name, family=spec.family,
                                        device=self.config.device, dtype=dtype))
        return encoders

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new calls, let in-flight streams finish within `grace`."""
        grace = self.config.grace if grace is None else grace
        logger.info("draining (grace %.1fs)", grace)
        self.service.draining = True
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)
        await self.service.close()
        self.stopped.set()

    async def run_until_signal(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: stopping or stopping.append(loop.create_task(self.stop())))
        try:
            await self.start()
        except BaseException:
            await self.server.stop(0)
            raise
        await self.stopped.wait()


def health_status(channel: grpc.Channel, service: str = "", timeout: float = 2.0) -> str:
    """SERVING / NOT_SERVING / ... of a server, for clients and tests."""
    stub = health_pb2_grpc.HealthStub(channel)
    response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


class BackgroundServer:
    """Run an `EncoderServer` on its own event loop in a daemon thread (demo, tests, notebooks).

    Example: `with BackgroundServer(ServerConfig([ModelSpec(path)], port=0)) as server: server.port`.
    """

    def __init__(self, config: ServerConfig, **server_kwargs):
        import threading

        self.config, self._kwargs = config, server_kwargs
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="promptcast-server")
        self.server: EncoderServer | None = None

    def start(self, timeout: float = 300) -> "BackgroundServer":
        self._thread.start()

        async def boot():
            self.server = EncoderServer(self.config, **self._kwargs)
            await self.server.start()

        asyncio.run_coroutine_threadsafe(boot(), self.loop).result(timeout)
        return self

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def stop(self, grace: float = 0) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(grace), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
