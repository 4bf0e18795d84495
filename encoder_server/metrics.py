"""Prometheus metrics (`--metrics-port`) and one structured log line per call, with a request id.

Series (all prefixed `promptcast_`):

| series | type | labels |
| --- | --- | --- |
| `requests_total` | counter | method, model, code |
| `request_seconds` | histogram | method |
| `requests_in_flight` | gauge | |
| `queue_seconds` | histogram (oldest request of each batch) | |
| `batch_size` | histogram (prompts per forward pass) | |
| `encode_seconds` | histogram (forward pass of a batch) | |
| `streamed_bytes_total` | counter (response bytes) | model |
| `shared_memory_bytes_total` | counter (embedding bytes a same-host client read from shared memory) | model |
| `cache_hits_total`, `cache_misses_total` | counters (per prompt sent) | tier (hits) |
| `queue_depth` | gauge, at scrape | model |
| `serving` | gauge: 1 when health is SERVING | |
| `gpu_memory_allocated_bytes`, `gpu_memory_reserved_bytes` | gauges, at scrape (CUDA only) | device |
| `cache_tier_up` | gauge, at scrape, for tiers that can be down (Redis) | tier |
| `cache_entries`, `cache_bytes` | gauges, at scrape | tier |

The registry is private to the server, so two servers in one process (tests) never collide.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import re
import time
import uuid

from grpc import aio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

logger = logging.getLogger("promptcast.requests")

_CURRENT_CALL: contextvars.ContextVar[CallRecord | None] = contextvars.ContextVar("promptcast_call", default=None)
_TOKEN = re.compile(r"[A-Za-z0-9._:/@=-]{1,64}")  # what may go into a log line or a label unquoted
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """The server's Prometheus series. The domain feeds them (`EmbeddingService(metrics=...)` calls `observe_batch`
    and `observe_cache`); each transport wraps its calls in `call(...)`; the rest is read at scrape time."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("promptcast_requests", "RPCs by method, model and status code.",
                                ["method", "model", "code"], registry=r)
        self.request_seconds = Histogram("promptcast_request_seconds", "Whole RPC time on the server.",
                                         ["method"], buckets=_SECONDS, registry=r)
        self.in_flight = Gauge("promptcast_requests_in_flight", "RPCs being handled now.", registry=r)
        self.queue_seconds = Histogram("promptcast_queue_seconds", "Wait of the oldest request of each batch "
                                       "before its forward pass.", buckets=_SECONDS, registry=r)
        self.batch_size = Histogram("promptcast_batch_size", "Prompts per forward pass.",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.encode_seconds = Histogram("promptcast_encode_seconds", "Forward pass time of a batch.",
                                        buckets=_SECONDS, registry=r)
        self.streamed_bytes = Counter("promptcast_streamed_bytes", "Encode response bytes sent.", ["model"],
                                      registry=r)
        self.shared_memory_bytes = Counter("promptcast_shared_memory_bytes", "Embedding bytes a same-host client "
                                           "read from shared memory (its own, or the server's published entries) "
                                           "instead of the stream.", ["model"], registry=r)
        self.cache_hits = Counter("promptcast_cache_hits", "Prompts answered from a cache tier.", ["tier"],
                                  registry=r)
        self.cache_misses = Counter("promptcast_cache_misses", "Prompts that needed an encode.", registry=r)
        self.serving = Gauge("promptcast_serving", "1 when health is SERVING.", registry=r)
        self.service = None
        self._http = None
        r.register(_ScrapeTimeCollector(self))

    def bind(self, service) -> None:
        """Read queue depths, devices and cache tiers from this `EmbeddingService` at scrape time."""
        self.service = service

    def observe_batch(self, batch_size: int, queue_seconds: float, encode_seconds: float) -> None:
        """Called by the batcher (worker thread) after each forward pass."""
        self.batch_size.observe(batch_size)
        self.queue_seconds.observe(queue_seconds)
        self.encode_seconds.observe(encode_seconds)

    def observe_shared_memory(self, nbytes: int) -> None:
        """Called by the servicer for each prompt whose bytes a client reads from shared memory instead of the
        stream: written into its arena, or published in the server's."""
        call = _CURRENT_CALL.get()
        if call is not None and call.encodes:
            call.bytes += nbytes
            self.shared_memory_bytes.labels(call.model).inc(nbytes)

    def observe_cache(self, statuses: list[str]) -> None:
        """Called by the service with the cache status of every prompt it answers (`miss`, `memory`, ...)."""
        call = _CURRENT_CALL.get()
        for status in statuses:
            if status == "miss":
                self.cache_misses.inc()
            else:
                self.cache_hits.labels(status).inc()
            if call is not None:
                call.cache[status] = call.cache.get(status, 0) + 1

    @contextlib.contextmanager
    def call(self, method: str, rid: str, requested_model: str = "", prompts: int = 0, peer: str = "",
             encodes: bool | None = None, code=None):
        """Record one call of any transport: its code (set `record.code`, else what `code()` says once the block
        ends, as an abort's code; else OK, CANCELLED or UNKNOWN from how the block ends), time, bytes, cache results
        and log line. The domain's `observe_cache` reaches the record of the call it runs in. A call that `encodes`
        (default: gRPC's `Encode`) gets a model label, byte counts and the request log line.

        On an event loop the call is counted and logged at the loop's next turn: once a gRPC handler has returned,
        its status goes out first, and the call's latency does not include its log line."""
        record = CallRecord(self, method, rid, requested_model, prompts, peer,
                            method == "Encode" if encodes is None else encodes)
        token = _CURRENT_CALL.set(record)
        self.in_flight.inc()
        try:
            yield record
        except (asyncio.CancelledError, GeneratorExit):
            record.code = "CANCELLED"
            raise
        except aio.AbortError:
            raise
        except Exception:
            record.code = record.code or "UNKNOWN"
            raise
        finally:
            try:
                _CURRENT_CALL.reset(token)
            except ValueError:  # a stream closed from another context: the value dies with that context anyway
                pass
            if record.code is None and code is not None:
                record.code = code()
            record.ended = time.perf_counter()
            try:
                asyncio.get_running_loop().call_soon(self._finished, record)
            except RuntimeError:  # no loop: now
                self._finished(record)

    def _finished(self, record: "CallRecord") -> None:
        record.finish()
        self.in_flight.dec()  # last: in-flight 0 means every finished call is fully counted and logged

    def model_label(self, requested: str) -> str:
        # Only hosted names become label values: a client must not be able to grow the series set.
        encoders = self.service.encoders if self.service is not None else {}
        if not requested and len(encoders) == 1:
            return next(iter(encoders))
        return requested if requested in encoders else "unknown"

    def start_http(self, host: str, port: int) -> int:
        """Serve `/metrics` on `host:port` (0 picks a free port); returns the port."""
        try:
            self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise OSError(f"--metrics-port {port}: cannot listen on {host}:{port} ({e.strerror or e})") from None
        return self._http.server_port

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _ScrapeTimeCollector:
    """Values that are cheaper to read when Prometheus asks than to keep up to date."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def describe(self):
        return []  # dynamic: keeps the registry from calling collect() at registration

    def collect(self):
        service = self.metrics.service
        if service is None:
            return
        depth = GaugeMetricFamily("promptcast_queue_depth", "Requests waiting for a forward pass.",
                                  labels=["model"])
        for name, batcher in list(service.batchers.items()):
            depth.add_metric([name], _queued(batcher))
        yield depth
        devices = sorted({str(e.device) for e in service.encoders.values() if e.device.type == "cuda"})
        if devices:
            import torch

            allocated = GaugeMetricFamily("promptcast_gpu_memory_allocated_bytes",
                                          "torch.cuda.memory_allocated per device.", labels=["device"])
            reserved = GaugeMetricFamily("promptcast_gpu_memory_reserved_bytes",
                                         "torch.cuda.memory_reserved per device.", labels=["device"])
            for device in devices:
                allocated.add_metric([device], torch.cuda.memory_allocated(device))
                reserved.add_metric([device], torch.cuda.memory_reserved(device))
            yield allocated
            yield reserved
        up = GaugeMetricFamily("promptcast_cache_tier_up", "1 while a cache tier that can fail (Redis) "
                               "answers; 0 while it is skipped as down.", labels=["tier"])
        entries = GaugeMetricFamily("promptcast_cache_entries", "Entries held by a cache tier.", labels=["tier"])
        held = GaugeMetricFamily("promptcast_cache_bytes", "Bytes held by a cache tier.", labels=["tier"])
        stats = service.cache.stats() if callable(getattr(service.cache, "stats", None)) else {}
        for tier in getattr(service.cache, "tiers", []):
            healthy = tier_health(tier)
            if healthy is not None:
                up.add_metric([tier.name], float(healthy))
            tier_stats = stats.get(tier.name, {})
            if "entries" in tier_stats:
                entries.add_metric([tier.name], tier_stats["entries"])
            if "bytes" in tier_stats:
                held.add_metric([tier.name], tier_stats["bytes"])
        yield from (up, entries, held)


def _queued(batcher) -> float:
    # Scrapes run on the HTTP thread while the event loop appends to the queue.
    for _ in range(5):
        try:
            return batcher.queued
        except RuntimeError:  # deque mutated during iteration: read it again
            continue
    return float("nan")


def tier_health(tier) -> bool | None:
    """True/False for tiers that track whether they are reachable (`healthy`), else None. Read
    from the tier's own bookkeeping: a scrape never waits on the network."""
    healthy = getattr(tier, "healthy", None)
    if callable(healthy):
        healthy = healthy()
    return None if healthy is None else bool(healthy)


def request_id(metadata) -> str:
    """The caller's `x-request-id` when it is a sane token, else a fresh one."""
    for key, value in metadata or ():
        if key == "x-request-id":
            value = value if isinstance(value, str) else value.decode("latin-1")
            if _TOKEN.fullmatch(value):
                return value
    return uuid.uuid4().hex[:16]


def _loggable(text: str) -> str:
    # A client chooses the model name: quoted and cut when odd, so it cannot forge log lines.
    return text if _TOKEN.fullmatch(text) else repr(text[:64])


class CallRecord:
    """What one call did, turned into series and one log line when it ends. The domain adds its cache results
    (`ServerMetrics.observe_cache`); the transport adds the bytes it sends (`sent`)."""

    def __init__(self, metrics: ServerMetrics, method: str, rid: str, requested_model: str, prompts: int, peer: str,
                 encodes: bool = False):
        self.metrics, self.method, self.rid, self.peer, self.encodes = metrics, method, rid, peer, encodes
        self.bytes = 0
        self.cache: dict[str, int] = {}
        self.code: str | None = None
        self.started = time.perf_counter()
        self.ended: float | None = None
        self.describe(requested_model, prompts)

    def describe(self, requested_model: str, prompts: int) -> None:
        """The model and prompt count of the request, for a transport that learns them only once the call has
        begun (HTTP reads its body inside the call, so a malformed one is counted too)."""
        self.requested_model, self.prompts = requested_model, prompts
        self.model = self.metrics.model_label(requested_model) if self.encodes else ""
        self.streamed = self.metrics.streamed_bytes.labels(self.model) if self.encodes else None

    def sent(self, message) -> None:
        size = len(message) if isinstance(message, (bytes, memoryview)) else message.ByteSize()
        self.bytes += size
        if self.streamed is not None:
            self.streamed.inc(size)  # as it goes: a long stream shows up before it ends

    def finish(self) -> None:
        m, seconds = self.metrics, (self.ended or time.perf_counter()) - self.started
        code = self.code or "OK"
        m.requests.labels(self.method, self.model, code).inc()
        m.request_seconds.labels(self.method).observe(seconds)
        if self.encodes:
            cache = ",".join(f"{k}:{v}" for k, v in sorted(self.cache.items())) or "-"
            logger.info("encode request_id=%s model=%s prompts=%d code=%s seconds=%.3f bytes=%d cache=%s peer=%s "
                        "method=%s", self.rid, _loggable(self.requested_model or self.model), self.prompts, code,
                        seconds, self.bytes, cache, self.peer, self.method)
