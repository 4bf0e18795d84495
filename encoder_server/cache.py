"""Content-addressed embedding cache: tiers looked up in order, upper tiers filled on a lower hit.

A tier stores `{name: CPU tensor}` under a key and must verify what it returns: a tier that finds a
damaged or foreign entry deletes it, logs it and reports a miss, so a wrong embedding is never
served. Slow tiers (disk, Redis) are called from a worker thread by the service.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import torch

from shared.tensor_codec import PackedEmbedding, pack_tensors

logger = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]


class CacheTier(Protocol):
    name: str  # "memory", "disk", "redis": the cache status a hit reports

    def get(self, key: str) -> Tensors | None: ...

    def put(self, key: str, tensors: Tensors) -> None: ...


def nbytes(tensors: Tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def default_memory_bytes() -> int:
    """The `--cache-mem` default: 10% of this host's RAM, at most 4 GiB (1000 FLUX.1 prompts)."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a small box
        ram = 8 << 30
    return min(4 << 30, ram // 10)


class MemoryTier:
    """LRU bounded in bytes. Entries are kept as they go on the wire (`PackedEmbedding`: checksums computed, chunk
    messages serialized), so a hit is sent with no CRC and no copy; `get` rebuilds tensors for other readers."""

    name = "memory"
    fast = True  # cheap enough to consult on the event loop (single flight re-checks it)

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, PackedEmbedding] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get_packed(self, key: str) -> PackedEmbedding | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def get(self, key: str) -> Tensors | None:
        entry = self.get_packed(key)
        return None if entry is None else entry.tensors()

    def put(self, key: str, tensors: Tensors | PackedEmbedding) -> PackedEmbedding | None:
        """Keep `tensors` (packing them: the chunks own their bytes, so a row view of a batch never keeps the whole
        batch alive); the packed entry, or None when it is larger than the whole bound."""
        if not isinstance(tensors, PackedEmbedding) and nbytes(tensors) > self.max_bytes:
            return None
        packed = tensors if isinstance(tensors, PackedEmbedding) else pack_tensors(tensors)
        size = packed.nbytes
        if size > self.max_bytes:
            return None
        with self._lock:
            if key in self._entries:
                self.bytes -= self._entries.pop(key).nbytes
            self._entries[key] = packed
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= evicted.nbytes
        return packed

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0


class EmbeddingCache:
    """Looks keys up tier by tier; a hit in a lower tier is copied into the tiers above it.

    That copy goes into in-process tiers at once and into slow ones (disk) on a background thread:
    a Redis hit must not wait for a 15 MiB fsync before it is answered.
    """

    def __init__(self, tiers: list[CacheTier]):
        self.tiers = tiers
        self._refill = ThreadPoolExecutor(1, thread_name_prefix="cache-refill")

    @property
    def has_slow_tiers(self) -> bool:
        """Whether a lookup can need I/O (disk, Redis): then it belongs on a worker thread."""
        return any(not getattr(tier, "fast", False) for tier in self.tiers)

    def get_fast(self, key: str) -> tuple[Tensors | PackedEmbedding, str] | None:
        """Look only in the in-process tiers (no I/O): safe to call on the event loop. A memory hit comes packed."""
        for tier in self.tiers:
            if getattr(tier, "fast", False):
                found = tier.get_packed(key) if hasattr(tier, "get_packed") else tier.get(key)
                if found is not None:
                    return found, tier.name
        return None

    def stats(self) -> dict[str, dict]:
        """Per tier: entries/bytes, and for Redis its health and error count (logs and metrics read this)."""
        out = {}
        for tier in self.tiers:
            if hasattr(tier, "max_bytes"):  # memory, disk: counters kept in memory, no scan
                out[tier.name] = {"entries": len(tier), "bytes": tier.bytes, "max_bytes": tier.max_bytes}
            else:
                out[tier.name] = tier.stats()
        return out

    def get(self, key: str) -> tuple[Tensors | PackedEmbedding, str] | None:
        """The first tier's hit (packed when the memory tier above it was filled with it), and that tier's name."""
        for level, tier in enumerate(self.tiers):
            try:
                tensors = tier.get(key)
            except Exception:  # noqa: BLE001 - a broken tier is a miss, never an outage
                logger.exception("cache tier %s failed on get; treating as a miss", tier.name)
                continue
            if tensors is not None:
                packed = self._fill(self.tiers[:level], key, tensors)
                return packed or tensors, tier.name
        return None

    def put(self, key: str, tensors: Tensors, packed: PackedEmbedding | None = None) -> PackedEmbedding | None:
        """Store in every tier (`packed`: the same tensors already packed for the wire, what the memory tier keeps);
        the memory tier's packed entry, if there is one (send that: it is packed already)."""
        return self._fill(self.tiers, key, tensors, packed)

    def _fill(self, tiers: list[CacheTier], key: str, tensors: Tensors, packed: PackedEmbedding | None = None
              ) -> PackedEmbedding | None:
        """In-process tiers at once (a request that follows must find the entry); disk and Redis on the
        background thread, so no answer waits for an fsync or a network round trip."""
        slow, given, packed = [], packed, None
        for tier in tiers:
            if getattr(tier, "fast", False):
                stored = self._put(tier, key, given if given is not None and hasattr(tier, "get_packed") else tensors)
                packed = stored if isinstance(stored, PackedEmbedding) else packed
            else:
                slow.append(tier)
        if slow:
            self._refill.submit(self._put_slow, slow, key, tensors)
        return packed

    def flush(self) -> None:
        """Wait for the background writes queued so far (tests, shutdown)."""
        self._refill.submit(lambda: None).result()

    @classmethod
    def _put_slow(cls, tiers: list[CacheTier], key: str, tensors: Tensors) -> None:
        """Pack the entry once (checksums and a copy of 4-15 MiB) for every tier that stores bytes."""
        from shared.disk_cache import pack

        data = None
        for tier in tiers:
            if not hasattr(tier, "put_packed"):
                cls._put(tier, key, tensors)
                continue
            if data is None:
                try:
                    data = pack(key, tensors)
                except Exception:  # noqa: BLE001 - logged like a failed put; the answer is already sent
                    logger.exception("could not pack cache entry %s for %s", key, tier.name)
                    return
            cls._put(tier, key, data, tier.put_packed)

    @staticmethod
    def _put(tier: CacheTier, key: str, value, put=None):
        try:
            return (put or tier.put)(key, value)
        except Exception:  # noqa: BLE001
            logger.exception("cache tier %s failed on put", tier.name)
            return None


def build_cache(mem_bytes: int, directory=None, disk_max_bytes: int = 0, redis_url: str | None = None
                ) -> EmbeddingCache:
    """Memory -> disk -> Redis, each tier present only when configured (0 bytes / None disables it)."""
    tiers: list[CacheTier] = []
    if mem_bytes > 0:
        tiers.append(MemoryTier(mem_bytes))
    if directory is not None and str(directory).lower() != "none" and disk_max_bytes > 0:
        from shared.disk_cache import DiskTier

        tiers.append(DiskTier(directory, disk_max_bytes))
    if redis_url:
        from encoder_server.redis_cache import RedisTier

        tiers.append(RedisTier(redis_url))
    logger.info("embedding cache tiers: %s", " -> ".join(
        f"{t.name} ({getattr(t, 'directory', None) or getattr(t, 'url', None) or _gib(t.max_bytes)})"
        for t in tiers) or "none")
    return EmbeddingCache(tiers)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
