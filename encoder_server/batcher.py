"""Dynamic batching of encode requests, one GPU worker thread per model.

Requests for the same model and `max_sequence_length` that arrive within `max_wait_ms` of each
other are merged into one forward pass (bounded by `max_batch_size` prompts and `max_batch_tokens`
padded tokens); each request gets exactly its own rows back. The queue is bounded: past
`max_queue` waiting requests, `submit` raises `Overloaded` at once instead of growing memory.
A request whose deadline has passed, or whose every waiter went away, is dropped before GPU work.
A batch that runs out of GPU memory is split in halves and retried; only a request that cannot
fit on its own fails, with `Overloaded`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from encoder_server.errors import DeadlineExpired, EncodeFailed, Overloaded
from encoder_server.families import Encoder

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class EncodeJob:
    prompts: list[str]
    prompts_2: list[str] | None
    max_sequence_length: int
    deadline: float | None  # time.monotonic() value
    future: asyncio.Future
    waiters: int = 1
    enqueued_at: float = field(default_factory=time.monotonic)

    @property
    def dropped(self) -> bool:
        return self.future.done() or self.waiters <= 0


@dataclass
class BatchStats:
    batches: int = 0
    prompts: int = 0
    encodes: int = 0  # forward passes, OOM retries included
    oom_splits: int = 0
    dropped: int = 0


class DynamicBatcher:
    """Merges concurrent `submit` calls for one `Encoder` into batched forward passes."""

    def __init__(self, encoder: Encoder, *, max_batch_size: int = 16, max_wait_ms: float = 2.0,
                 max_queue: int = 256, max_batch_tokens: int = 16 * 512, on_batch=None):
        self.encoder = encoder
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.max_batch_tokens = max_batch_tokens
        self.on_batch = on_batch  # callback(batch_size, queue_seconds, encode_seconds) for metrics
        self.stats = BatchStats()
        self._queue: deque[EncodeJob] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"encode-{encoder.name}")
        self._task: asyncio.Task | None = None

    @property
    def queued(self) -> int:
        return sum(not job.dropped for job in self._queue)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.encoder.name}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    def submit(self, prompts: list[str], prompts_2: list[str] | None, max_sequence_length: int,
               deadline: float | None = None) -> EncodeJob:
        """Queue a request; await `job.future` for `{name: (len(prompts), ...) CPU tensor}`."""
        if self.queued >= self.max_queue:
            raise Overloaded(f"model {self.encoder.name!r} has {self.max_queue} requests queued (--max-queue); "
                             "retry later or add replicas")
        job = EncodeJob(prompts, prompts_2, max_sequence_length, deadline, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._wakeup.set()
        return job

    def run_sync(self, prompts, prompts_2, max_sequence_length) -> dict[str, torch.Tensor]:
        """Encode outside the event loop (warm-up, tests)."""
        return _to_cpu(self.encoder.encode(prompts, prompts_2, max_sequence_length))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                batch = await self._collect()
                if batch:
                    await loop.run_in_executor(self._executor, self._execute, batch, loop)

    async def _collect(self) -> list[EncodeJob]:
        """Take the oldest live job and every compatible one that arrives within max_wait."""
        while self._queue and self._queue[0].dropped:
            self._queue.popleft()
            self.stats.dropped += 1
        if not self._queue:
            return []
        first = self._queue[0]
        close_at = first.enqueued_at + self.max_wait
        while True:
            batch, rows, skipped = [], 0, deque()
            while self._queue:
                job = self._queue.popleft()
                if job.dropped:
                    self.stats.dropped += 1
                    continue
                fits = (job.max_sequence_length == first.max_sequence_length
                        and rows + len(job.prompts) <= max(self.max_batch_size, len(first.prompts))
                        and (rows + len(job.prompts)) * job.max_sequence_length <= max(
                            self.max_batch_tokens, len(first.prompts) * first.max_sequence_length))
                if fits and (job.prompts_2 is None) == (first.prompts_2 is None):
                    batch.append(job)
                    rows += len(job.prompts)
                else:
                    skipped.append(job)
            self._queue.extendleft(reversed(skipped))
            remaining = close_at - time.monotonic()
            if rows >= self.max_batch_size or remaining <= 0:
                return batch
            # Put them back in order and wait a little for company.
            self._queue.extendleft(reversed(batch))
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
                self._wakeup.clear()
            except asyncio.TimeoutError:
                pass

    def _execute(self, batch: list[EncodeJob], loop: asyncio.AbstractEventLoop) -> None:
        """Worker thread: drop expired jobs, encode the rest, hand each its rows."""
        now = time.monotonic()
        live = []
        for job in batch:
            if job.dropped:
                self.stats.dropped += 1
            elif job.deadline is not None and now >= job.deadline:
                self.stats.dropped += 1
                loop.call_soon_threadsafe(_fail, job.future, DeadlineExpired(
                    "the request's deadline passed while it waited in the queue; it was dropped before GPU work"))
            else:
                live.append(job)
        if not live:
            return
        queue_seconds = max(now - job.enqueued_at for job in live)
        started = time.perf_counter()
        self._encode_split(live, loop)
        self.stats.batches += 1
        self.stats.prompts += sum(len(job.prompts) for job in live)
        if self.on_batch is not None:
            self.on_batch(sum(len(job.prompts) for job in live), queue_seconds, time.perf_counter() - started)

    def _encode_split(self, jobs: list[EncodeJob], loop) -> None:
        prompts = [p for job in jobs for p in job.prompts]
        prompts_2 = None if jobs[0].prompts_2 is None else [p for job in jobs for p in job.prompts_2]
        try:
            self.stats.encodes += 1
            out = _to_cpu(self.encoder.encode(prompts, prompts_2, jobs[0].max_sequence_length))
        except torch.OutOfMemoryError:
            _empty_cache(self.encoder.device)
            self.stats.oom_splits += 1
            if len(jobs) > 1:
                logger.warning("out of memory on a batch of %d requests; splitting it", len(jobs))
                half = len(jobs) // 2
                self._encode_split(jobs[:half], loop)
                self._encode_split(jobs[half:], loop)
            elif len(prompts) > 1:
                logger.warning("out of memory on %d prompts of one request; encoding them in halves", len(prompts))
                self._encode_split_request(jobs[0], loop)
            else:
                loop.call_soon_threadsafe(_fail, jobs[0].future, Overloaded(
                    f"one prompt of max_sequence_length={jobs[0].max_sequence_length} does not fit in "
                    f"{self.encoder.device} memory on model {self.encoder.name!r}"))
            return
        except Exception as e:  # noqa: BLE001 - every job of the batch must learn what happened
            logger.exception("encode failed on model %r", self.encoder.name)
            for job in jobs:
                loop.call_soon_threadsafe(_fail, job.future, EncodeFailed(f"encode failed: {type(e).__name__}: {e}"))
            return
        start = 0
        for job in jobs:
            rows = {name: t[start:start + len(job.prompts)] for name, t in out.items()}
            start += len(job.prompts)
            bad = [name for name, t in rows.items() if t.is_floating_point() and not torch.isfinite(t).all()]
            if bad:
                logger.error("model %r produced NaN/Inf in %s; not sent, not cached", self.encoder.name, bad)
                loop.call_soon_threadsafe(_fail, job.future, EncodeFailed(
                    f"model {self.encoder.name!r} produced NaN or Inf in {', '.join(bad)}; refusing to send or cache "
                    "it (check the server's --dtype: fp16 overflows in T5)"))
            else:
                loop.call_soon_threadsafe(_succeed, job.future, rows)

    def _encode_split_request(self, job: EncodeJob, loop) -> None:
        """Encode one request's prompts in two halves after an OOM and join the rows."""
        half = len(job.prompts) // 2
        parts = []
        for lo, hi in ((0, half), (half, len(job.prompts))):
            sub = EncodeJob(job.prompts[lo:hi], None if job.prompts_2 is None else job.prompts_2[lo:hi],
                            job.max_sequence_length, job.deadline, _SyncFuture())
            self._encode_split([sub], _ImmediateLoop())
            if sub.future.error is not None:
                loop.call_soon_threadsafe(_fail, job.future, sub.future.error)
                return
            parts.append(sub.future.value)
        loop.call_soon_threadsafe(_succeed, job.future, {n: torch.cat([p[n] for p in parts]) for n in parts[0]})


def _to_cpu(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().to("cpu") for name, t in out.items()}


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _succeed(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future, error: Exception) -> None:
    if not future.done():
        future.set_exception(error)


class _SyncFuture:
    """Just enough of a future for the OOM half-split, which runs inside the worker thread."""

    def __init__(self):
        self.value, self.error = None, None

    def done(self) -> bool:
        return self.value is not None or self.error is not None

    def set_result(self, value) -> None:
        self.value = value

    def set_exception(self, error) -> None:
        self.error = error


class _ImmediateLoop:
    @staticmethod
    def call_soon_threadsafe(callback, *args) -> None:
        callback(*args)
