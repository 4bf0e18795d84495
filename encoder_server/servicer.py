"""The gRPC `TextEncoder` service: protobuf in, one domain call, protobuf out.

`Encode` answers with messages serialized off the event loop. An embedding that has been through the memory tier (a
hit, or a miss once it is stored) is already packed there (CRC32 and chunk messages): it only gets its header. Any
other is packed (`pack_tensors`) on a worker thread, every prompt of the request at once, in parallel, while the
loop streams the ones already packed. The loop, which every client's stream shares, then only hands finished bytes
to gRPC. A request that names shared memory the server can write into (a client on this host,
`shared.shared_memory`) gets each prompt's bytes copied there (by the loop itself for a lone call, else by a packing
thread), and its header alone on the stream; a memory hit for a client that reads the server's own shared memory is
published there once (`shared.published_memory`), and every later hit of it is only named: no copy.

`Encode` writes with `context.write` (gRPC's writer API) rather than by yielding: a write that fails because the
stream is gone (the client cancelled or went away, the connection was cut, the server is stopping) ends the handler
there, as a cancelled call, and nothing more is written to that call. A yielding handler would leave the failed write
to gRPC's own loop, which logs it as an error and abandons the handler's generators half-way, to be closed whenever
the garbage collector gets to them.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc import aio

from encoder_server.service import EmbeddingService, deadline_from, describe
from shared.promptcast.v1 import encoder_pb2 as pb
from shared.promptcast.v1 import encoder_pb2_grpc as pb_grpc
from shared.published_memory import Publisher
from shared.shared_memory import ServerArena
from shared.shared_memory import supported as same_host_supported
from shared.tensor_codec import (CACHE_STATUS, CHUNK_BYTES, COLLATE, DTYPE_NAMES, PackedEmbedding, decode_response,
                                 embedding_header, pack_tensors)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TextEncoder"].full_name



def model_info(encoder, max_prompts_per_call: int) -> pb.ModelInfo:
    info = describe(encoder)
    outputs = [pb.OutputSpec(name=o.name, dtype=DTYPE_NAMES[o.dtype], shape=o.shape, per_token=o.per_token,
                             fixed_tokens=o.fixed_tokens, collate=COLLATE[o.layout.collate], mask_name=o.layout.mask)
               for o in info.pop("outputs")]
    return pb.ModelInfo(**info, outputs=outputs, max_prompts_per_call=max_prompts_per_call)


# Packing is CRC32 (no GIL) and one copy per MiB (with it): a few threads saturate it, and every thread more would
# only contend for the GIL with the event loop and the model's worker thread.
PACKING_THREADS = max(1, min(4, (os.cpu_count() or 1) // 2))


class TextEncoderServicer(pb_grpc.TextEncoderServicer):
    def __init__(self, service: EmbeddingService, published_bytes: int = 0):
        self.service = service
        self.packers = ThreadPoolExecutor(PACKING_THREADS, thread_name_prefix="pack")
        self.sending = 0  # `Encode` calls sending their answers (a call waiting for the model does not use the loop)
        # Memory hits published for same-host clients (`--cache-shm`), in slabs made on the packing threads.
        self.published = (Publisher(published_bytes, executor=self.packers)
                          if published_bytes > 0 and same_host_supported() else None)

    async def close(self) -> None:
        """Stop the packing threads, waiting for the one running, and unlink the published slabs (call once no
        `Encode` is left)."""
        await asyncio.to_thread(self.packers.shutdown, wait=True, cancel_futures=True)
        if self.published is not None:
            self.published.close()

    async def ListModels(self, request, context):
        limit = self.service.limits.max_prompts_per_call
        return pb.ListModelsResponse(models=[model_info(e, limit) for e in self.service.encoders.values()])

    async def Encode(self, request, context):
        embeddings = await self.service.encode(
            request.model, list(request.prompts), list(request.prompts_2) or None, request.max_sequence_length,
            deadline=deadline_from(context.time_remaining()))
        variable = self.service.variable_outputs(request.model)
        loop = asyncio.get_running_loop()
        packed = [_ready(e.tensors) if isinstance(e.tensors, PackedEmbedding) else  # packed already: no thread hop
                  loop.run_in_executor(self.packers, pack_tensors, e.tensors, CHUNK_BYTES) for e in embeddings]
        arena = ServerArena.open(request.shared_memory) if request.HasField("shared_memory") else None
        published = self.published if arena is not None and request.shared_memory.reads_published else None
        self.sending += 1
        try:
            for index, (e, prompt) in enumerate(zip(embeddings, packed)):
                done = await prompt
                where = await self._same_host(arena, published, e, done) if arena is not None else None
                if where is not None and self.service.metrics is not None:
                    self.service.metrics.observe_shared_memory(done.nbytes)
                header = embedding_header(index, e.key, CACHE_STATUS[e.cache_status], done, e.seconds, variable,
                                          *where or ())
                for message in (header,) if where is not None else (header, *done.chunks):  # the bytes: there or here
                    await write(context, message)
        finally:
            self.sending -= 1
            for prompt in packed:
                prompt.cancel()
            if arena is not None:
                arena.close()

    async def _same_host(self, arena: ServerArena, published: Publisher | None, e, packed: PackedEmbedding):
        """Where a same-host client finds this prompt's bytes: (offset, slab name) for a memory hit published in the
        server's own shared memory (published by this call if it was not yet: one copy, as into the arena), else
        (offset, "") once copied into the call's arena; None if neither has room (the bytes are streamed)."""
        if published is not None and e.cache_status == "memory":
            found = published.find(e.key, packed.specs)
            if found is None and (reservation := published.reserve(e.key, packed.specs, packed.nbytes)) is not None:
                found = await self._copy(published.publish, reservation, packed)
            if found is not None:
                return found[1], found[0]
        offset = arena.reserve(packed.nbytes)
        if offset is not None and await self._copy(arena.write, offset, packed):
            return offset, ""
        return None

    async def _copy(self, write, where, packed: PackedEmbedding):
        """`write(where, buffers)` with one prompt's bytes: on the event loop for a lone call, sparing it the hop to a
        thread and back (two wake-ups: on an H200 host a 4 KiB hit took 0.2 ms longer through shared memory than
        streamed); on a packing thread while other calls are sending, so that the loop keeps serving them."""
        pieces = map(decode_response, packed.chunks)
        if self.sending == 1:
            return write(where, pieces)
        return await asyncio.get_running_loop().run_in_executor(self.packers, write, where, pieces)


def _ready(value) -> asyncio.Future:
    future = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


async def write(context, message: bytes) -> None:
    """Send one message; if the stream is gone, end the call as cancelled (`asyncio.CancelledError`)."""
    try:
        await context.write(message)
    except aio.AbortError:
        raise
    except aio.BaseError as e:  # the send failed in gRPC's core, or the call or the server has already ended
        raise asyncio.CancelledError(f"the stream is gone ({type(e).__name__}); nothing more is sent") from None


def _serialize_response(message: pb.EncodeResponse | bytes) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


def add_to_server(servicer: TextEncoderServicer, server) -> None:
    """What the generated `add_TextEncoderServicer_to_server` does, except that `Encode` may yield messages already
    serialized (the bytes protobuf would write)."""
    handlers = {
        "ListModels": grpc.unary_unary_rpc_method_handler(
            servicer.ListModels, request_deserializer=pb.ListModelsRequest.FromString,
            response_serializer=pb.ListModelsResponse.SerializeToString),
        "Encode": grpc.unary_stream_rpc_method_handler(
            servicer.Encode, request_deserializer=pb.EncodeRequest.FromString,
            response_serializer=_serialize_response),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
