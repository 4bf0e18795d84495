"""Dynamic batching of encode requests, one GPU worker thread per model.

Requests for the same model and `max_sequence_length` that arrive within `max_wait_ms` of each other are merged into
one forward pass (bounded by `max_batch_size` prompts and `max_batch_tokens` padded tokens); each request gets exactly
its own rows back. A lone client does not wait for company: while the device is idle, the last batch held one request
and only one is queued, it starts at once. While a batch is on the device, a partial one waits up to a quarter of the
last batch's time after the last hand-out (sooner, it would only queue behind that batch): the clients one batch
answered fill the next together, and a request left over from before does not make it go without them (leaving one
of them over in turn, a batch later, batch after batch). The queue is bounded: past `max_queue` waiting requests,
`submit` raises `Overloaded` at once instead of growing memory. A request whose deadline has passed, or whose every
waiter went away, is dropped before GPU work. A batch that runs out of GPU memory is split in halves and retried; only
a request that cannot fit on its own fails, with `Overloaded`. Rows with NaN or Inf fail their request (`EncodeFailed`).
A variable-length output is a list of per-prompt tensors throughout; every other one a `(B, ...)` tensor.

Every queue decision (accept, drop, merge) is made on the event loop's thread, so a request that joins a job and a
worker that drops it never race. The worker thread only tokenizes and queues each forward pass and its copy to
(pinned) host memory, then takes the next batch; a finishing thread waits for the copy (one sync a batch, NaN/Inf flags
computed on the device travel with it), packs each prompt's rows for the wire when asked to, and hands them out.
Batches finish in order, with at most one on the device behind the one being launched.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from encoder_server import host_copy
from encoder_server.errors import DeadlineExpired, EncodeFailed, ModelNotReady, Overloaded
from encoder_server.families import Encoder

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class EncodeJob:
    """One request's prompts. Several clients may wait on it (identical prompts are encoded once):
    `waiters` counts them and `deadline` is the latest of theirs (None: no deadline)."""

    prompts: list[str]
    prompts_2: list[str] | None
    max_sequence_length: int
    deadline: float | None  # time.monotonic() value
    future: asyncio.Future
    waiters: int = 1
    enqueued_at: float = field(default_factory=time.monotonic)
    packed: list | None = None  # per prompt, what the batcher's `pack` made of its rows (set before the future)

    def join(self, deadline: float | None) -> None:
        self.waiters += 1
        self.deadline = None if deadline is None or self.deadline is None else max(self.deadline, deadline)

    def leave(self) -> None:
        self.waiters -= 1

    @property
    def rows(self) -> int:
        return len(self.prompts)


@dataclass
class BatchStats:
    batches: int = 0  # forward passes asked for (before any OOM split)
    prompts: int = 0
    encodes: int = 0  # forward passes run, OOM retries included
    oom_splits: int = 0
    dropped: int = 0  # jobs dropped before GPU work (deadline passed, every waiter gone)
    max_batch_rows: int = 0
    busy_seconds: float = 0.0  # time a batch was being encoded (utilization = its growth / wall time)


class DynamicBatcher:
    """Merges concurrent `submit` calls for one `Encoder` into batched forward passes."""

    def __init__(self, encoder: Encoder, *, max_batch_size: int = 16, max_wait_ms: float = 2.0,
                 max_queue: int = 256, max_batch_tokens: int = 16 * 512, on_batch=None, pack=None):
        self.encoder = encoder
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.max_batch_tokens = max_batch_tokens
        self.on_batch = on_batch  # callback(batch_size, queue_seconds, encode_seconds) for metrics
        self.pack = pack  # one prompt's {name: tensor} -> its wire form, into `job.packed` on the finishing thread
        self.stats = BatchStats()
        self._queue: deque[EncodeJob] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"encode-{encoder.name}")
        # Waits for each batch's bytes on the host and hands its rows out, while the worker launches the next.
        self._finisher = ThreadPoolExecutor(1, thread_name_prefix=f"finish-{encoder.name}")
        self._last_ready = 0.0
        self._last_busy = 0.0  # seconds the last batch added to busy_seconds: about a batch's time on the device
        self._handed_out_at = 0.0  # time.monotonic() of the last hand-out: its clients come back from then on
        self._task: asyncio.Task | None = None
        self._in_flight = 0  # batches taken from the queue and not yet handed out
        self._last_jobs = 0  # requests in the last batch taken (0: none yet, so the first one waits for company)

    @property
    def queued(self) -> int:
        """Live requests waiting for the GPU (the one being encoded is not counted)."""
        return sum(job.waiters > 0 for job in self._queue)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.encoder.name}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while self._queue:
            _fail(self._queue.popleft().future, ModelNotReady("the server is shutting down; retry on another replica"))
        self._executor.shutdown(wait=True)
        self._finisher.shutdown(wait=True)

    def submit(self, prompts: list[str], prompts_2: list[str] | None, max_sequence_length: int,
               deadline: float | None = None) -> EncodeJob:
        """Queue a request; await `job.future` for `{name: (len(prompts), ...) CPU tensor}`."""
        if self.queued >= self.max_queue:
            raise Overloaded(f"model {self.encoder.name!r} has {self.max_queue} requests queued, the limit "
                             "(--max-queue); retry later or add replicas")
        job = EncodeJob(prompts, prompts_2, max_sequence_length, deadline, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._wakeup.set()
        return job

    async def run_in_worker(self, fn, *args):
        """Run `fn(*args)` on this model's worker thread (warm-up, compile), between batches."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def probe(self) -> None:
        """Return once the worker and the finishing thread have each come back from what they were doing: a batch
        the device never finishes keeps this waiting (the GPU watchdog)."""
        for thread in (self._executor, self._finisher):  # any call: it returns once the thread is free
            await asyncio.get_running_loop().run_in_executor(thread, time.monotonic)

    def run_sync(self, prompts, prompts_2, max_sequence_length) -> dict[str, torch.Tensor]:
        """Encode outside the queue (warm-up, tests)."""
        return host_copy.to_cpu(self.encoder.encode(prompts, prompts_2, max_sequence_length))

    def max_rows(self, max_sequence_length: int) -> int:
        """Most prompts one merged batch holds at this length (a single larger request still runs alone)."""
        return max(min(self.max_batch_size, self.max_batch_tokens // max_sequence_length), 1)

    async def warm_up(self, prompt: str) -> None:
        """Encode `prompt` once at the default length; with `--compile` at every batch size that makes it compile (1,
        2 and the largest batch), with `--cuda-graphs` at every batch bucket, so no client waits for a compilation or
        a capture."""
        from encoder_server.acceleration import warm_up_batch_sizes

        length = self.encoder.default_max_sequence_length
        graphs, compiled = getattr(self.encoder, "cuda_graphs", False), getattr(self.encoder, "compile", False)
        sizes = warm_up_batch_sizes(self.max_rows(length), graphs) if graphs or compiled else [1]
        for size in sizes:
            started = time.perf_counter()
            await self.run_in_worker(self.run_sync, [prompt] * size, None, length)
            logger.info("model %r warm at batch %d (%.2fs)", self.encoder.name, size, time.perf_counter() - started)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        finishing = None  # the batch waiting on the device: a future of [(job, rows or error)]
        while True:
            launched = await loop.run_in_executor(self._executor, self._launch, await self._next_batch())
            # Batches finish in order, and at most one waits on the device while the worker launches the next: its
            # tokenization and forward are queued behind the one running, and the copy of that one to the host, the
            # NaN verdicts and the hand-out happen off the worker thread.
            if finishing is not None:
                await asyncio.shield(finishing)
            finishing = loop.run_in_executor(self._finisher, self._finish, launched)
            finishing.add_done_callback(self._handed_out)

    def _handed_out(self, finished: asyncio.Future) -> None:
        self._in_flight -= 1
        self._handed_out_at = time.monotonic()
        self._wakeup.set()  # a batch held for company behind this one goes now
        _hand_out(finished)

    async def _next_batch(self) -> list[EncodeJob]:
        while (batch := self._ready_batch()) is None:
            timeout = self._goes_at(self._queue[0]) - time.monotonic() if self._queue else None
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        return batch

    def _goes_at(self, first: EncodeJob) -> float:
        """When a partial batch led by `first` goes: `max_wait` after it came, later behind a busy device (above)."""
        if not self._in_flight:
            return first.enqueued_at + self.max_wait
        return max(first.enqueued_at, self._handed_out_at) + max(self.max_wait, self._last_busy / 4)

    def _ready_batch(self) -> list[EncodeJob] | None:
        """The oldest live job and every compatible one, once the batch is full or it is `_goes_at` time (time spent
        behind a busy GPU counts, so a backlog is taken at once); else None."""
        self._drop_dead()
        if not self._queue:
            return None
        first = self._queue[0]
        batch, full = self._compatible(first)
        alone = self._in_flight == 0 and self._last_jobs == 1 and len(self._queue) == 1
        if not full and not alone and time.monotonic() < self._goes_at(first):
            return None
        self._in_flight += 1
        self._last_jobs = len(batch)
        taken = set(map(id, batch))
        self._queue = deque(job for job in self._queue if id(job) not in taken)
        return batch

    def _compatible(self, first: EncodeJob) -> tuple[list[EncodeJob], bool]:
        """Jobs batchable with `first` (same length, same prompts_2-ness) within the bounds; and
        whether the batch is full. A single request over the bounds still runs, alone."""
        length = first.max_sequence_length
        max_rows = max(self.max_rows(length), first.rows)
        batch, rows, full = [], 0, False
        for job in self._queue:
            if job.max_sequence_length != length or (job.prompts_2 is None) != (first.prompts_2 is None):
                continue
            if rows + job.rows > max_rows:
                full = True
                continue
            batch.append(job)
            rows += job.rows
        return batch, full or rows >= max_rows

    def _drop_dead(self) -> None:
        now = time.monotonic()
        live = deque()
        for job in self._queue:
            if job.waiters <= 0:
                _fail(job.future, ModelNotReady("every client of this request went away; it was dropped"))
            elif job.deadline is not None and now >= job.deadline:
                _fail(job.future, DeadlineExpired(
                    "the request's deadline passed while it waited in the queue; it was dropped before GPU work"))
            else:
                live.append(job)
                continue
            self.stats.dropped += 1
        self._queue = live

    def _launch(self, batch: list[EncodeJob]) -> "_Launched":
        """Worker thread: tokenize and queue the batch's forward, and its copy to the host; returns without waiting
        for the device (on the CPU, once it is done)."""
        queue_seconds = time.monotonic() - min(job.enqueued_at for job in batch)
        rows = sum(job.rows for job in batch)
        self.stats.batches += 1
        self.stats.prompts += rows
        self.stats.max_batch_rows = max(self.stats.max_batch_rows, rows)
        return _Launched(rows, queue_seconds, time.perf_counter(), list(self._encode_jobs(batch)))

    def _finish(self, launched: "_Launched") -> list[tuple[EncodeJob, dict | Exception]]:
        """Finishing thread: wait for the batch's bytes on the host (the one sync of the batch), then give each job
        its rows, or its error (NaN/Inf, a failure of the device)."""
        outcomes = []
        for step in launched.steps:
            outcomes.extend(self._job_rows(step) if isinstance(step, _OnDevice) else [step])
        for job, outcome in outcomes if self.pack is not None else ():  # packed here: no hop before the answer
            if not isinstance(outcome, Exception):
                job.packed = [self.pack({name: t[i] for name, t in outcome.items()}) for i in range(job.rows)]
        ended = time.perf_counter()
        self._last_busy = ended - max(launched.started, self._last_ready)  # overlaps counted once
        self.stats.busy_seconds += self._last_busy
        self._last_ready = ended
        if self.on_batch is not None:
            self.on_batch(launched.rows, launched.queue_seconds, ended - launched.started)
        return outcomes

    def _encode_jobs(self, jobs: list[EncodeJob]):
        """Yield `_OnDevice` batches and (job, error) pairs. On OOM: halve the jobs; a lone job is encoded in halves
        of its prompts; a lone prompt that still does not fit fails with `Overloaded`."""
        prompts = [p for job in jobs for p in job.prompts]
        prompts_2 = None if jobs[0].prompts_2 is None else [p for job in jobs for p in job.prompts_2]
        try:
            on_device = self._launch_rows(jobs, prompts, prompts_2, jobs[0].max_sequence_length)
        except torch.OutOfMemoryError:
            on_device = None  # retried outside the handler: its traceback pins the failed batch's activations
        except ModelNotReady as e:  # the model's worker process died or is restarting: retryable elsewhere
            yield from ((job, e) for job in jobs)
            return
        except Exception as e:  # noqa: BLE001 - every job of the batch must learn what happened
            logger.exception("encode failed on model %r", self.encoder.name)
            error = EncodeFailed(f"encode failed on model {self.encoder.name!r}: {type(e).__name__}: {e}")
            yield from ((job, error) for job in jobs)
            return
        if on_device is not None:
            yield on_device
            return
        if self.encoder.device.type == "cuda":
            torch.cuda.empty_cache()
        self.stats.oom_splits += 1
        if len(jobs) > 1:
            logger.warning("out of memory on a batch of %d requests (%d prompts); splitting it",
                           len(jobs), len(prompts))
            yield from self._encode_jobs(jobs[:len(jobs) // 2])
            yield from self._encode_jobs(jobs[len(jobs) // 2:])
        elif len(prompts) > 1:
            logger.warning("out of memory on one request of %d prompts; encoding it in halves", len(prompts))
            yield jobs[0], self._encode_halves(jobs[0])
        else:
            yield jobs[0], self._too_large(jobs[0])

    def _job_rows(self, on_device: "_OnDevice"):
        """Each job's rows of a batch, once they are on the host; rows with NaN or Inf fail their job."""
        try:
            on_device.wait()
        except ModelNotReady as e:  # the model's worker process died holding this batch
            return [(job, e) for job in on_device.jobs]
        except Exception as e:  # noqa: BLE001 - the device failed this batch (an illegal access, a lost device)
            logger.exception("encode failed on model %r", self.encoder.name)
            error = EncodeFailed(f"encode failed on model {self.encoder.name!r}: {type(e).__name__}: {e}")
            return [(job, error) for job in on_device.jobs]
        outcomes, start = [], 0
        for job in on_device.jobs:
            end = start + job.rows
            rows = {name: t[start:end] for name, t in on_device.host.items()}
            bad = [name for name, ok in on_device.finite.items() if not bool(ok[start:end].all())]
            start = end
            if bad:
                logger.error("model %r produced NaN/Inf in %s; not sent, not cached", self.encoder.name, bad)
                outcomes.append((job, EncodeFailed(
                    f"model {self.encoder.name!r} produced NaN or Inf in {', '.join(bad)}; refusing to send or cache "
                    "it (with --dtype fp16 T5 overflows: use bf16 or fp32)")))
            else:
                outcomes.append((job, rows))
        return outcomes

    def _encode_halves(self, job: EncodeJob):
        half = job.rows // 2
        parts = []
        for lo, hi in ((0, half), (half, job.rows)):
            sub = EncodeJob(job.prompts[lo:hi], None if job.prompts_2 is None else job.prompts_2[lo:hi],
                            job.max_sequence_length, job.deadline, job.future)
            [step] = self._encode_jobs([sub])
            [(_, outcome)] = self._job_rows(step) if isinstance(step, _OnDevice) else [step]
            if isinstance(outcome, Exception):
                return outcome
            parts.append(outcome)
        return {name: host_copy.concat([part[name] for part in parts]) for name in parts[0]}

    def _too_large(self, job: EncodeJob) -> Overloaded:
        return Overloaded(f"one prompt at max_sequence_length={job.max_sequence_length} does not fit in "
                          f"{self.encoder.device} memory on model {self.encoder.name!r}; send a shorter "
                          "max_sequence_length or use a server with more memory")

    def _launch_rows(self, jobs, prompts, prompts_2, max_sequence_length) -> "_OnDevice":
        """One forward pass, and per float output which rows are all finite, checked on the device (the CPU never
        scans the bytes): all of it queued for the host in one go, on the device's stream."""
        self.stats.encodes += 1
        launch = getattr(self.encoder, "launch", None)
        if launch is not None:  # a model worker in its own process flags the rows and copies to the host itself
            host, finite, ready = launch(prompts, prompts_2, max_sequence_length)
            return _OnDevice(jobs, host, finite, ready)
        out = self.encoder.encode(prompts, prompts_2, max_sequence_length)
        finite = {name: host_copy.finite_rows(t) for name, t in out.items() if host_copy.floating(t)}
        host, ready = host_copy.copy_to_host({**out, **{f"finite:{name}": ok for name, ok in finite.items()}})
        return _OnDevice(jobs, {name: host[name] for name in out}, {name: host[f"finite:{name}"] for name in finite},
                         ready)


@dataclass
class _OnDevice:
    """A batch whose outputs are on their way to the host: `wait()`, then read `host` and `finite`."""

    jobs: list[EncodeJob]
    host: dict[str, torch.Tensor]  # pinned buffers, filled by a copy queued on the device's stream
    finite: dict[str, torch.Tensor]
    ready: object = None  # a CUDA event recorded after the copies; None once (or when) the bytes are on the host

    def wait(self) -> None:
        if self.ready is not None:
            self.ready.synchronize()
            self.ready = None


@dataclass
class _Launched:
    rows: int
    queue_seconds: float
    started: float
    steps: list  # _OnDevice batches and (job, error) pairs, in the batch's order


def _hand_out(finished: asyncio.Future) -> None:
    if finished.cancelled():
        return
    for job, outcome in finished.result():
        if isinstance(outcome, Exception):
            _fail(job.future, outcome)
        elif not job.future.done():
            job.future.set_result(outcome)


def _fail(future: asyncio.Future, error: Exception) -> None:
    if not future.done():
        future.set_exception(error)
