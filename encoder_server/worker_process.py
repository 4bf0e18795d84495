"""A model's text encoders in a process of their own (`promptcast serve --worker process`).

The server's event loop, gRPC's threads and the packing threads share one interpreter lock with a worker thread,
and an eager text encoder at small batches is bound by the Python that launches its kernels: every slice of the lock
they take is time the device waits. Here the model lives in a child process with its own interpreter. It tokenizes,
runs the forward pass, computes the per-row NaN/Inf flags on the device and copies the outputs into shared memory
(pinned with `cudaHostRegister` on CUDA, so the copy is a DMA queued on the model's stream); the server's process
copies each batch out of shared memory once and hands the segment back. No tensor is pickled: only prompts, shapes
and flags cross the pipe.

The child keeps the thread worker's shape. Its main thread launches a batch (replying "launched", or "oom" so that
the batcher splits it) and takes the next; a finishing thread waits for each batch's copy and replies "done". If the
child dies, every request it held fails as UNAVAILABLE (clients retry on another replica), health turns NOT_SERVING,
and a new child loads the model; health returns to SERVING once it has encoded a prompt.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing import resource_tracker, shared_memory
from multiprocessing.connection import Connection

import torch

from encoder_server.errors import ModelNotReady, SourceError
from shared.parallel_copy import copy_many
from shared.tensor_codec import tensor_bytes

logger = logging.getLogger(__name__)

LOAD_TIMEOUT = 3600.0  # seconds a child may take to load (a 24B model from a slow disk)
RESPAWN_BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0)
WARM_PROMPT = "a photograph of an astronaut riding a horse"


def default_worker(device: str | torch.device) -> str:
    """Where a model runs without `--worker`: its own process on CUDA, where a forward is a few launches and the
    server's own Python (streaming, packing, gRPC) would otherwise take the interpreter lock from them; a thread on
    the CPU, where the model's compute already fills the cores and a child would be one more copy of the weights'
    loading cost."""
    return "process" if torch.device(device).type == "cuda" else "thread"


class WorkerFailed(ModelNotReady):
    """The model worker process failed this request, or died holding it."""


@dataclass
class _Pending:
    launched: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    launch_reply: tuple = ()
    done_reply: tuple = ()


class ProcessEncoder:
    r"""
    An `Encoder` whose model runs in a child process; the batcher calls `launch` (or `encode`) as it would a model.

    Args:
        source (`str`): hub repo id or local diffusers folder, as for `get_encoder`.
        name (`str`, *optional*), family (`str`, *optional*), device (`str`), dtype (`torch.dtype`): as for
            `get_encoder`; `options` (`compile=`, `quantize=`, `cuda_graphs=`) too.
        wrap (`str`, *optional*): `"module:function"` the child applies to its loaded encoder (fault injection in
            tests).
        factory (`str`, *optional*): `"module:function"` the child builds its encoder with, called as
            `get_encoder` would be (benchmarks: random weights at real shapes, no files).
    """

    def __init__(self, source: str, *, name: str | None = None, family: str | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, wrap: str | None = None,
                 factory: str | None = None, **options):
        self._spec = dict(source=source, name=name, family=family, device=str(device), dtype=dtype, wrap=wrap,
                          factory=factory, options=options)
        self.device = torch.device(device)
        self.dtype = dtype
        self.compile = bool(options.get("compile"))
        self.cuda_graphs = bool(options.get("cuda_graphs"))
        self.on_state = None  # callback(ready: bool) from the child's threads: the server's health follows it
        self._ids = itertools.count()
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()  # one writer on the pipe at a time; guards _pending and _child
        self._segments: dict[str, shared_memory.SharedMemory] = {}
        self._segments_lock = threading.Lock()
        self._closing = False
        self._child = self._spawn()
        for key, value in self._child.meta.items():
            setattr(self, key, value)

    # ------------------------------------------------------------------------------------------------ the child

    def _spawn(self) -> "_Child":
        """`python -m encoder_server.worker_child FD`, talking over a socket pair. Started with posix_spawn (no
        fork of a process running gRPC and CUDA threads), on this process's import path."""
        ours, theirs = socket.socketpair()
        os.set_inheritable(theirs.fileno(), True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        try:
            # close_fds=False (with no cwd or preexec_fn) is what lets subprocess use posix_spawn.
            process = subprocess.Popen([sys.executable, "-m", "encoder_server.worker_child", str(theirs.fileno())],
                                       env=env, close_fds=False)
        finally:
            theirs.close()
        conn = Connection(ours.detach())
        conn.send(self._spec)
        if not conn.poll(LOAD_TIMEOUT):
            process.kill()
            raise SourceError(f"the model worker did not load {self._spec['source']!r} in {LOAD_TIMEOUT:.0f}s")
        try:
            reply = conn.recv()
        except EOFError:
            raise SourceError(f"the model worker loading {self._spec['source']!r} exited (exit code "
                              f"{process.wait()})") from None
        if reply[0] == "load_failed":
            process.wait(30)
            _, kind, message = reply
            raise SourceError(message) if kind == "SourceError" else RuntimeError(message)
        child = _Child(process, conn, reply[1])
        child.reader = threading.Thread(target=self._read, args=(child,), daemon=True,
                                        name=f"promptcast-model-{process.pid}-replies")
        child.reader.start()
        logger.info("model %r runs in worker process %d", child.meta["name"], process.pid)
        return child

    def _read(self, child: "_Child") -> None:
        """Replies of one child, to the requests waiting for them; on its death, fail them and start another."""
        while True:
            try:
                reply = child.conn.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                pending = self._pending.get(reply[1])
            if pending is None:
                continue
            if reply[0] in ("launched", "oom", "error"):
                pending.launch_reply = reply
                pending.launched.set()
            else:
                pending.done_reply = reply
                pending.done.set()
        code = _wait(child.process, 10)
        with self._lock:
            orphans, self._pending = self._pending, {}
            stopping = self._closing
        error = ("launch", "exited", f"the model worker process exited (exit code {code}) while encoding this "
                 "request; retry")
        for pending in orphans.values():
            pending.launch_reply = pending.launch_reply or error
            pending.done_reply = error
            pending.launched.set()
            pending.done.set()
        self._drop_segments()  # the dead child's: unlinked with it, unmapped here
        if stopping:
            return
        logger.error("model %r: its worker process %d exited (exit code %s); %d requests failed; starting another",
                     self.name, child.process.pid, code, len(orphans))
        self._state(False)
        threading.Thread(target=self._respawn, daemon=True, name="promptcast-model-respawn").start()

    def _respawn(self) -> None:
        for attempt in itertools.count():
            if self._closing:
                return
            try:
                child = self._spawn()
                with self._lock:
                    self._child = child
                if self._closing:  # closed while this one loaded
                    self.close()
                    return
                self.encode([WARM_PROMPT], None, self.default_max_sequence_length)
                logger.warning("model %r: worker process %d loaded and warm; serving again", self.name,
                               child.process.pid)
                self._state(True)
                return
            except Exception as e:  # noqa: BLE001 - keep trying; health stays NOT_SERVING meanwhile
                wait = RESPAWN_BACKOFF[min(attempt, len(RESPAWN_BACKOFF) - 1)]
                logger.error("model %r: a new worker process failed (%s: %s); retrying in %.0fs", self.name,
                             type(e).__name__, e, wait)
                time.sleep(wait)

    def _state(self, ready: bool) -> None:
        if self.on_state is not None:
            self.on_state(ready)

    def _send(self, message: tuple) -> None:
        with self._lock:
            self._child.conn.send(message)

    # ------------------------------------------------------------------------------------------------ encoding

    def launch(self, prompts: list[str], prompts_2: list[str] | None, max_sequence_length: int):
        """Queue one forward pass in the child. Returns `(host, finite, ready)`: two dicts that `ready.synchronize()`
        fills with the outputs (CPU tensors) and their per-row finite flags. Raises `torch.OutOfMemoryError` when
        the child ran out of device memory launching it, `WorkerFailed` for any other failure."""
        pending, request = _Pending(), next(self._ids)
        with self._lock:
            if self._child.process.poll() is not None:
                raise WorkerFailed(f"model {self.name!r} is restarting its worker process; retry")
            self._pending[request] = pending
            try:
                self._child.conn.send(("encode", request, prompts, prompts_2, max_sequence_length))
            except (BrokenPipeError, OSError):
                del self._pending[request]
                raise WorkerFailed(f"model {self.name!r} is restarting its worker process; retry") from None
        pending.launched.wait()
        kind = pending.launch_reply[0]
        if kind != "launched":
            self._forget(request)
            if kind == "oom":
                raise torch.OutOfMemoryError(pending.launch_reply[2])
            raise WorkerFailed(pending.launch_reply[2])
        host, finite = {}, {}
        return host, finite, _Ready(self, request, pending, host, finite)

    def encode(self, prompts, prompts_2, max_sequence_length) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Encode and wait: the outputs on the host (warm-up, tests)."""
        host, _, ready = self.launch(prompts, prompts_2, max_sequence_length)
        ready.synchronize()
        return host

    def _collect(self, request: int, pending: _Pending, host: dict, finite: dict) -> None:
        pending.done.wait()
        self._forget(request)
        reply = pending.done_reply
        if reply[0] != "done":
            raise WorkerFailed(reply[2])
        _, _, name, layout, flags = reply
        segment = self._segment(name)
        try:
            for key, entry in layout.items():
                host[key] = [_read(segment, *t) for t in entry] if isinstance(entry, list) else _read(segment, *entry)
        finally:
            try:
                self._send(("free", name))
            except (BrokenPipeError, OSError):
                pass  # the child died: its segments went with it
        finite.update({key: torch.tensor(values, dtype=torch.bool) for key, values in flags.items()})

    def _forget(self, request: int) -> None:
        with self._lock:
            self._pending.pop(request, None)

    def _segment(self, name: str) -> shared_memory.SharedMemory:
        with self._segments_lock:
            segment = self._segments.get(name)
            if segment is None:
                segment = shared_memory.SharedMemory(name=name)
                # The child owns and unlinks it; this process must not (Python's tracker would, at exit).
                resource_tracker.unregister(segment._name, "shared_memory")
                self._segments[name] = segment
        return segment

    def close(self) -> None:
        """Stop the child (it unlinks its shared memory) and let go of the segments mapped here."""
        self._closing = True
        child = self._child
        try:
            self._send(("stop",))
        except (BrokenPipeError, OSError):
            pass
        if _wait(child.process, 30) is None:
            child.process.kill()
            _wait(child.process, 5)
        self._drop_segments()

    def _drop_segments(self) -> None:
        """Unmap the segments mapped here. `close` and the reply reader of a child that exited both come here, on
        their own threads: each segment is taken out under the lock, so only one of them closes it."""
        with self._segments_lock:
            segments, self._segments = self._segments, {}
        for name, segment in segments.items():
            try:
                segment.close()
            except BufferError:  # a copy out of it is still running: kept, and unmapped when that one lets go
                with self._segments_lock:
                    self._segments.setdefault(name, segment)


def _wait(process: subprocess.Popen, timeout: float) -> int | None:
    """The exit code, or None if it still runs after `timeout` seconds."""
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


@dataclass
class _Child:
    process: subprocess.Popen
    conn: object
    meta: dict
    reader: threading.Thread | None = None


@dataclass
class _Ready:
    """`synchronize()` waits for the child's copy of one batch and fills `host` and `finite` (the batcher's event)."""

    encoder: ProcessEncoder
    request: int
    pending: _Pending
    host: dict
    finite: dict

    def synchronize(self) -> None:
        self.encoder._collect(self.request, self.pending, self.host, self.finite)


def _read(segment, offset: int, shape: tuple, dtype: str) -> torch.Tensor:
    """One tensor copied out of shared memory (the segment goes back to the child right after)."""
    out = torch.empty(shape, dtype=getattr(torch, dtype))
    nbytes = out.numel() * out.element_size()
    if nbytes:  # plain threads, not torch's: OpenMP's would spin on the cores gRPC and the event loop need
        copy_many([(tensor_bytes(out), segment.buf[offset:offset + nbytes])])
    return out
