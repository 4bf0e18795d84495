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
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import stat
import sys
import threading
import time
import uuid
from collections import OrderedDict
from multiprocessing import shared_memory

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

    @property
    def name(self) -> str:
        return self.memory.name.lstrip("/")

    def target(self) -> pb.SharedMemoryTarget:
        return pb.SharedMemoryTarget(name=self.name, token=self.token)

    def view(self, offset: int, length: int) -> memoryview:
        """The bytes a header says are at `offset`; a range outside the arena is the server's error."""
        if offset < DATA_START or offset + length > self.size:
            raise ValueError(f"shared-memory slice [{offset}, {offset + length}) is outside the call's "
                             f"{self.size}-byte arena")
        return self.memory.buf[offset:offset + length]

    def close(self) -> None:
        self.memory.close()
        try:
            self.memory.unlink()
        except FileNotFoundError:
            pass


class ArenaPool:
    """The client's arenas: one per call in flight, kept for the next calls (at most `keep` idle). A call's arena is
    sized for its prompts at the most bytes a prompt has taken so far (at least `first_bytes`, at most `max_bytes`):
    the pages are allocated up front, so a client does not hold more memory than its answers need. A prompt that
    does not fit streams, and the next arena is larger."""

    def __init__(self, first_bytes: int = 1 << 20, max_bytes: int = 1 << 30, keep: int = 4):
        self.first_bytes, self.max_bytes, self.keep = first_bytes, max_bytes, keep
        self.per_prompt = 0  # the most bytes one prompt's answer has taken, aligned
        self.free: list[Arena] = []
        self.lock = threading.Lock()

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
        return arena

    def give(self, arena: Arena, largest_prompt: int, ok: bool) -> None:
        """Back after a call whose largest prompt took `largest_prompt` bytes: kept if the call ended well (else a
        server may still be writing into it), the smallest idle arena closed past `keep`."""
        with self.lock:
            self.per_prompt = max(self.per_prompt, aligned(largest_prompt))
            if ok:
                self.free.append(arena)
                if len(self.free) <= self.keep:
                    return
                arena = min(self.free, key=lambda a: a.size)
                self.free.remove(arena)
        arena.close()

    def close(self) -> None:
        with self.lock:
            free, self.free = self.free, []
        for arena in free:
            arena.close()


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
