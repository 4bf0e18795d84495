"""`promptcast serve`: parse and validate options, then run the server. No heavy imports here."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from pathlib import Path
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
                                                  "flux1, flux2, flux2-klein, sd3, qwen-image, z-image, wan.")] = None,
    grace: Annotated[float, typer.Option(help="Seconds in-flight streams get to finish on SIGTERM.")] = 30.0,
    max_batch_size: Annotated[int, typer.Option(help="Most prompts merged into one forward pass.")] = 16,
    max_wait_ms: Annotated[float, typer.Option(help="How long a request waits for others to batch with.")] = 2.0,
    max_queue: Annotated[int, typer.Option(help="Requests queued per model before RESOURCE_EXHAUSTED.")] = 256,
    max_prompts_per_call: Annotated[int, typer.Option(help="Most prompts in one Encode call.")] = 64,
    max_prompt_chars: Annotated[int, typer.Option(help="Longest prompt accepted, in characters.")] = 20_000,
    cache_mem: Annotated[str, typer.Option(help="Memory cache bound, e.g. 2GiB, 512MiB, 0 to disable; auto = 10% of "
                                           "RAM, at most 4GiB.")] = "auto",
    cache_dir: Annotated[Optional[str], typer.Option(help="Disk cache folder (default: $XDG_CACHE_HOME/promptcast/"
                                                     "embeddings, i.e. ~/.cache/...); 'none' disables it.")] = None,
    cache_disk_max: Annotated[str, typer.Option(help="Disk cache bound; least recently used entries go first.")
                              ] = "20GiB",
    cache_redis: Annotated[Optional[str], typer.Option(help="redis://host:port/db: a cache shared by every replica "
                                                       "(off by default).")] = None,
    cache_shm: Annotated[str, typer.Option(help="Memory hits published in /dev/shm for clients on this host, which "
                                           "read them in place, with no copy; 0 to disable.")] = "512MiB",
    tls_cert: Annotated[Optional[Path], typer.Option(help="Server certificate chain (PEM): serve TLS.")] = None,
    tls_key: Annotated[Optional[Path], typer.Option(help="Private key (PEM) of --tls-cert.")] = None,
    tls_client_ca: Annotated[Optional[Path], typer.Option(help="CA (PEM) that signs client certificates: "
                                                          "require one (mTLS).")] = None,
    token_file: Annotated[Optional[Path], typer.Option(help="Accepted bearer tokens, one a line (# comments); "
                                                       "re-read on SIGHUP. Health stays open.")] = None,
    metrics_port: Annotated[Optional[int], typer.Option(help="Serve Prometheus metrics on this port "
                                                        "(0 picks one).")] = None,
    health_port: Annotated[Optional[int], typer.Option(help="Also serve grpc.health.v1 in plaintext on this "
                                                       "port (kubelet gRPC probes cannot speak TLS).")] = None,
    http_port: Annotated[Optional[int], typer.Option(help="Also serve HTTP on this port: POST /predict (Hugging "
                                                     "Face's hosted FLUX.2 text encoder API), POST /v1/encode, GET "
                                                     "/healthz; HTTPS with --tls-cert. Needs promptcast[http].")
                         ] = None,
    gpu_timeout: Annotated[float, typer.Option(help="Health turns NOT_SERVING while one batch runs longer "
                                               "than this many seconds (a stuck GPU); 0 disables.")] = 300.0,
    max_batch_tokens: Annotated[int, typer.Option(help="Most padded tokens (prompts x max_sequence_length) in one "
                                                  "forward pass; bounds activation memory.")] = 16 * 512,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the encoders' layers (compiled and "
                                          "warmed before the server reports SERVING).")] = False,
    quantize: Annotated[Optional[str], typer.Option(help="Quantize the large text encoder (CUDA only): int8 or nf4 "
                                                    "(bitsandbytes), fp8 (torchao, float8 weights), fp8-dynamic "
                                                    "(torchao, float8 weights and activations: float8 matmuls on "
                                                    "Ada/Hopper).")] = None,
    cuda_graphs: Annotated[Optional[bool], typer.Option(
        "--cuda-graphs/--no-cuda-graphs", help="Replay the encoders as CUDA graphs, captured at start-up per batch "
        "size (combines with --compile). Default: on with a CUDA device, for every family whose pipeline pads "
        "prompts to a fixed length (all but qwen-image); --no-cuda-graphs runs them eagerly.")] = None,
    worker: Annotated[Optional[str], typer.Option(
        help="Where each model runs: thread (a worker thread of the server's process) or process (a child process "
        "of its own, with its own interpreter lock; outputs handed over in shared memory; restarted if it dies). "
        "Default: process with a CUDA device, thread on the CPU.")] = None,
):
    """Run the encoder server: text encoders only, embeddings streamed over gRPC."""
    from encoder_server.cache import default_memory_bytes
    from encoder_server.server import EncoderServer, ModelSpec, ServerConfig
    from encoder_server.service import Limits
    from encoder_server.tls import check_options
    from shared.config import check_dtype, check_port, check_port_free, parse_bytes, resolve_device
    from shared.disk_cache import default_cache_dir
    from shared.families import FAMILIES, PIPELINE_FAMILIES, family_of_pipeline
    from shared.sources import resolve_source

    # Everything is checked before a model loads (minutes, on a real box).
    if cache_redis and not cache_redis.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"--cache-redis {cache_redis!r} is not a Redis URL: use redis://host:6379/0")
    if family is not None and family not in FAMILIES:
        raise ValueError(f"--family {family!r} is not one of {', '.join(FAMILIES)}")
    check_dtype(dtype)
    for flag, value in (("--port", port), ("--metrics-port", metrics_port), ("--health-port", health_port)):
        check_port(value, flag)
    if http_port is not None:
        _check_http(http_port, port, metrics_port, health_port)
    check_options(tls_cert, tls_key, tls_client_ca)
    for flag, value, least in (("--max-batch-size", max_batch_size, 1), ("--max-queue", max_queue, 1),
                               ("--max-prompts-per-call", max_prompts_per_call, 1),
                               ("--max-prompt-chars", max_prompt_chars, 1), ("--max-batch-tokens", max_batch_tokens, 1),
                               ("--max-wait-ms", max_wait_ms, 0), ("--grace", grace, 0), ("--gpu-timeout", gpu_timeout, 0)):
        if value < least:
            raise ValueError(f"{flag} {value} must be at least {least}")
    for flag, value in (("--cache-mem", cache_mem), ("--cache-disk-max", cache_disk_max), ("--cache-shm", cache_shm)):
        if value != "auto":
            try:
                parse_bytes(value)
            except ValueError as e:
                raise ValueError(f"{flag} {e}") from None
    if worker not in (None, "thread", "process"):
        raise ValueError(f"--worker {worker!r}: use thread or process")
    names = [ModelSpec.parse(m, family) for m in model]
    for spec in names:
        if not spec.source:
            raise ValueError(f"--model {spec.name}=: give a source after '=' (a hub repo id or a local folder)")
        index = resolve_source(spec.source).read_json("model_index.json")  # names the file and the fix if bad
        if family is None and family_of_pipeline(index.get("_class_name")) is None:
            raise ValueError(f"--model {spec.source!r} is a {index.get('_class_name')!r}; promptcast serves "
                             f"{', '.join(sorted(PIPELINE_FAMILIES))} (or pass --family)")
    device = resolve_device(device)
    for flag, value in (("--port", port), ("--metrics-port", metrics_port), ("--health-port", health_port),
                        ("--http-port", http_port)):
        check_port_free(host, value, flag)
    if cache_dir is None:
        cache_dir = str(default_cache_dir())
    elif cache_dir.lower() == "none":
        cache_dir = None


    config = ServerConfig(
        models=names, host=host, port=port, device=device,
        dtype=dtype, grace=grace, limits=Limits(max_prompts_per_call, max_prompt_chars),
        max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue,
        cache_mem=default_memory_bytes() if cache_mem == "auto" else parse_bytes(cache_mem), cache_dir=cache_dir,
        cache_disk_max=parse_bytes(cache_disk_max), cache_redis=cache_redis, cache_shm=parse_bytes(cache_shm))
    text = lambda path: None if path is None else str(path)  # noqa: E731
    config = replace(config, tls_cert=text(tls_cert), tls_key=text(tls_key), tls_client_ca=text(tls_client_ca),
                     token_file=text(token_file), metrics_port=metrics_port, health_port=health_port,
                     gpu_timeout=gpu_timeout, http_port=http_port)
    config = replace(config, max_batch_tokens=max_batch_tokens, compile=compile, quantize=quantize,
                     cuda_graphs=cuda_graphs, worker=worker)

    async def run():
        await EncoderServer(config).run_until_signal()

    asyncio.run(run())
    logger.info("stopped")


def _check_http(http_port: int, port: int, metrics_port: int | None, health_port: int | None) -> None:
    """A valid, distinct port and the packages the gateway runs on, before anything loads."""
    if not 0 <= http_port <= 65535:
        raise ValueError(f"--http-port {http_port} is not a port: use 0-65535 (0 picks a free one)")
    for other, name in ((port, "--port"), (metrics_port, "--metrics-port"), (health_port, "--health-port")):
        if http_port and other == http_port:
            raise ValueError(f"--http-port {http_port} is {name} too: give HTTP a port of its own")
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ValueError(f"--http-port: the HTTP gateway needs starlette and uvicorn, and {e.name} is not installed: "
                         "pip install 'promptcast[http]'") from None
