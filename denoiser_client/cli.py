"""Denoiser-node commands: models, generate, batch, demo, make-tiny-model. Parse, validate, call."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

EncoderOpt = Annotated[str, typer.Option("--encoder", "-e", help="host:port, a comma list, or dns:///name:port.")]
TokenOpt = Annotated[Optional[str], typer.Option(help="Bearer token (default: $PROMPTCAST_TOKEN).")]
TlsCaOpt = Annotated[Optional[Path], typer.Option(help="CA certificate (PEM) of a TLS server.")]
TlsCertOpt = Annotated[Optional[Path], typer.Option(help="Client certificate (PEM), for servers that require mTLS.")]
TlsKeyOpt = Annotated[Optional[Path], typer.Option(help="Private key (PEM) of --tls-cert.")]
TimeoutOpt = Annotated[float, typer.Option(help="Deadline of each server call, in seconds.")]
CacheDirOpt = Annotated[Optional[Path], typer.Option(help="Keep embeddings in this folder on this node: a repeated "
                                                     "prompt is read from it, with no network call.")]
QuantizeOpt = Annotated[Optional[str], typer.Option(help="fp8 (float8 weights, computed in --dtype), nf4 or int8 "
                                                    "(bitsandbytes, CUDA only).")]
OffloadOpt = Annotated[Optional[str], typer.Option(help="model, sequential or group: keep weights in CPU memory and "
                                                   "move them to the GPU when used (CUDA only).")]
VaeTilingOpt = Annotated[bool, typer.Option(help="Decode in tiles (lower peak memory at large sizes).")]
LoraOpt = Annotated[Optional[list[str]], typer.Option("--lora", help="PATH[:WEIGHT] of a .safetensors LoRA; repeat "
                                                      "to combine several.")]


def _vram(quantize, offload, vae_tiling):
    from denoiser_client.vram import VramOptions

    return VramOptions(quantize=quantize, offload=offload, vae_tiling=vae_tiling)


def _client(encoder: str, token, tls_ca, timeout, retries: int = 4, tls_cert=None, tls_key=None, cache_dir=None):
    from denoiser_client.remote import RemoteTextEncoder

    if (tls_cert is None) != (tls_key is None):
        raise typer.BadParameter("--tls-cert and --tls-key go together (mTLS): pass both or neither",
                                 param_hint="--tls-cert")
    return RemoteTextEncoder(encoder, token=token, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key,
                             timeout=timeout, retries=retries, cache_dir=cache_dir)


def models(encoder: EncoderOpt, token: TokenOpt = None, tls_ca: TlsCaOpt = None, tls_cert: TlsCertOpt = None,
           tls_key: TlsKeyOpt = None, timeout: TimeoutOpt = 10.0):
    """List the models an encoder server hosts."""
    with _client(encoder, token, tls_ca, timeout, tls_cert=tls_cert, tls_key=tls_key) as client:
        for m in client.models():
            outputs = ", ".join(f"{o.name} {str(o.dtype).removeprefix('torch.')}{list(o.shape)}" for o in m.outputs)
            typer.echo(f"{m.name}\t{m.family}\t{m.source}\tmax_sequence_length {m.default_max_sequence_length}"
                       f" (limit {m.max_max_sequence_length})\t{outputs}")


def generate(
    encoder: EncoderOpt,
    model: Annotated[str, typer.Option("--model", "-m", help="Hub repo id or local diffusers folder (transformer + VAE "
                                       "are loaded; text encoders never).")],
    prompt: Annotated[str, typer.Option(help="The prompt; a JSON object is sent as compact JSON (FLUX.2 "
                                        "structured prompts).")],
    out: Annotated[Path, typer.Option(help="Image file to write (PNG, JPEG, WebP by suffix).")],
    encoder_model: Annotated[Optional[str], typer.Option(help="Model name on the server (default: its only model, "
                                                         "else the one named like --model's last part).")] = None,
    seed: int = 0,
    steps: Annotated[Optional[int], typer.Option(help="Denoising steps (default: the pipeline's).")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Guidance scale (default: the pipeline's).")] = None,
    width: Annotated[Optional[int], typer.Option(help="Multiple of 16.")] = None,
    height: Annotated[Optional[int], typer.Option(help="Multiple of 16.")] = None,
    negative_prompt: Annotated[Optional[str], typer.Option(help="Used with --true-cfg-scale > 1.")] = None,
    true_cfg_scale: Annotated[Optional[float], typer.Option(help="True classifier-free guidance scale.")] = None,
    max_sequence_length: Annotated[Optional[int], typer.Option(help="Text tokens (default: the server model's).")
                                   ] = None,
    image: Annotated[Optional[list[Path]], typer.Option("--image", help="FLUX.2 reference image; repeat for up "
                                                        "to 10. Encoded by the local VAE.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32.")] = "auto",
    quantize: QuantizeOpt = None, offload: OffloadOpt = None, vae_tiling: VaeTilingOpt = False, lora: LoraOpt = None,
    token: TokenOpt = None, tls_ca: TlsCaOpt = None, tls_cert: TlsCertOpt = None, tls_key: TlsKeyOpt = None,
    timeout: TimeoutOpt = 120.0, cache_dir: CacheDirOpt = None,
):
    """Generate one image on this node with embeddings from the encoder server."""
    from denoiser_client.generate import GenerateOptions, generate as run
    from shared.config import parse_dtype, resolve_device

    device = resolve_device(device)
    options = GenerateOptions(seed, steps, guidance, width, height, negative_prompt, true_cfg_scale,
                              max_sequence_length, tuple(map(str, image or ())))
    options.call_kwargs(device)  # validate before loading anything
    from denoiser_client.lora import parse_lora

    vram, loras = _vram(quantize, offload, vae_tiling), [parse_lora(text) for text in lora or ()]
    vram.check(device)
    with _client(encoder, token, tls_ca, timeout, tls_cert=tls_cert, tls_key=tls_key, cache_dir=cache_dir) as client:
        client.models()  # fail fast, before loading the transformer, if the server is unreachable
        path, t = run(client, model, prompt, out, encoder_model=encoder_model, options=options, device=device,
                      dtype=parse_dtype(dtype, device), vram=vram, loras=loras)
    typer.echo(f"{path}\tencode {t.encode:.3f}s transfer {t.transfer:.3f}s denoise {t.denoise:.3f}s "
               f"decode {t.decode:.3f}s\t{t.wire_bytes:,} bytes\tcache {','.join(t.cache_status)}")


def batch(
    input: Annotated[Path, typer.Argument(help="Job file: JSON lines, DataFlow `conversations` or `prompt` objects.")],
    encoder: EncoderOpt,
    model: Annotated[str, typer.Option("--model", "-m", help="Hub repo id or local diffusers folder.")],
    out_dir: Annotated[Path, typer.Option(help="Images go to DIR/images, result lines to DIR/results.jsonl.")],
    encoder_model: Annotated[Optional[str], typer.Option(help="Model name on the server.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Default denoising steps (a line's `steps` wins).")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Default guidance scale.")] = None,
    width: Annotated[Optional[int], typer.Option(help="Default width, a multiple of 16.")] = None,
    height: Annotated[Optional[int], typer.Option(help="Default height, a multiple of 16.")] = None,
    seed: Annotated[int, typer.Option(help="Default seed.")] = 0,
    negative_prompt: Annotated[Optional[str], typer.Option(help="Default negative prompt.")] = None,
    true_cfg_scale: Annotated[Optional[float], typer.Option(help="Default true CFG scale (FLUX.1).")] = None,
    max_sequence_length: Annotated[Optional[int], typer.Option(help="Text tokens (default: the server model's).")
                                   ] = None,
    batch_size: Annotated[int, typer.Option(help="Items with the same parameters denoised in one call.")] = 1,
    prefetch: Annotated[int, typer.Option(help="Items whose embeddings are requested ahead of the denoiser.")] = 4,
    shard: Annotated[Optional[str], typer.Option(help="I/N: this node takes every N-th line starting at I.")] = None,
    strict: Annotated[bool, typer.Option(help="Stop at the first bad line.")] = False,
    lora: LoraOpt = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32.")] = "auto",
    quantize: QuantizeOpt = None, offload: OffloadOpt = None, vae_tiling: VaeTilingOpt = False,
    token: TokenOpt = None, tls_ca: TlsCaOpt = None, tls_cert: TlsCertOpt = None, tls_key: TlsKeyOpt = None,
    timeout: TimeoutOpt = 120.0, cache_dir: CacheDirOpt = None,
):
    """Run a job file on this node: resumable, prefetched, sharded; exit code 1 if any line failed."""
    from denoiser_client.batch import BatchOptions, run_batch_command
    from denoiser_client.jobs import JobDefaults, parse_shard
    from denoiser_client.lora import parse_lora
    from shared.config import parse_dtype, resolve_device

    device = resolve_device(device)
    vram = _vram(quantize, offload, vae_tiling)
    vram.check(device)
    for name, value in (("--width", width), ("--height", height)):
        if value is not None and (value <= 0 or value % 16):
            raise typer.BadParameter(f"{value} is not a positive multiple of 16", param_hint=name)
    defaults = JobDefaults(seed=seed, steps=steps, guidance=guidance, width=width, height=height,
                           negative_prompt=negative_prompt, true_cfg_scale=true_cfg_scale,
                           loras=tuple(parse_lora(text) for text in lora or ()), model=model,
                           encoder_model=encoder_model, max_sequence_length=max_sequence_length)
    options = BatchOptions(batch_size=batch_size, prefetch=max(0, prefetch), strict=strict, shard=parse_shard(shard),
                           max_sequence_length=max_sequence_length)
    with _client(encoder, token, tls_ca, timeout, tls_cert=tls_cert, tls_key=tls_key, cache_dir=cache_dir) as client:
        summary = run_batch_command(client, input, out_dir, model, defaults=defaults, options=options,
                                    device=device, dtype=parse_dtype(dtype, device), vram=vram)
    for line in summary.lines():
        typer.echo(line, err=not summary.ok and line.startswith("  "))
    if not summary.ok:
        raise typer.Exit(1)
