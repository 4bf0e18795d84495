"""Embeddings a server publishes in its own shared memory, read in place by clients on its host.

A memory hit for a client on the server's host (one that offered shared memory, `shared.shared_memory`) is otherwise
copied into that client's arena: 4 MiB written by the server, then read by the client from another core's cache.
Instead, the first time a memory-tier entry is sent that way, the server copies it into a slab of its own (a POSIX
shared-memory object, `promptcast-` and 32 hex digits, of this user only), and every later hit of that entry, from any
client on the host, only names the slab and the offset (`SharedMemorySlice.name`): no copy on either side.

A published entry never changes: each is one version of its key (its specs and checksums), a slab is only ever
appended to (each entry from a page boundary), and a slab is unlinked, never reused, once it has not been named in
an answer for `idle_seconds` and room is needed. A client maps each slab once, copy-on-write (`Slabs`): tensors lent
over it may be written by the caller without reaching the server's bytes or another client's. The client checks the
CRC-32s as for any other answer; a mapping whose bytes the caller changed (and so fails that check) is mapped again,
and a slab gone before the client opened it fails the call as retriable (`SlabGone`).

Clients say they read slabs (`SharedMemoryTarget.reads_published`); a server never names one to any other.
"""

from __future__ import annotations

import logging
import mmap
import os
import stat
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from shared.parallel_copy import copy_many
from shared.shared_memory import _NAME, PREFIX, SHM_DIR, allocated

logger = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE


