"""Embeddings through shared memory, for a client on the server's host.

A client that reaches its server over loopback creates a POSIX shared-memory object per call in flight (an
`Arena`, reused from call to call) and names it in its `EncodeRequest`, with a 16-byte random token it wrote at the
object's start. The server opens the object by name, and only if it is one of ours (`promptcast-` and 32 hex digits,
a regular file of this user, the token read back) writes each prompt's bytes there instead of streaming them; the
prompt's header then says at which offset (`EmbeddingHeader.in_shared_memory`), and is sent once the bytes are
written. Every other case streams as before: a server on another host or in another container (no such object), a
different user (no permission), a prompt that does not fit.

The client checks those bytes as it checks chunks: sizes against the header, CRC-32 against its checksum. A
call that fails drops its arena (a server may still be writing into it), and an arena of a process that dies is
unlinked by `multiprocessing`'s resource tracker.

A call of one prompt is answered with tensors over the arena's own bytes, with no copy (`Arena.lend`): the arena is
lent to them, and goes back to the pool only once the caller has let go of every one. At most `keep` arenas are out
at once; a caller that holds on to more answers gets copies. A fork while arenas are lent makes those arenas
single-use (a child may still read the pages), and the child starts with none of its parent's arenas.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import re
import stat
import sys
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from multiprocessing import shared_memory

import numpy as np

from shared.parallel_copy import copy_many
from shared.promptcast.v1 import encoder_pb2 as pb

logger = logging.getLogger(__name__)

PREFIX = "promptcast-"
TOKEN_BYTES = 16
DATA_START = 64  # the token, then the prompts' bytes, each from a 64-byte boundary
ALIGN = 64
SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shared memory; elsewhere the server streams
_NAME = re.compile(r"promptcast-[0-9a-f]{32}")
LOOPBACK = ("localhost", "127.", "[::1]", "::1", "unix:", "ipv4:127.", "ipv6:[::1]")


def supported() -> bool:
    return sys.platform.startswith("linux") and os.path.isdir(SHM_DIR)


def is_loopback(target: str) -> bool:
    """A target on this host: `localhost`, 127.x, ::1 or a unix socket."""
    return target.lower().startswith(LOOPBACK)


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def allocated(size: int, name: str | None = None) -> shared_memory.SharedMemory:
    """A new POSIX shared-memory object with every page allocated: a /dev/shm without room for it is an `OSError`
    here (nothing left behind), not a SIGBUS when a write reaches a page tmpfs cannot give. Registered with the
    resource tracker, so it is unlinked even if this process is killed."""
    memory = shared_memory.SharedMemory(name=name, create=True, size=size)
    try:
        fd = os.open(os.path.join(SHM_DIR, memory.name.lstrip("/")), os.O_RDWR | os.O_CLOEXEC)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
    except OSError:
        memory.close()
        memory.unlink()
        raise
    return memory


class Arena:
    """One call's shared memory on the client side: created and tokened here, read after the server wrote."""

    def __init__(self, size: int):
        self.size = max(size, DATA_START + ALIGN)
        # Every page now: a full /dev/shm fails here, never as SIGBUS in a server writing a page later.
        self.memory = allocated(self.size, PREFIX + uuid.uuid4().hex)
        self.token = os.urandom(TOKEN_BYTES)
        self.memory.buf[:TOKEN_BYTES] = self.token
        self.owner = os.getpid()  # only the process that made it unlinks it (not a forked child)
        self.leases = 0  # arrays over its bytes (`lend`) still alive
        self.reusable = True  # False once another call must not be written into it (a fork shares its pages)
        self._returned = None  # called with the arena when the last lent array dies
        self._address: int | None = None  # where the mapping starts, once something is lent
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.memory.name.lstrip("/")

    def target(self) -> pb.SharedMemoryTarget:
        return pb.SharedMemoryTarget(name=self.name, token=self.token)

    def view(self, offset: int, length: int) -> memoryview:
        """The bytes a header says are at `offset`; a range outside the arena is the server's error."""
        self._check(offset, length)
        return self.memory.buf[offset:offset + length]

    def lend(self, offset: int, length: int) -> np.ndarray:
        """The bytes at `offset` as a uint8 array over the arena itself (no copy). While it, or a tensor made from it,
        is alive, the arena is not closed, and `when_returned` waits for it.

        The array is made from the mapping's address, not from a buffer export of it: an export would still be held
        while the array's finalizer runs, and the mapping could not be closed there."""
        self._check(offset, length)
        if self._address is None:
            anchor = ctypes.c_char.from_buffer(self.memory.buf)
            self._address = ctypes.addressof(anchor)
            del anchor  # its export with it
        array = np.frombuffer((ctypes.c_uint8 * length).from_address(self._address + offset), np.uint8)
        with self._lock:
            self.leases += 1
        weakref.finalize(array, self._release).atexit = False  # at exit nothing is returned, nothing reads it
        return array

    def when_returned(self, callback) -> bool:
        """Call `callback(self)` once no lent array is left; False, and no call, if none is out now."""
        with self._lock:
            if self.leases == 0:
                return False
            self._returned = callback
            return True

    def _release(self) -> None:
        with self._lock:
            self.leases -= 1
            callback = None
            if self.leases == 0:
                callback, self._returned = self._returned, None
        if callback is not None:
            callback(self)

    def _check(self, offset: int, length: int) -> None:
        if offset < DATA_START or offset + length > self.size:
            raise ValueError(f"shared-memory slice [{offset}, {offset + length}) is outside the call's "
                             f"{self.size}-byte arena")

    def close(self) -> None:
        """Unlink it now (in the process that made it); unmap it now, or, if arrays are lent, once they are gone."""
        if os.getpid() == self.owner:
            try:
                self.memory.unlink()
            except FileNotFoundError:
                pass
        if not self.when_returned(lambda arena: arena.memory.close()):
            self.memory.close()


