"""The model worker process (`encoder_server.worker_process` starts it as `python -m encoder_server.worker_child FD`):
it loads the model, then launches each batch it is sent on its main thread, copying the outputs into shared memory,
and replies from a finishing thread once each batch is on the host."""

from __future__ import annotations

import logging
import queue
import signal
import sys
import threading
from multiprocessing import shared_memory
from multiprocessing.connection import Connection

import torch

from encoder_server import host_copy
from shared import shared_memory as same_host

logger = logging.getLogger(__name__)


def _child_main(conn, spec: dict) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        encoder = _load(spec)
    except Exception as e:  # noqa: BLE001 - the parent raises it as the server's start-up error
        conn.send(("load_failed", type(e).__name__, str(e)))
        return
    meta = {"name": encoder.name, "family": encoder.family, "source": encoder.source, "outputs": encoder.outputs,
            "fingerprint": encoder.fingerprint, "takes_prompt_2": encoder.takes_prompt_2,
            "default_max_sequence_length": encoder.default_max_sequence_length,
            "max_sequence_length_limit": encoder.max_sequence_length_limit,
            "compile": encoder.compile, "cuda_graphs": encoder.cuda_graphs}  # as the child resolved them
    conn.send(("loaded", meta))
    _Worker(encoder, conn).run()


def _load(spec: dict):
    import importlib

    from encoder_server.families import get_encoder

    def named(path: str):
        module, function = path.split(":")
        return getattr(importlib.import_module(module), function)

    build = named(spec["factory"]) if spec["factory"] else get_encoder
    encoder = build(spec["source"], name=spec["name"], family=spec["family"], device=spec["device"],
                    dtype=spec["dtype"], **spec["options"])
    return named(spec["wrap"])(encoder) if spec["wrap"] else encoder


