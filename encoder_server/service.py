"""The encoder server's domain: validate a request, answer from the cache, batch the misses.

Nothing here knows about protobuf; the servicer converts at the edge.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from encoder_server.batcher import DynamicBatcher, EncodeJob
from encoder_server.cache import EmbeddingCache, Tensors
from encoder_server.errors import DeadlineExpired, EncodeFailed, InvalidInput, ModelNotReady, NotFound, RequestTooLarge
from encoder_server.families import Encoder
from shared.cache_keys import embedding_key
from shared.tensor_codec import PackedEmbedding, pack_tensors

logger = logging.getLogger(__name__)

WARMUP_PROMPT = "a warm-up prompt"


@dataclass(frozen=True)
class Limits:
    max_prompts_per_call: int = 64
    max_prompt_chars: int = 20_000


@dataclass
class Embedding:
    key: str
    cache_status: str  # "miss", "memory", "disk", "redis"
    tensors: Tensors | PackedEmbedding  # packed (ready for the wire): a miss, a memory hit; a lower tier's hit unpacked
    seconds: float = 0.0  # server time: queue + encode for a miss, lookup for a hit

    def tensor_dict(self) -> Tensors:
        """The tensors themselves, rebuilt (a copy) when the memory tier holds them in their wire form."""
        return self.tensors.tensors() if isinstance(self.tensors, PackedEmbedding) else self.tensors


class EmbeddingService:
    """Hosts encoders by name and turns encode requests into embeddings."""

    def __init__(self, cache: EmbeddingCache | None = None, limits: Limits = Limits(),
                 batcher_options: dict | None = None, metrics=None):
        self.cache = cache or EmbeddingCache([])
        self.limits = limits
        self.metrics = metrics
        self.batcher_options = batcher_options or {}
        self.encoders: dict[str, Encoder] = {}
        self.batchers: dict[str, DynamicBatcher] = {}
        self.ready = False
        self.draining = False
        self._in_flight: dict[str, tuple[asyncio.Future, EncodeJob]] = {}  # cache key -> (result, job)
        self._variable: dict[str, frozenset[str]] = {}

    def add(self, encoder: Encoder) -> None:
        if encoder.name in self.encoders:
            raise ValueError(f"two --model entries are named {encoder.name!r}; use NAME=SRC to tell them apart")
        on_batch = self.metrics.observe_batch if self.metrics is not None else None
        self.encoders[encoder.name] = encoder
        self.batchers[encoder.name] = DynamicBatcher(encoder, **self.batcher_options, on_batch=on_batch,
                                                     pack=_pack)

    async def start(self) -> None:
        """Start the batchers and run one warm-up encode per model; then the service is ready."""
        for batcher in self.batchers.values():
            batcher.start()
        for name, encoder in self.encoders.items():
            started = time.perf_counter()
            await self.batchers[name].warm_up(WARMUP_PROMPT)
            logger.info("model %r warm (%.2fs)", name, time.perf_counter() - started)
        self.ready = True

    async def close(self) -> None:
        for batcher in self.batchers.values():
            await batcher.close()
        await asyncio.to_thread(self.cache.flush)  # entries still being written to disk or Redis land

    def model(self, name: str | None) -> Encoder:
        if not name:
            if len(self.encoders) == 1:
                return next(iter(self.encoders.values()))
            raise InvalidInput(f"this server hosts several models ({', '.join(self.encoders)}): name one")
        if name not in self.encoders:
            raise NotFound(f"model {name!r} is not hosted here; hosted: {', '.join(self.encoders)}")
        return self.encoders[name]

    def variable_outputs(self, name: str | None) -> frozenset[str]:
        """The names of a model's variable-length outputs (their wire specs say so)."""
        encoder = self.model(name)
        if encoder.name not in self._variable:
            self._variable[encoder.name] = frozenset(o.name for o in encoder.outputs if o.variable_length)
        return self._variable[encoder.name]

    def validate(self, encoder: Encoder, prompts: list[str], prompts_2: list[str] | None,
                 max_sequence_length: int) -> None:
        if not prompts:
            raise InvalidInput("prompts is empty: send at least one prompt")
        if len(prompts) > self.limits.max_prompts_per_call:
            raise RequestTooLarge(f"{len(prompts)} prompts in one call is over {self.limits.max_prompts_per_call}, "
                               "the limit per call (--max-prompts-per-call); split the request")
        if prompts_2 is not None and not encoder.takes_prompt_2:
            raise InvalidInput(f"prompts_2 was given, but model {encoder.name!r} ({encoder.family}) has one text "
                               "encoder: send prompts only")
        if prompts_2 is not None and len(prompts_2) != len(prompts):
            raise InvalidInput(f"prompts_2 has {len(prompts_2)} entries but prompts has {len(prompts)}; "
                               "send one prompt_2 per prompt or none")
        for i, text in enumerate(prompts + (prompts_2 or [])):
            if len(text) > self.limits.max_prompt_chars:
                raise RequestTooLarge(f"prompt {i % len(prompts)} has {len(text)} characters, over "
                                   f"{self.limits.max_prompt_chars}, the limit (--max-prompt-chars)")
        if not 1 <= max_sequence_length <= encoder.max_sequence_length_limit:
            raise InvalidInput(f"max_sequence_length={max_sequence_length} is over "
                               f"{encoder.max_sequence_length_limit}, the limit of model {encoder.name!r}"
                               if max_sequence_length > 0 else
                               f"max_sequence_length={max_sequence_length} must be at least 1")

    async def encode(self, model: str | None, prompts: list[str], prompts_2: list[str] | None = None,
                     max_sequence_length: int = 0, deadline: float | None = None) -> list[Embedding]:
        """Embeddings for every prompt, in order; identical work is shared, not repeated."""
        if self.draining:
            raise ModelNotReady("the server is shutting down; retry on another replica")
        if not self.ready:
            raise ModelNotReady("the server is still loading and warming its models; retry shortly")
        encoder = self.model(model)
        max_sequence_length = max_sequence_length or encoder.default_max_sequence_length
        self.validate(encoder, prompts, prompts_2, max_sequence_length)
        keys = [embedding_key(encoder.fingerprint, max_sequence_length, p, None if prompts_2 is None else prompts_2[i])
                for i, p in enumerate(prompts)]
        results: dict[str, Embedding] = {}
        unique = list(dict.fromkeys(keys))
        for key in unique:  # memory: on the loop, no thread hop
            started = time.perf_counter()
            hit = self.cache.get_fast(key)
            if hit is not None:
                results[key] = Embedding(key, hit[1], hit[0], time.perf_counter() - started)
        slow = [k for k in unique if k not in results and k not in self._in_flight]
        if slow and self.cache.has_slow_tiers:
            started = time.perf_counter()
            hits = await asyncio.to_thread(lambda: {key: self.cache.get(key) for key in slow})  # disk, Redis: one hop
            for key, hit in hits.items():
                if hit is not None:
                    results[key] = Embedding(key, hit[1], hit[0], time.perf_counter() - started)
            # A flight can finish (cached, then forgotten) while that lookup ran in its thread: re-check the
            # in-process tier now, on the loop, so that prompt is not encoded a second time.
            for key in [k for k in unique if k not in results and k not in self._in_flight]:
                hit = self.cache.get_fast(key)
                if hit is not None:
                    results[key] = Embedding(key, hit[1], hit[0], 0.0)
        todo = [i for i, key in enumerate(keys) if key not in results and keys.index(key) == i]
        mine = [i for i in todo if keys[i] not in self._in_flight]
        own = None
        if mine:
            own = self._start_flight(encoder, [keys[i] for i in mine], [prompts[i] for i in mine],
                                     None if prompts_2 is None else [prompts_2[i] for i in mine],
                                     max_sequence_length, deadline)
        # Single flight: a prompt another request is already encoding is waited for, not queued twice. The job
        # then counts this request as a waiter and runs until the latest waiter's deadline.
        flights = {keys[i]: self._in_flight[keys[i]] for i in todo}
        jobs = list({id(job): job for _, job in flights.values()}.values())
        for job in jobs:
            if job is not own:
                job.join(deadline)
        try:
            for key, (future, _) in flights.items():
                results[key] = await asyncio.shield(future)
        finally:
            # Gone (cancelled, deadline) or failed: a job nobody waits for is dropped before GPU work.
            for job in jobs:
                job.leave()
        answered = [results[key] for key in keys]
        if self.metrics is not None:
            self.metrics.observe_cache([e.cache_status for e in answered])
        return answered

    def _start_flight(self, encoder, keys, prompts, prompts_2, max_sequence_length, deadline) -> EncodeJob:
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExpired("the request's deadline passed before it could be queued")
        job = self.batchers[encoder.name].submit(prompts, prompts_2, max_sequence_length, deadline)
        loop = asyncio.get_running_loop()
        futures = {key: loop.create_future() for key in keys}
        self._in_flight.update({key: (futures[key], job) for key in keys})
        started = time.perf_counter()
        # The job's outcome is published by a callback, not by the request that queued it: that request may be
        # cancelled while others still wait for the same prompts.
        job.future.add_done_callback(
            lambda done: self._settle(done, job, keys, futures, time.perf_counter() - started))
        return job

    def _settle(self, done: asyncio.Future, job: EncodeJob, keys, futures, seconds: float) -> None:
        """Cache, then answer: a request that follows this one's answer must find the entry. The batcher's finishing
        thread packed each prompt for the wire; the memory tier only files it, here on the loop (disk and Redis are
        written in the background), and the answer goes out with no other thread in between."""
        error = ModelNotReady("the encode was cancelled") if done.cancelled() else done.exception()
        if error is None:  # a prompt that could not be packed: nothing to send or cache, the batcher goes on
            error = next((packed for packed in job.packed if isinstance(packed, Exception)), None)
        if error is not None:
            for future in futures.values():
                future.set_exception(error)
                future.exception()  # retrieved: nobody may be waiting any more
            self._forget(futures)
            return
        rows = done.result()
        for i, (key, packed) in enumerate(zip(keys, job.packed)):
            self.cache.put(key, {name: t[i] for name, t in rows.items()}, packed=packed)
            futures[key].set_result(Embedding(key, "miss", packed, seconds))
        self._forget(futures)

    def _forget(self, futures) -> None:
        for key, future in futures.items():
            if self._in_flight.get(key, (None,))[0] is future:
                del self._in_flight[key]


def _pack(tensors: Tensors) -> PackedEmbedding | EncodeFailed:
    """What the batcher's finishing thread makes of each prompt: its wire form, or the error that stopped it."""
    try:
        return pack_tensors(tensors)
    except Exception as e:  # noqa: BLE001 - one request's failure, never the batcher's
        logger.exception("could not pack an embedding for the wire")
        return EncodeFailed(f"could not pack the embedding for the wire: {type(e).__name__}: {e}")


def describe(encoder: Encoder) -> dict:
    """Model info as plain data (the servicer turns it into protobuf)."""
    return {
        "name": encoder.name, "family": encoder.family, "source": encoder.source.source,
        "fingerprint": encoder.fingerprint, "outputs": encoder.outputs,
        "default_max_sequence_length": encoder.default_max_sequence_length,
        "max_max_sequence_length": encoder.max_sequence_length_limit,
    }


def deadline_from(time_remaining: float | None) -> float | None:
    return None if time_remaining is None else time.monotonic() + time_remaining


__all__ = ["EmbeddingService", "Embedding", "Limits", "describe", "deadline_from"]
