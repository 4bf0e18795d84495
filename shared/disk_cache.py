"""Embedding cache entries as safetensors bytes, and the disk tier that keeps one file per entry.

One format serves every tier that leaves the process (the server's disk and Redis tiers, the client's
local tier, `promptcast cache`): a safetensors blob whose metadata names the entry's key and, per
tensor, its dtype, shape and CRC-32. safetensors itself checks that the header and the byte ranges
agree (a truncated file fails to parse); the checksums catch flipped bits inside the data, and the
key catches an entry copied or written under another address (another model, dtype or length).
`unpack` checks all of it, so a damaged or foreign entry is a miss, never a wrong embedding.
Nothing here can execute code from a file: safetensors only ever reads raw bytes into tensors.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from shared.atomic_files import write_atomically
from shared.config import cache_home
from shared.tensor_codec import DTYPE_NAMES, checksum, tensor_bytes

logger = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]
FORMAT = "promptcast-embedding/1"
SUFFIX = ".safetensors"
_KEY = re.compile(r"^[0-9a-f]{64}$")
_MAX_HEADER = 1 << 20  # an entry's JSON header is a few hundred bytes; refuse absurd claims


class CorruptEntry(ValueError):
    """Bytes that are not a valid cache entry for the key they were looked up under."""


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/promptcast/embeddings`, else `~/.cache/promptcast/embeddings`."""
    return cache_home() / "embeddings"


def pack(key: str, tensors: Tensors) -> bytes:
    """One entry as safetensors bytes: the tensors plus {format, key, created, tensors: {name: spec}}."""
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    specs = {name: {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "checksum": checksum(tensor_bytes(t))}
             for name, t in tensors.items()}
    metadata = {"format": FORMAT, "key": key, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "tensors": json.dumps(specs, sort_keys=True)}
    return st_save(tensors, metadata)


