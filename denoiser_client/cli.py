"""Denoiser-node commands: models, generate, demo, make-tiny-model. Parse, validate, call."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

EncoderOpt = Annotated[str, typer.Option("--encoder", "-e", help="host:port, a comma list, or dns:///name:port.")]
TokenOpt = Annotated[Optional[str], typer.Option(help="Bearer token (default: $PROMPTCAST_TOKEN).")]
TlsCaOpt = Annotated[Optional[Path], typer.Option(help="CA certificate (PEM) of a TLS server.")]
TimeoutOpt = Annotated[float, typer.Option(help="Deadline of each server call, in seconds.")]


def _client(encoder: str, token, tls_ca, timeout, retries: int = 4):
    from denoiser_client.remote import RemoteTextEncoder

    return RemoteTextEncoder(encoder, token=token, tls_ca=tls_ca, timeout=timeout, retries=retries)


def models(encoder: EncoderOpt, token: TokenOpt = None, tls_ca: TlsCaOpt = None, timeout: TimeoutOpt = 10.0):
    """List the models an encoder server hosts."""
    with _client(encoder, token, tls_ca, timeout) as client:
        for m in client.models():
            outputs = ", ".join(f"{o.name} {str(o.dtype).removeprefix('torch.')}{list(o.shape)}" for o in m.outputs)
            typer.echo(f"{m.name}\t{m.family}\t{m.source}\tmax_sequence_length {m.default_max_sequence_length}"
                       f" (limit {m.max_max_sequence_length})\t{outputs}")


def generate(
    encoder: EncoderOpt,
    model: Annotated[str, typer.Option("--model", "-m", help="Hub repo id or local diffusers folder (transformer + VAE "
                                       "are loaded; text encoders never).")],
    prompt: Annotated[str, typer.Option(help="The prompt.")],
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
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32.")] = "auto",
    token: TokenOpt = None, tls_ca: TlsCaOpt = None, timeout: TimeoutOpt = 120.0,
):
    """Generate one image on this node with embeddings from the encoder server."""
    from denoiser_client.generate import GenerateOptions, generate as run
    from shared.config import parse_dtype, resolve_device

    device = resolve_device(device)
    options = GenerateOptions(seed, steps, guidance, width, height, negative_prompt, true_cfg_scale,
                              max_sequence_length)
    options.call_kwargs(device)  # validate before loading anything
    with _client(encoder, token, tls_ca, timeout) as client:
        client.models()  # fail fast, before loading the transformer, if the server is unreachable
        path, t = run(client, model, prompt, out, encoder_model=encoder_model, options=options, device=device,
                      dtype=parse_dtype(dtype, device))
    typer.echo(f"{path}\tencode {t.encode:.3f}s transfer {t.transfer:.3f}s denoise {t.denoise:.3f}s "
               f"decode {t.decode:.3f}s\t{t.wire_bytes:,} bytes\tcache {','.join(t.cache_status)}")


def demo(out: Annotated[Path, typer.Option(help="Where to save the image.")] = Path("promptcast-demo.png"),
         prompt: str = "a red fox sitting in a snowy forest at dusk",
         family: Annotated[str, typer.Option(help="flux1, flux2 or flux2-klein.")] = "flux1"):
    """Offline end-to-end demo: tiny model, local encoder server, one image through gRPC."""
    from denoiser_client.demo import run_demo

    run_demo(str(out), prompt, family, echo=typer.echo)


def make_tiny_model(path: Path, family: Annotated[str, typer.Option(help="flux1, flux2 or flux2-klein.")] = "flux1",
                    seed: int = 0, overwrite: bool = False):
    """Write a complete small diffusers folder (real classes, random weights, local tokenizers)."""
    from shared.tiny_models import FAMILIES, make_tiny_model as make

    if family not in FAMILIES:
        raise typer.BadParameter(f"{family!r} is not one of {', '.join(FAMILIES)}", param_hint="--family")
    typer.echo(make(path, family, seed=seed, overwrite=overwrite))
