"""A loopback TCP proxy that injects wire faults between gRPC clients and one server: added delay, and connections
cut in the middle of whatever they carry (a reset, as a crashed peer or a dropped NAT entry gives).

    proxy = FaultProxy(server_port).start()     # clients dial 127.0.0.1:proxy.port
    proxy.delay = 0.05                          # every chunk, both ways, waits 50 ms first
    proxy.cut_busy()                            # reset every connection that moved bytes in the last 200 ms

It listens on 127.0.0.1 only, on a free port, and forwards to 127.0.0.1:`target_port`. A connection whose upstream
cannot be reached (the server is down) is closed at once, as a refused connect would be.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time


class FaultProxy:
    def __init__(self, target_port: int, chunk_bytes: int = 256 << 10):
        self.target_port = target_port
        self.chunk_bytes = chunk_bytes
        self.delay = 0.0  # seconds each chunk waits before it is forwarded
        self.port = 0
        self.connections = 0
        self.refused = 0  # upstream not reachable
        self.cut = 0  # connections reset by `cut_busy`
        self.bytes = 0
        self._live: dict[int, list] = {}  # id -> [client transport socket, upstream socket, last-bytes-at]
        self._loop = asyncio.new_event_loop()
        self._server = None
        self._ready = threading.Event()

    def start(self) -> "FaultProxy":
        threading.Thread(target=self._run, daemon=True, name=f"fault-proxy-{self.target_port}").start()
        self._ready.wait(10)
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    def stop(self) -> None:
        def close():
            self._server.close()
            for entry in list(self._live.values()):
                for writer in entry[:2]:
                    writer.close()
            self._loop.stop()

        self._loop.call_soon_threadsafe(close)

    def cut_busy(self, within: float = 0.2) -> int:
        """Reset every connection that carried bytes in the last `within` seconds (streams in flight); their
        number."""
        done = threading.Event()
        count = []

        def cut():
            now = time.monotonic()
            busy = [entry for entry in self._live.values() if now - entry[2] <= within]
            for client, upstream, _ in busy:
                for writer in (client, upstream):
                    _reset(writer)
            count.append(len(busy))
            self.cut += len(busy)
            done.set()

        self._loop.call_soon_threadsafe(cut)
        done.wait(5)
        return count[0] if count else 0

    async def _serve(self, client_reader, client_writer) -> None:
        self.connections += 1
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            self.refused += 1
            _reset(client_writer)
            return
        key = id(client_writer)
        entry = self._live[key] = [client_writer, upstream_writer, time.monotonic()]
        try:
            await asyncio.gather(self._pump(client_reader, upstream_writer, entry),
                                 self._pump(upstream_reader, client_writer, entry), return_exceptions=True)
        finally:
            self._live.pop(key, None)
            for writer in (client_writer, upstream_writer):
                writer.close()

    async def _pump(self, reader, writer, entry) -> None:
        try:
            while data := await reader.read(self.chunk_bytes):
                entry[2] = time.monotonic()
                self.bytes += len(data)
                if self.delay:
                    await asyncio.sleep(self.delay)
                writer.write(data)
                await writer.drain()
        finally:  # one side ended or failed: end the other, so neither peer waits on a half-open connection
            for other in entry[:2]:
                if not other.is_closing():
                    other.close()


def _reset(writer) -> None:
    """Close with a TCP reset (SO_LINGER 0), not an orderly FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()