class _Worker:
    """The child's two threads: this one launches batches, a finishing one replies once each is on the host."""

    def __init__(self, encoder, conn):
        self.encoder, self.conn = encoder, conn
        self.cuda = encoder.device.type == "cuda"
        self.send_lock = threading.Lock()
        self.free: list[shared_memory.SharedMemory] = []
        self.used: dict[str, shared_memory.SharedMemory] = {}
        self.pinned: list[int] = []  # addresses registered with CUDA, unregistered before the segments are unmapped
        self.pool_lock = threading.Lock()
        self.launched: queue.Queue = queue.Queue()

    def send(self, message: tuple) -> None:
        with self.send_lock:
            self.conn.send(message)

    def run(self) -> None:
        finisher = threading.Thread(target=self.finish, daemon=True, name="finish")
        finisher.start()
        try:
            while True:
                try:
                    message = self.conn.recv()
                except EOFError:
                    break
                if message[0] == "stop":
                    break
                if message[0] == "free":
                    self.give_back(message[1])
                else:
                    self.launch(*message[1:])
        finally:
            self.launched.put(None)
            finisher.join(30)
            for pointer in self.pinned:
                torch.cuda.cudart().cudaHostUnregister(pointer)
            for segment in [*self.used.values(), *self.free]:
                segment.close()
                segment.unlink()

    def launch(self, request: int, prompts, prompts_2, max_sequence_length: int) -> None:
        with torch.inference_mode():
            try:
                batch = self.queue_copy(self.encoder.encode(prompts, prompts_2, max_sequence_length))
            except torch.OutOfMemoryError as e:
                batch, error = None, ("oom", request, f"out of device memory: {e}")
            except SharedMemoryFull as e:  # the host's set-up, not a bug: said once, without a traceback
                logger.error("%s", e)
                batch, error = None, ("error", request, str(e))
            except Exception as e:  # noqa: BLE001 - the parent fails the batch's requests with it
                logger.exception("encode failed")
                batch, error = None, ("error", request, f"{type(e).__name__}: {e}")
        if batch is None:  # outside the handler: its traceback would pin the failed batch's activations
            if self.cuda:
                torch.cuda.empty_cache()
            self.send(error)
            return
        self.send(("launched", request))
        self.launched.put((request, *batch))

    def queue_copy(self, out: dict):
        """Per-row finite flags on the device, and every output's copy into one shared-memory segment, queued."""
        finite = {name: host_copy.finite_rows(t) for name, t in out.items() if host_copy.floating(t)}
        tensors = [(name, t) for name, value in out.items() for t in (value if isinstance(value, list) else [value])]
        sizes = [t.numel() * t.element_size() for _, t in tensors]
        segment = self.take(sum(-(-size // 64) * 64 for size in sizes))
        base = torch.frombuffer(segment.buf, dtype=torch.uint8)
        layout, offset = {}, 0
        for (name, t), size in zip(tensors, sizes):
            entry = (offset, tuple(t.shape), str(t.dtype).removeprefix("torch."))
            if size:
                view = base[offset:offset + size].view(t.dtype).view(t.shape)
                view.copy_(t.detach(), non_blocking=self.cuda)
            if isinstance(out[name], list):
                layout.setdefault(name, []).append(entry)
            else:
                layout[name] = entry
            offset += -(-size // 64) * 64
        flags, _ = host_copy.copy_to_host(finite)
        ready = None
        if self.cuda:  # after every copy above, on the same stream
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.encoder.device))
        return segment, layout, flags, ready

    def finish(self) -> None:
        while (item := self.launched.get()) is not None:
            request, segment, layout, flags, ready = item
            try:
                if ready is not None:
                    ready.synchronize()
                self.send(("done", request, segment.name, layout, {n: f.tolist() for n, f in flags.items()}))
            except Exception as e:  # noqa: BLE001 - a device failure fails this batch's requests
                self.give_back(segment.name)
                self.send(("failed", request, f"{type(e).__name__}: {e}"))

    def take(self, size: int) -> shared_memory.SharedMemory:
        """The smallest free segment of at least `size` bytes; else a new one of its size class (powers of two from
        1 MiB), pinned on CUDA, and a spare of that class beside it. Allocating and pinning a segment holds this
        thread for tens of milliseconds, a stall for every client of the batches in flight: warm-up encodes one
        batch at a time, and the spare is what a batch launched behind another of its size takes under load."""
        with self.pool_lock:
            fitting = [segment for segment in self.free if segment.size >= size]
            segment = min(fitting, key=lambda s: s.size) if fitting else None
            if segment is not None:
                self.free.remove(segment)
        if segment is None:
            size_class = max(1 << 20, 1 << (max(size, 1) - 1).bit_length())
            segment = self.pinned_segment(size_class)
            try:
                spare = self.pinned_segment(size_class)
            except SharedMemoryFull as e:  # this batch still runs; one launched behind it may not
                logger.warning("no spare shared memory beside this batch's: %s", e)
            else:
                with self.pool_lock:
                    self.free.append(spare)
        with self.pool_lock:
            self.used[segment.name] = segment
        return segment

    def pinned_segment(self, size: int) -> shared_memory.SharedMemory:
        segment = _allocated_segment(size)
        if self.cuda:
            pointer = torch.frombuffer(segment.buf, dtype=torch.uint8).data_ptr()
            torch.cuda.cudart().cudaHostRegister(pointer, size, 0)
            self.pinned.append(pointer)
        return segment

    def give_back(self, name: str) -> None:
        with self.pool_lock:
            segment = self.used.pop(name, None)
            if segment is not None:
                self.free.append(segment)


class SharedMemoryFull(OSError):
    """/dev/shm cannot hold a batch's outputs."""


def _allocated_segment(size: int) -> shared_memory.SharedMemory:
    """A new segment with every page allocated now: a /dev/shm too small for it is this error, not a SIGBUS when the
    batch's outputs reach a page that tmpfs cannot give."""
    try:
        return same_host.allocated(size)
    except OSError as e:
        raise SharedMemoryFull(e.errno, f"/dev/shm has no room for a {size / 2**20:g} MiB batch of outputs "
                               f"({e.strerror}): give the server more shared memory (docker run --shm-size 2g; on "
                               "Kubernetes a memory-backed emptyDir at /dev/shm) or run it with --worker thread"
                               ) from None


if __name__ == "__main__":
    # The server decides when this process ends ("stop", or the socket closing when the server dies): a Ctrl-C in
    # the terminal reaches the whole process group, and must not end a batch the server is still draining.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _connection = Connection(int(sys.argv[1]))
    _child_main(_connection, _connection.recv())