class ArenaPool:
    """The client's arenas: one per call in flight, kept for the next calls (at most `keep` idle). A call's arena is
    sized for its prompts at the most bytes a prompt has taken so far (at least `first_bytes`, at most `max_bytes`):
    the pages are allocated up front, so a client does not hold more memory than its answers need. A prompt that
    does not fit streams, and the next arena is larger. An arena lent to a call's tensors comes back when they die."""

    def __init__(self, first_bytes: int = 1 << 20, max_bytes: int = 1 << 30, keep: int = 4):
        self.first_bytes, self.max_bytes, self.keep = first_bytes, max_bytes, keep
        self.per_prompt = 0  # the most bytes one prompt's answer has taken, aligned
        self.free: list[Arena] = []
        self.lent: set[Arena] = set()  # arenas under tensors the caller still holds
        self.closed = False
        self.lock = threading.RLock()  # a lent array may die, and come back, while this thread holds it
        _POOLS.add(self)

    def take(self, prompts: int = 1) -> Arena | None:
        """An arena for a call of `prompts`; None if /dev/shm has no room for one (the call streams)."""
        with self.lock:
            want = min(self.max_bytes, max(self.first_bytes, DATA_START + prompts * self.per_prompt))
            fits = [arena for arena in self.free if arena.size >= want]
            if fits:
                arena = min(fits, key=lambda a: a.size)
                self.free.remove(arena)
                return arena
        try:
            return Arena(want)
        except OSError as e:
            logger.warning("no shared memory for this call (%s); streaming it", e)
            return None

    def offer(self, request: pb.EncodeRequest) -> Arena | None:
        """An arena for this call, named in `request`; None (and no offer in it) if /dev/shm has no room."""
        arena = self.take(len(request.prompts))
        request.ClearField("shared_memory")  # a retry's request may name the failed attempt's arena
        if arena is not None:
            request.shared_memory.CopyFrom(arena.target())
            request.shared_memory.reads_published = True  # this client reads the server's slabs too
        return arena

    def may_lend(self) -> bool:
        """Whether a call may answer with tensors over its arena: while fewer than `keep` arenas are out."""
        return len(self.lent) < self.keep

    def give(self, arena: Arena, largest_prompt: int, ok: bool) -> None:
        """Back after a call whose largest prompt took `largest_prompt` bytes: kept if the call ended well (else a
        server may still be writing into it), the smallest idle arena closed past `keep`; an arena lent to the call's
        tensors, once they are gone."""
        with self.lock:
            self.per_prompt = max(self.per_prompt, aligned(largest_prompt))
            arena.reusable = arena.reusable and ok
            if arena.when_returned(self._returned):
                self.lent.add(arena)
                return
        self._returned(arena)

    def _returned(self, arena: Arena) -> None:
        with self.lock:
            self.lent.discard(arena)
            if arena.reusable and not self.closed:
                self.free.append(arena)
                if len(self.free) <= self.keep:
                    return
                arena = min(self.free, key=lambda a: a.size)
                self.free.remove(arena)
        arena.close()

    def close(self) -> None:
        """Close every arena: the lent ones are unlinked now and unmapped when their tensors are gone."""
        with self.lock:
            self.closed = True
            arenas, self.free, self.lent = [*self.free, *self.lent], [], set()
        for arena in arenas:
            arena.close()


_POOLS: "weakref.WeakSet[ArenaPool]" = weakref.WeakSet()


def _fork_shares_lent_arenas() -> None:
    """In the parent: a child may go on reading the tensors it inherited, so their arenas are never written again."""
    for pool in list(_POOLS):
        for arena in list(pool.lent):
            arena.reusable = False