def _paged(n: int) -> int:
    return -(-n // PAGE) * PAGE


@dataclass(eq=False)
class _Slab:
    memory: object  # multiprocessing.shared_memory.SharedMemory
    size: int
    end: int = 0  # where the next entry goes
    keys: list[str] = field(default_factory=list)
    used_at: float = field(default_factory=time.monotonic)  # last named in an answer (or made)
    writers: int = 0  # copies into it under way
    inode: int = 0  # of its file: a slab whose name is another file now was unlinked by someone else

    @property
    def name(self) -> str:
        return self.memory.name.lstrip("/")


@dataclass(frozen=True)
class Reservation:
    """Room for one entry in a slab, written and then published by `Publisher.publish`."""

    key: str
    version: tuple  # what the bytes are: the entry's tensor specs, checksums included
    slab: _Slab
    offset: int
    nbytes: int


class Publisher:
    """The server's side: which entries are published where, within `max_bytes` of slabs of `slab_bytes` (or one
    entry's size, if larger).

    `find` and `reserve` are for the event loop: neither waits. A reservation that needs a new slab returns None and
    makes one on `executor` (`grow`), so the loop never waits for /dev/shm to allocate pages; until then answers are
    copied into each client's arena, as without publishing."""

    def __init__(self, max_bytes: int = 512 << 20, slab_bytes: int = 64 << 20, idle_seconds: float = 30.0,
                 executor=None):
        self.max_bytes, self.slab_bytes, self.idle_seconds = max_bytes, slab_bytes, idle_seconds
        self.executor = executor
        self.slabs: list[_Slab] = []  # oldest first; the last is appended to
        self.index: dict[str, tuple[_Slab, int, tuple]] = {}  # key -> (slab, offset, version), once written
        self.pending: set[str] = set()  # keys being written
        self.lock = threading.Lock()
        self._growing = False
        self._retry_at = 0.0  # after /dev/shm had no room: no new slab before then
        self.closed = False

    @property
    def held_bytes(self) -> int:
        return sum(slab.size for slab in self.slabs)

    def find(self, key: str, version: tuple) -> tuple[str, int] | None:
        """Where `key`'s bytes are published: (slab name, offset); None if they are not (yet), if what is published is
        another version of the entry (the same key encoded again, in another batch or by another replica, whose bytes
        may differ in the last bit: `version` is the one being answered, its specs and checksums), or if their slab is
        no longer in /dev/shm under its name (something else unlinked it: it is dropped, and the entry published
        anew)."""
        with self.lock:
            found = self.index.get(key)
            if found is None or found[2] != version:
                return None
            slab = found[0]
            try:
                there = os.stat(os.path.join(SHM_DIR, slab.name)).st_ino == slab.inode
            except OSError:
                there = False
            if not there:
                logger.warning("slab %s of published embeddings was unlinked by something else; dropping it", slab.name)
                if slab.writers == 0:
                    self._unlink(slab)
                return None
            slab.used_at = time.monotonic()
            return slab.name, found[1]

    def reserve(self, key: str, version: tuple, nbytes: int) -> Reservation | None:
        """Room for this version of `key`'s `nbytes` in the newest slab; None if it is published or being written
        already, or if there is no room now (a new slab is then made in the background)."""
        with self.lock:
            if self.closed or key in self.pending or self.index.get(key, (None, None, None))[2] == version:
                return None
            slab = self.slabs[-1] if self.slabs else None
            if slab is not None and slab.end + nbytes <= slab.size:
                offset, slab.end = slab.end, _paged(slab.end + nbytes)  # entries never share a page
                slab.writers += 1
                self.pending.add(key)
                return Reservation(key, version, slab, offset, nbytes)
            grow = not self._growing and time.monotonic() >= self._retry_at
            self._growing = self._growing or grow
        if grow:
            if self.executor is None:
                self.grow(nbytes)
            else:
                self.executor.submit(self.grow, nbytes)
        return None

    def publish(self, reservation: Reservation, pieces) -> tuple[str, int] | None:
        """Copy an entry's buffers, in order, into its reservation, then publish it: (slab name, offset). On any
        thread; the entry is published once its copy is done, whatever became of the call that asked for it."""
        buf, offset, copies, written = reservation.slab.memory.buf, reservation.offset, [], False
        try:
            for piece in pieces:
                copies.append((buf[offset:offset + piece.nbytes], piece))
                offset += piece.nbytes
            copy_many(copies)
            written = offset - reservation.offset == reservation.nbytes
        finally:
            copies.clear()  # the slab's views, released before it can be unlinked
            published = self._commit(reservation, written)
        return published

    def _commit(self, reservation: Reservation, written: bool) -> tuple[str, int] | None:
        with self.lock:
            slab = reservation.slab
            slab.writers -= 1
            self.pending.discard(reservation.key)
            if not written or self.closed or slab not in self.slabs:
                return None
            slab.keys.append(reservation.key)
            slab.used_at = time.monotonic()
            self.index[reservation.key] = (slab, reservation.offset, reservation.version)
            return slab.name, reservation.offset

    def grow(self, nbytes: int) -> None:
        """Make a new slab for entries of `nbytes` or less, first unlinking the oldest slabs idle for `idle_seconds`
        while the new one would not fit `max_bytes`; none made if those do not make room."""
        try:
            self._grow(max(min(self.slab_bytes, self.max_bytes), _paged(nbytes)))
        finally:
            with self.lock:
                self._growing = False

    def _grow(self, size: int) -> None:
        with self.lock:
            now = time.monotonic()
            while self.held_bytes + size > self.max_bytes:
                idle = [s for s in self.slabs if now - s.used_at >= self.idle_seconds and s.writers == 0]
                if not idle:
                    return  # every slab was named lately: answers are copied until one has been idle long enough
                self._unlink(idle[0])
        try:
            memory = allocated(size, PREFIX + uuid.uuid4().hex)  # every page now: off the loop
        except OSError as e:
            logger.warning("no room in %s for a %d MiB slab of published embeddings (%s): same-host hits are "
                           "copied into each client's memory for a minute", SHM_DIR, size >> 20, e)
            self._retry_at = time.monotonic() + 60
            return
        with self.lock:
            if self.closed:
                _close(memory)
                return
            self.slabs.append(_Slab(memory, size, inode=os.fstat(memory._fd).st_ino))

    def _unlink(self, slab: _Slab) -> None:
        self.slabs.remove(slab)
        for key in slab.keys:
            if self.index.get(key, (None,))[0] is slab:
                del self.index[key]
        _close(slab.memory)

    def close(self) -> None:
        """Unlink every slab (clients keep what they mapped until they let go of it)."""
        with self.lock:
            self.closed = True
            for slab in list(self.slabs):
                if slab.writers == 0:
                    self._unlink(slab)


def _close(memory) -> None:
    try:
        memory.unlink()
    except FileNotFoundError:
        pass
    try:
        memory.close()
    except BufferError:  # a copy still holds a view: the mapping goes with it
        pass


class SlabGone(Exception):
    """A slab an answer named was gone when this client went to read it (the server unlinked it, or is another
    server's); the call is retriable: the next attempt publishes the entry anew, or copies it."""


class Slabs:
    """The client's side: each server slab mapped once, copy-on-write, at most `keep` at a time (an old mapping lives
    on under the arrays lent over it)."""

    def __init__(self, keep: int = 32):
        self.keep = keep
        self.mapped: OrderedDict[str, mmap.mmap] = OrderedDict()
        self.lent: dict[tuple[int, int], int] = {}  # (id of a mapping, offset) -> arrays alive over those bytes
        self.lock = threading.Lock()

    def mapping(self, name: str, fresh: bool = False) -> mmap.mmap:
        """Slab `name`, mapped; `fresh` maps it anew (its bytes here failed their check: the caller wrote to them)."""
        with self.lock:
            mapped = None if fresh else self.mapped.get(name)
            if mapped is None:
                mapped = self.mapped[name] = _map(name)
                while len(self.mapped) > self.keep:
                    self.mapped.popitem(last=False)
            self.mapped.move_to_end(name)
            return mapped

    def lent_at(self, mapped: mmap.mmap, offset: int) -> bool:
        """Whether an array lent over `mapped` from `offset` is alive: the bytes are then shared with what the caller
        holds (and may have written), so they are copied rather than lent again."""
        return (id(mapped), offset) in self.lent

    def lend(self, mapped: mmap.mmap, offset: int, length: int, entry: int) -> np.ndarray:
        """`length` bytes of `mapped` from `offset` as a uint8 array over the mapping itself (kept alive by it), counted
        as lent from the entry at `entry` while it lives (`lent_at`)."""
        array = np.frombuffer(mapped, np.uint8, count=length, offset=offset)
        key = (id(mapped), entry)
        with self.lock:
            self.lent[key] = self.lent.get(key, 0) + 1
        weakref.finalize(array, self._returned, key).atexit = False
        return array

    def _returned(self, key) -> None:
        with self.lock:
            left = self.lent.pop(key, 1) - 1
            if left > 0:
                self.lent[key] = left


def check(mapped: mmap.mmap, name: str, offset: int, length: int) -> None:
    if offset < 0 or offset + length > len(mapped):
        raise ValueError(f"published slice [{offset}, {offset + length}) is outside slab {name}'s {len(mapped)} bytes")


def _map(name: str) -> mmap.mmap:
    if not _NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a promptcast shared-memory name")
    try:
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SlabGone(f"slab {name} is gone") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_size == 0:
            raise ValueError(f"slab {name} is not a shared-memory object of this user")
        return mmap.mmap(fd, info.st_size, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)


SLABS = Slabs()


def _child_maps_its_own() -> None:
    global SLABS
    SLABS = Slabs()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_child_maps_its_own)
