"""`promptcast serve`: parse and validate options, then run the server. No heavy imports here."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Optional

import typer

logger = logging.getLogger("promptcast.serve")


def serve(
    model: Annotated[list[str], typer.Option("--model", "-m", help="[NAME=]SRC: a hub repo id or a local diffusers "
                                             "folder; repeat to host several models.")],
    host: Annotated[str, typer.Option(help="Address to bind.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="Port to bind (0 picks a free one).")] = 50051,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32.")] = "auto",
    family: Annotated[Optional[str], typer.Option(help="Override the family read from model_index.json: "
                                                  "flux1, flux2, flux2-klein.")] = None,
    grace: Annotated[float, typer.Option(help="Seconds in-flight streams get to finish on SIGTERM.")] = 30.0,
    max_batch_size: Annotated[int, typer.Option(help="Most prompts merged into one forward pass.")] = 16,
    max_wait_ms: Annotated[float, typer.Option(help="How long a request waits for others to batch with.")] = 2.0,
    max_queue: Annotated[int, typer.Option(help="Requests queued per model before RESOURCE_EXHAUSTED.")] = 256,
    max_prompts_per_call: Annotated[int, typer.Option(help="Most prompts in one Encode call.")] = 64,
    max_prompt_chars: Annotated[int, typer.Option(help="Longest prompt accepted, in characters.")] = 20_000,
    cache_mem: Annotated[str, typer.Option(help="Memory cache bound, e.g. 2GiB, 512MiB, 0 to disable.")] = "2GiB",
):
    """Run the encoder server: text encoders only, embeddings streamed over gRPC."""
    from encoder_server.server import EncoderServer, ModelSpec, ServerConfig
    from encoder_server.service import Limits
    from shared.config import parse_bytes, resolve_device

    config = ServerConfig(
        models=[ModelSpec.parse(m, family) for m in model], host=host, port=port, device=resolve_device(device),
        dtype=dtype, grace=grace, limits=Limits(max_prompts_per_call, max_prompt_chars),
        max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue, cache_mem=parse_bytes(cache_mem))

    async def run():
        await EncoderServer(config).run_until_signal()

    asyncio.run(run())
    logger.info("stopped")