def _child_starts_with_no_arenas() -> None:
    """In the child: its parent's arenas are the parent's to offer (and to unlink); those under inherited tensors are
    unmapped here when the tensors die."""
    for pool in list(_POOLS):
        for arena in pool.lent:
            arena._lock, arena.reusable = threading.Lock(), False
        pool.free, pool.lent, pool.lock = [], set(), threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_parent=_fork_shares_lent_arenas, after_in_child=_child_starts_with_no_arenas)


class ServerArena:
    """A request's shared memory, opened on the server side. `open` returns None for anything that is not one of
    our objects holding the request's token: the call then streams.

    Mappings are kept (`MAPPINGS`, by name and inode) for the client's next call with the same arena: a fresh mapping
    would fault in each of its pages again as it is written, which costs as much as the copy."""

    def __init__(self, mapped: mmap.mmap):
        self.mapped: mmap.mmap | None = mapped
        self.size = len(mapped)
        self.end = DATA_START  # where the next prompt goes
        self.lock = threading.Lock()  # a write on a packing thread, and `close` from the call's end

    @classmethod
    def open(cls, target: pb.SharedMemoryTarget) -> "ServerArena | None":
        if not supported() or not _NAME.fullmatch(target.name) or len(target.token) != TOKEN_BYTES:
            return None
        try:
            fd = os.open(os.path.join(SHM_DIR, target.name), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:  # another host or container, another user, gone: stream instead
            return None
        try:
            info = os.fstat(fd)
            if (not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_size < DATA_START + ALIGN
                    or info.st_blocks * 512 < info.st_size):  # pages not all there: a write could SIGBUS
                return None
            mapped = MAPPINGS.get(target.name, info)
            if mapped is None:
                mapped = mmap.mmap(fd, info.st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                MAPPINGS.put(target.name, info, mapped)
        except OSError:
            return None
        finally:
            os.close(fd)
        if mapped[:TOKEN_BYTES] != target.token:
            return None
        return cls(mapped)

    def reserve(self, nbytes: int) -> int | None:
        """The offset for a prompt of `nbytes`, or None if the rest of the arena is too small."""
        if self.end + nbytes > self.size:
            return None
        offset, self.end = self.end, aligned(self.end + nbytes)
        return offset

    def write(self, offset: int, pieces) -> bool:
        """Copy `pieces` (buffers, in order) from `offset`; False if the call ended first."""
        with self.lock:
            if self.mapped is None:
                return False
            target, copies = memoryview(self.mapped), []
            for piece in pieces:
                copies.append((target[offset:offset + piece.nbytes], piece))
                offset += piece.nbytes
            copy_many(copies)
            return True

    def close(self) -> None:
        """The call is over: nothing more is written. The mapping itself is unmapped once no call and no kept entry
        holds it (an arena the client dropped ages out of `MAPPINGS`)."""
        with self.lock:
            self.mapped = None


class _Mappings:
    """Mappings of the arenas written into lately, by name: at most `keep` of them and `max_bytes` in all. Each holds
    one descriptor (Python's mmap keeps its file's), as does, until its call ends, the mapping of a call in flight that
    has just been let go of. One whose name no longer is the same file (a closed client, a dropped arena) leaves with
    the next call a second or more later, or with the next new mapping."""

    def __init__(self, keep: int = 64, max_bytes: int = 2 << 30):
        self.keep, self.max_bytes = keep, max_bytes
        self.entries: OrderedDict[str, tuple[tuple[int, int, int], mmap.mmap]] = OrderedDict()
        self.lock = threading.Lock()
        self.swept = 0.0

    def get(self, name: str, info: os.stat_result) -> mmap.mmap | None:
        with self.lock:
            if time.monotonic() - self.swept > 1.0:
                self._sweep()
            entry = self.entries.get(name)
            if entry is None or entry[0] != _identity(info):
                return None
            self.entries.move_to_end(name)
            return entry[1]

    def put(self, name: str, info: os.stat_result, mapped: mmap.mmap) -> None:
        with self.lock:
            self._sweep()
            self.entries[name] = (_identity(info), mapped)
            self.entries.move_to_end(name)
            while len(self.entries) > self.keep or sum(len(m) for _, m in self.entries.values()) > self.max_bytes:
                self.entries.popitem(last=False)

    def _sweep(self) -> None:
        """Forget every entry whose name is gone or is another file now; its pages are unmapped once the last call
        writing into them ends."""
        for name, (identity, _) in list(self.entries.items()):
            try:
                same = _identity(os.stat(os.path.join(SHM_DIR, name))) == identity
            except OSError:
                same = False
            if not same:
                del self.entries[name]
        self.swept = time.monotonic()

    def __len__(self) -> int:
        return len(self.entries)


def _identity(info: os.stat_result) -> tuple[int, int, int]:
    return info.st_dev, info.st_ino, info.st_size


MAPPINGS = _Mappings()
