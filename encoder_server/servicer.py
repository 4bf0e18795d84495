"""The gRPC `TextEncoder` service: protobuf in, one domain call, protobuf out."""

from __future__ import annotations

from encoder_server.service import EmbeddingService, deadline_from, describe
from shared.promptcast.v1 import encoder_pb2 as pb
from shared.promptcast.v1 import encoder_pb2_grpc as pb_grpc
from shared.tensor_codec import DTYPE_NAMES, encode_embedding

CACHE_STATUS = {"miss": pb.CACHE_STATUS_MISS, "memory": pb.CACHE_STATUS_MEMORY, "disk": pb.CACHE_STATUS_DISK,
                "redis": pb.CACHE_STATUS_REDIS}


def model_info(encoder, max_prompts_per_call: int) -> pb.ModelInfo:
    info = describe(encoder)
    outputs = [pb.OutputSpec(name=o.name, dtype=DTYPE_NAMES[o.dtype], shape=o.shape, per_token=o.per_token)
               for o in info.pop("outputs")]
    return pb.ModelInfo(**info, outputs=outputs, max_prompts_per_call=max_prompts_per_call)


class TextEncoderServicer(pb_grpc.TextEncoderServicer):
    def __init__(self, service: EmbeddingService):
        self.service = service

    async def ListModels(self, request, context):
        limit = self.service.limits.max_prompts_per_call
        return pb.ListModelsResponse(models=[model_info(e, limit) for e in self.service.encoders.values()])

    async def Encode(self, request, context):
        embeddings = await self.service.encode(
            request.model, list(request.prompts), list(request.prompts_2) or None, request.max_sequence_length,
            deadline=deadline_from(context.time_remaining()))
        for index, embedding in enumerate(embeddings):
            for message in encode_embedding(index, embedding.key, CACHE_STATUS[embedding.cache_status],
                                            embedding.tensors, embedding.seconds):
                yield message
