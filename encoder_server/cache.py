"""Content-addressed embedding cache: tiers looked up in order, upper tiers filled on a lower hit.

A tier stores `{name: CPU tensor}` under a key and must verify what it returns: a tier that finds a
damaged or foreign entry deletes it, logs it and reports a miss, so a wrong embedding is never
served. Slow tiers (disk, Redis) are called from a worker thread by the service.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Protocol

import torch

logger = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]


class CacheTier(Protocol):
    name: str  # "memory", "disk", "redis": the cache status a hit reports

    def get(self, key: str) -> Tensors | None: ...

    def put(self, key: str, tensors: Tensors) -> None: ...


def nbytes(tensors: Tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class MemoryTier:
    """LRU bounded in bytes."""

    name = "memory"

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, Tensors] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Tensors | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: str, tensors: Tensors) -> None:
        size = nbytes(tensors)
        if size > self.max_bytes:
            return
        # Own the storage: a row view would keep its whole batch alive and break the byte bound.
        tensors = {name: t.clone() for name, t in tensors.items()}
        with self._lock:
            if key in self._entries:
                self.bytes -= nbytes(self._entries.pop(key))
            self._entries[key] = tensors
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= nbytes(evicted)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0


class EmbeddingCache:
    """Looks keys up tier by tier; a hit in a lower tier is copied into the tiers above it."""

    def __init__(self, tiers: list[CacheTier]):
        self.tiers = tiers

    def get(self, key: str) -> tuple[Tensors, str] | None:
        for level, tier in enumerate(self.tiers):
            try:
                tensors = tier.get(key)
            except Exception:  # noqa: BLE001 - a broken tier is a miss, never an outage
                logger.exception("cache tier %s failed on get; treating as a miss", tier.name)
                continue
            if tensors is not None:
                for upper in self.tiers[:level]:
                    self._put(upper, key, tensors)
                return tensors, tier.name
        return None

    def put(self, key: str, tensors: Tensors) -> None:
        for tier in self.tiers:
            self._put(tier, key, tensors)

    @staticmethod
    def _put(tier: CacheTier, key: str, tensors: Tensors) -> None:
        try:
            tier.put(key, tensors)
        except Exception:  # noqa: BLE001
            logger.exception("cache tier %s failed on put", tier.name)