def read_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of safetensors bytes, read from the header alone."""
    if len(data) < 8:
        raise CorruptEntry(f"{len(data)} bytes is too short for a safetensors header")
    (size,) = struct.unpack("<Q", data[:8])
    if size > min(_MAX_HEADER, len(data) - 8):
        raise CorruptEntry(f"header claims {size} bytes but the entry has {len(data)}")
    try:
        header = json.loads(data[8:8 + size])
    except ValueError as e:
        raise CorruptEntry(f"unreadable header: {e}") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise CorruptEntry("not a promptcast cache entry (no or foreign metadata)")
    return metadata


def unpack(key: str, data: bytes) -> Tensors:
    """Tensors of an entry, after checking its key, tensor names, dtypes, shapes and checksums."""
    metadata = read_metadata(data)
    if metadata.get("key") != key:
        raise CorruptEntry(f"entry holds key {str(metadata.get('key'))[:16]}..., not {key[:16]}... "
                           "(written for another model, dtype, length or prompt)")
    try:
        specs = json.loads(metadata["tensors"])
        tensors = st_load(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type on truncated data
        raise CorruptEntry(f"unreadable tensors: {type(e).__name__}: {e}") from None
    if set(specs) != set(tensors):
        raise CorruptEntry(f"tensors {sorted(tensors)} differ from the metadata's {sorted(specs)}")
    for name, tensor in tensors.items():
        spec = specs[name]
        if DTYPE_NAMES.get(tensor.dtype) != spec["dtype"] or list(tensor.shape) != spec["shape"]:
            raise CorruptEntry(f"tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, metadata says "
                               f"{spec['dtype']} {spec['shape']}")
        if checksum(tensor_bytes(tensor)) != spec["checksum"]:
            raise CorruptEntry(f"tensor {name!r}: checksum mismatch (bit rot or tampering)")
    return tensors


@dataclass
class Problem:
    path: Path
    reason: str


class DiskTier:
    """One safetensors file per entry under `directory/<key[:2]>/<key>.safetensors`, LRU past `max_bytes`.

    Recency is the file's mtime, bumped on every hit (atime is unreliable under relatime/noatime), so
    it survives restarts. The byte total is tracked in memory and rebuilt by a scan at start-up; other
    processes writing the same folder are tolerated (their files are counted at the next scan, and a
    file that vanished under us is just a miss).
    """

    def __init__(self, directory: str | os.PathLike, max_bytes: int, name: str = "disk"):
        self.directory = Path(directory).expanduser()
        self.max_bytes = max_bytes
        self.name = name
        self.corrupt = 0  # entries found damaged or foreign, and deleted
        self._lock = threading.Lock()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._sizes: OrderedDict[str, int] = OrderedDict()  # key -> bytes, least recently used first
        self.bytes = 0  # their total, kept as entries come and go
        self._scan()

    def __len__(self) -> int:
        return len(self._sizes)

    def path(self, key: str) -> Path:
        if not _KEY.match(key):
            raise ValueError(f"cache key {key!r} is not 64 lowercase hex digits")
        return self.directory / key[:2] / f"{key}{SUFFIX}"

    def _scan(self) -> None:
        stale_before = time.time() - 3600
        found = []
        for path in self.directory.glob("*/*"):
            try:
                stat = path.stat()
                if path.name.endswith(".tmp"):
                    if stat.st_mtime < stale_before:  # left by a writer that crashed an hour ago or more
                        path.unlink(missing_ok=True)
                elif path.name.endswith(SUFFIX) and _KEY.match(path.name[:-len(SUFFIX)]):
                    found.append((stat.st_mtime, path.name[:-len(SUFFIX)], stat.st_size))
            except OSError:
                continue
        for _, key, size in sorted(found):
            self._record(key, size)
        self._evict()

    def get(self, key: str) -> Tensors | None:
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self._forget(key)
            return None
        try:
            tensors = unpack(key, data)
        except CorruptEntry as e:
            self.corrupt += 1
            logger.warning("%s cache: %s is damaged (%s); deleted, treating it as a miss", self.name, path, e)
            self.delete(key)
            return None
        now = time.time()
        try:
            os.utime(path, (now, now))
        except OSError:
            pass
        self._record(key, len(data))
        return tensors

    def put(self, key: str, tensors: Tensors) -> None:
        self.put_packed(key, pack(key, tensors))

    def put_packed(self, key: str, data: bytes) -> None:
        """Store an entry already `pack`ed (the cache packs once for every slow tier)."""
        if len(data) > self.max_bytes:
            return
        write_atomically(self.path(key), data)  # makes the key's subfolder
        self._record(key, len(data))
        self._evict()

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)
        self._forget(key)

    def _record(self, key: str, size: int) -> None:
        """`key` holds `size` bytes and was just used (the most recent entry)."""
        with self._lock:
            self.bytes += size - self._sizes.pop(key, 0)
            self._sizes[key] = size

    def _forget(self, key: str) -> None:
        with self._lock:
            self.bytes -= self._sizes.pop(key, 0)

    def _evict(self) -> None:
        victims = []
        with self._lock:
            while self.bytes > self.max_bytes and self._sizes:
                key, size = self._sizes.popitem(last=False)
                self.bytes -= size
                victims.append(key)
        for key in victims:
            self.path(key).unlink(missing_ok=True)

    # The `promptcast cache` commands.

    def entries(self) -> list[tuple[str, Path, int, float]]:
        """(key, path, bytes, last access) of every entry on disk now, oldest access first."""
        found = []
        for path in self.directory.glob(f"*/*{SUFFIX}"):
            key = path.name[:-len(SUFFIX)]
            try:
                stat = path.stat()
            except OSError:
                continue
            found.append((key, path, stat.st_size, stat.st_mtime))
        return sorted(found, key=lambda e: e[3])

    def stats(self) -> dict:
        entries = self.entries()
        temp = list(self.directory.glob("*/*.tmp"))
        return {"directory": str(self.directory), "entries": len(entries), "bytes": sum(e[2] for e in entries),
                "max_bytes": self.max_bytes, "temp_files": len(temp),
                "oldest_access": min((e[3] for e in entries), default=None),
                "newest_access": max((e[3] for e in entries), default=None)}

    def verify(self, delete: bool = False) -> tuple[int, list[Problem]]:
        """Check every entry (key, names, dtypes, shapes, checksums); returns (entries checked, problems)."""
        problems = []
        entries = self.entries()
        for key, path, _, _ in entries:
            try:
                unpack(key, path.read_bytes())
            except (CorruptEntry, OSError) as e:
                problems.append(Problem(path, str(e)))
                if delete:
                    path.unlink(missing_ok=True)
        return len(entries), problems

    def clear(self) -> tuple[int, int]:
        """Delete every entry and temp file; returns (files removed, bytes freed)."""
        removed = freed = 0
        for path in [*self.directory.glob(f"*/*{SUFFIX}"), *self.directory.glob("*/*.tmp")]:
            try:
                size = path.stat().st_size
                path.unlink()
            except OSError:
                continue
            removed, freed = removed + 1, freed + size
        with self._lock:
            self._sizes.clear()
            self.bytes = 0
        return removed, freed
