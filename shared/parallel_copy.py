"""Large host copies, and CRC-32s, spread over a few plain threads.

One core copies 4 MiB at 5-6 GB/s on a typical GPU server's host (about 0.8 ms), while the memory system moves many
times that for several cores at once. An embedding's bytes are copied on the critical path of a call (into a
same-host client's shared memory by the server, out of it by the client), so those copies are split in slices of at
least `MIN_SLICE` bytes and copied by the calling thread and up to `threads() - 1` others at once. numpy copies without
the interpreter lock, and an idle helper sleeps on its queue: nothing spins between calls, unlike OpenMP's threads.

`crc32` checks a large buffer the same way, in slices whose CRCs zlib-ng joins (`crc32_combine`); without zlib-ng it
is zlib's, on the calling thread.

A host with few cores gets no helpers (the copy is the caller's alone); `PROMPTCAST_COPY_THREADS` sets the number of
threads that copy, the caller included (1: no helpers).
"""

from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

try:  # zlib-ng: zlib's CRC-32 with the CPU's carry-less multiply (10x zlib 1.3: 2 GB/s on a GPU box's core, 2 ms of
    # every FLUX.1 embedding on each side of the wire), and a way to join the CRCs of slices
    from zlib_ng.zlib_ng import crc32 as _crc32, crc32_combine as _combine
except ImportError:  # pragma: no cover - a platform without its wheel
    from zlib import crc32 as _crc32
    _combine = None

MIN_SLICE = 1 << 20  # below this, waking a thread costs about what it saves
MAX_THREADS = 4

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def threads() -> int:
    """How many threads copy a large buffer, the caller included: one per 4 usable cores, 1 to `MAX_THREADS`."""
    return _threads(os.environ.get("PROMPTCAST_COPY_THREADS"))


@functools.lru_cache(maxsize=None)
def _threads(configured: str | None) -> int:  # once per setting, not a system call per copy
    if configured:
        return max(1, int(configured))
    return max(1, min(MAX_THREADS, len(os.sched_getaffinity(0)) // 4 if hasattr(os, "sched_getaffinity")
                      else (os.cpu_count() or 1) // 4))


def _helpers(count: int) -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(count, thread_name_prefix="copy")
        return _pool


def _forget_pool() -> None:  # a forked child has none of its parent's threads
    global _pool, _lock
    _pool, _lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def copy_many(pairs) -> None:
    """`target[:] = source` for each (target, source) pair of equal-sized byte buffers (memoryviews, bytes,
    mmaps...), large ones split across threads; returns once every byte is copied."""
    slices = []
    count = threads()
    for target, source in pairs:
        target, source = np.frombuffer(target, dtype=np.uint8), np.frombuffer(source, dtype=np.uint8)
        if target.size != source.size:
            raise ValueError(f"copy of {source.size} bytes into {target.size}")
        slices.extend((target[a:b], source[a:b]) for a, b in _slices(source.size, count))
    if count == 1 or sum(source.size for _, source in slices) < 2 * MIN_SLICE:
        for target, source in slices:
            np.copyto(target, source)
        return
    pool = _helpers(count - 1)
    share = [slices[i::count] for i in range(count)]  # the caller copies the first share itself
    futures = [pool.submit(_copy_all, part) for part in share[1:] if part]
    _copy_all(share[0])
    for future in futures:
        future.result()


def crc32(data, value: int = 0) -> int:
    """zlib's CRC-32 of the bytes of `data` (a buffer), continuing `value`; a large buffer in slices on several
    threads (zlib-ng's CRC releases the interpreter lock)."""
    view = memoryview(data).cast("B")
    count = threads()
    (first, end), *rest = _slices(view.nbytes, count)
    if not rest or _combine is None:
        return _crc32(view, value)
    futures = [_helpers(count - 1).submit(_crc32, view[a:b]) for a, b in rest]
    crc = _crc32(view[first:end], value)
    for future, (a, b) in zip(futures, rest):
        crc = _combine(crc, future.result(), b - a)
    return crc


def _slices(size: int, count: int) -> list[tuple[int, int]]:
    """[start, end) bounds of a buffer of `size` bytes cut for `count` threads, none under `MIN_SLICE` (one piece for
    a small buffer, even an empty one)."""
    parts = max(1, min(count, size // MIN_SLICE))
    bounds = [size * i // parts for i in range(parts + 1)]
    return list(zip(bounds, bounds[1:]))


def _copy_all(slices) -> None:
    for target, source in slices:
        np.copyto(target, source)


__all__ = ["copy_many", "crc32", "threads", "MIN_SLICE"]
