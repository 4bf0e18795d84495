"""Denoiser-node commands: models, generate, batch. Parse and validate everything first, then call.

Every value is checked before a model loads or the server is asked anything that costs time: sizes, steps and
seeds, output paths and suffixes, the device (a CUDA device must exist), the dtype, the memory plan, LoRA and
reference-image files, TLS files. A bad one is one `error:` line naming the argument, the value and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from denoiser_client.options import (GenerateOptions, check_options, check_output_path, check_readable_files,
                                     media_problems)

EncoderOpt = Annotated[str, typer.Option("--encoder", "-e", help="host:port, a comma list, or dns:///name:port.")]
TokenOpt = Annotated[Optional[str], typer.Option(help="Bearer token (default: $PROMPTCAST_TOKEN).")]
TlsCaOpt = Annotated[Optional[Path], typer.Option(help="CA certificate (PEM) of a TLS server.")]
TlsCertOpt = Annotated[Optional[Path], typer.Option(help="Client certificate (PEM), for servers that require mTLS.")]
TlsKeyOpt = Annotated[Optional[Path], typer.Option(help="Private key (PEM) of --tls-cert.")]
TimeoutOpt = Annotated[float, typer.Option(help="Deadline of each server call, in seconds.")]
CacheDirOpt = Annotated[Optional[Path], typer.Option(help="Keep embeddings in this folder on this node: a repeated "
                                                     "prompt is read from it, with no network call.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")]
DtypeOpt = Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32.")]
VramOpt = Annotated[str, typer.Option(help="Memory plan: auto (on CUDA, the fastest plan predicted to fit the free "
                                      "memory or --vram-budget) or one of full, full+tiling, fp8, fp8+tiling, "
                                      "nf4+tiling, fp8+group-offload, sequential-offload. --quantize, --offload and "
                                      "--vae-tiling override it.")]
VramBudgetOpt = Annotated[Optional[float], typer.Option(help="GiB of GPU memory the node may use (a shared card); "
                                                        "default: what is free.")]
QuantizeOpt = Annotated[Optional[str], typer.Option(help="Node weights: fp8 (diffusers layerwise casting: float8 "
                                                    "storage, computed in --dtype; the server's --quantize fp8 is "
                                                    "torchao's), nf4 or int8 (bitsandbytes, CUDA only).")]
OffloadOpt = Annotated[Optional[str], typer.Option(help="model, sequential or group: keep weights in CPU memory and "
                                                   "move them to the GPU when used (CUDA only).")]
VaeTilingOpt = Annotated[bool, typer.Option(help="Decode in tiles (lower peak memory at large sizes).")]
LoraOpt = Annotated[Optional[list[str]], typer.Option("--lora", help="PATH[:WEIGHT] of a .safetensors LoRA; repeat "
                                                      "to combine several.")]
NumFramesOpt = Annotated[Optional[int], typer.Option(help="Video families (wan): frames to make, 4k+1 (default: the "
                                                     "pipeline's, 81).")]
FpsOpt = Annotated[Optional[int], typer.Option(help="Video families (wan): frames a second of the file written "
                                               "(default 16).")]


@dataclass
class NodeSetup:
    """Checked node options: where and how the denoiser loads."""

    device: str
    dtype: object
    vram: str
    vram_budget: float | None
    explicit: object  # VramOptions from --quantize/--offload/--vae-tiling, or None
    loras: tuple


def check_node_options(device: str, dtype: str, vram: str, vram_budget: float | None, quantize, offload,
                       vae_tiling: bool, lora=None) -> NodeSetup:
    """Everything about how the node loads, checked before any model loads."""
    from denoiser_client.lora import parse_lora
    from denoiser_client.vram import PLANS, VramOptions
    from shared.config import parse_dtype, resolve_device

    device = resolve_device(device)
    torch_dtype = parse_dtype(dtype, device)
    if vram != "auto" and vram not in PLANS:
        raise ValueError(f"--vram {vram!r} is not a memory plan: use auto or one of {', '.join(PLANS)}")
    if vram_budget is not None and not vram_budget > 0:
        raise ValueError(f"--vram-budget {vram_budget}: give the GiB the node may use, a number above 0")
    if vram_budget is not None and not device.startswith("cuda"):
        raise ValueError(f"--vram-budget plans GPU memory, but --device is {device!r}: drop it or use a CUDA device")
    explicit = None
    if quantize is not None or offload is not None or vae_tiling:
        explicit = VramOptions(quantize=quantize, offload=offload, vae_tiling=vae_tiling)
    (explicit or PLANS.get(vram, VramOptions())).check(device)
    loras = tuple(parse_lora(text) for text in lora or ())
    for ref in loras:
        if not Path(ref.path).is_file():
            raise ValueError(f"--lora {ref.path!r} does not exist (or is not a file)")
        if Path(ref.path).suffix != ".safetensors":
            raise ValueError(f"--lora {ref.path!r} is not a .safetensors file; pickle formats are refused")
    return NodeSetup(device, torch_dtype, vram, vram_budget, explicit, loras)


def _client(encoder: str, token, tls_ca, timeout, retries: int = 4, tls_cert=None, tls_key=None, cache_dir=None):
    from denoiser_client.remote import RemoteTextEncoder

    if (tls_cert is None) != (tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together (mTLS): pass both or neither")
    for flag, path in (("--tls-ca", tls_ca), ("--tls-cert", tls_cert), ("--tls-key", tls_key)):
        if path is not None:
            check_readable_files([path], flag)
    if not timeout > 0:
        raise ValueError(f"--timeout {timeout}: every call needs a deadline, give seconds above 0")
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


def _echo_err(text: str) -> None:
    typer.echo(text, err=True)


def check_media(model: str, options: GenerateOptions, out: Path | None = None) -> str:
    """The model's family, once its folder (or hub repo) is known to be readable and of a family promptcast
    denoises; `ValueError` for video options given to an image family, or an output suffix of the wrong media."""
    from denoiser_client.pipeline import family_of
    from shared.families import FAMILIES

    family = family_of(model)
    media = FAMILIES[family].media
    problems = media_problems(options, family, media)
    if problems:
        raise ValueError("; ".join(problems))
    if out is not None:
        check_output_path(out, media)
    return family


def generate(
    encoder: EncoderOpt,
    model: Annotated[str, typer.Option("--model", "-m", help="Hub repo id or local diffusers folder (transformer + VAE "
                                       "are loaded; text encoders never).")],
    prompt: Annotated[str, typer.Option(help="The prompt; a JSON object is sent as compact JSON (FLUX.2 "
                                        "structured prompts).")],
    out: Annotated[Path, typer.Option(help="Image file to write (.png, .jpg, .webp); a video family's .mp4 or .gif "
                                      "(with no MP4 encoder installed, an .mp4's frames go to NAME_frames/ as PNG).")],
    encoder_model: Annotated[Optional[str], typer.Option(help="Model name on the server (default: its only model, "
                                                         "else the one named like --model's last part).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the initial noise, 0 to 2**64-1.")] = 0,
    steps: Annotated[Optional[int], typer.Option(help="Denoising steps (default: the pipeline's).")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Guidance scale (default: the pipeline's).")] = None,
    width: Annotated[Optional[int], typer.Option(help="A positive multiple of 16.")] = None,
    height: Annotated[Optional[int], typer.Option(help="A positive multiple of 16.")] = None,
    negative_prompt: Annotated[Optional[str], typer.Option(help="Used with --true-cfg-scale > 1 (FLUX.1) or by "
                                                           "pipelines that run CFG.")] = None,
    true_cfg_scale: Annotated[Optional[float], typer.Option(help="True classifier-free guidance scale.")] = None,
    max_sequence_length: Annotated[Optional[int], typer.Option(help="Text tokens (default: the server model's).")
                                   ] = None,
    image: Annotated[Optional[list[Path]], typer.Option("--image", help="FLUX.2 reference image; repeat for up "
                                                        "to 10. Encoded by the local VAE.")] = None,
    num_frames: NumFramesOpt = None, fps: FpsOpt = None,
    device: DeviceOpt = "auto", dtype: DtypeOpt = "auto", vram: VramOpt = "auto", vram_budget: VramBudgetOpt = None,
    quantize: QuantizeOpt = None, offload: OffloadOpt = None, vae_tiling: VaeTilingOpt = False, lora: LoraOpt = None,
    token: TokenOpt = None, tls_ca: TlsCaOpt = None, tls_cert: TlsCertOpt = None, tls_key: TlsKeyOpt = None,
    timeout: TimeoutOpt = 120.0, cache_dir: CacheDirOpt = None,
):
    """Generate one image (a video family: one video) on this node with embeddings from the encoder server."""
    options = check_options(GenerateOptions(seed=seed, steps=steps, guidance=guidance, width=width, height=height,
                                            negative_prompt=negative_prompt, true_cfg_scale=true_cfg_scale,
                                            max_sequence_length=max_sequence_length,
                                            reference_images=tuple(map(str, image or ())), num_frames=num_frames,
                                            fps=fps))
    check_output_path(out, "video" if out.suffix.lower() in (".mp4", ".gif") else "image")
    check_readable_files(options.reference_images, "--image")
    setup = check_node_options(device, dtype, vram, vram_budget, quantize, offload, vae_tiling, lora)
    from denoiser_client.generate import generate as run

    check_media(model, options, out)

    with _client(encoder, token, tls_ca, timeout, tls_cert=tls_cert, tls_key=tls_key, cache_dir=cache_dir) as client:
        path, t = run(client, model, prompt, out, encoder_model=encoder_model, options=options, device=setup.device,
                      dtype=setup.dtype, vram=setup.explicit or setup.vram, vram_budget=setup.vram_budget,
                      loras=setup.loras, echo=_echo_err)
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
    width: Annotated[Optional[int], typer.Option(help="Default width, a positive multiple of 16.")] = None,
    height: Annotated[Optional[int], typer.Option(help="Default height, a positive multiple of 16.")] = None,
    seed: Annotated[int, typer.Option(help="Default seed.")] = 0,
    negative_prompt: Annotated[Optional[str], typer.Option(help="Default negative prompt.")] = None,
    true_cfg_scale: Annotated[Optional[float], typer.Option(help="Default true CFG scale (FLUX.1, Qwen-Image).")
                              ] = None,
    max_sequence_length: Annotated[Optional[int], typer.Option(help="Text tokens (default: the server model's).")
                                   ] = None,
    num_frames: NumFramesOpt = None, fps: FpsOpt = None,
    batch_size: Annotated[int, typer.Option(help="Items with the same parameters denoised in one call (1-32).")] = 1,
    prefetch: Annotated[int, typer.Option(help="Items whose embeddings are requested ahead of the denoiser.")] = 4,
    shard: Annotated[Optional[str], typer.Option(help="I/N: this node takes every N-th line starting at I.")] = None,
    strict: Annotated[bool, typer.Option(help="Stop at the first bad line.")] = False,
    lora: LoraOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto", vram: VramOpt = "auto",
    vram_budget: VramBudgetOpt = None, quantize: QuantizeOpt = None, offload: OffloadOpt = None,
    vae_tiling: VaeTilingOpt = False,
    token: TokenOpt = None, tls_ca: TlsCaOpt = None, tls_cert: TlsCertOpt = None, tls_key: TlsKeyOpt = None,
    timeout: TimeoutOpt = 120.0, cache_dir: CacheDirOpt = None,
):
    """Run a job file on this node (a video family: one MP4 a line): resumable, prefetched, sharded; exit code 1 if
    any line failed."""
    from denoiser_client.batch import BatchOptions, run_batch_command
    from denoiser_client.jobs import JobDefaults, check_job_file, parse_shard

    options = check_options(GenerateOptions(seed=seed, steps=steps, guidance=guidance, width=width, height=height,
                                            negative_prompt=negative_prompt, true_cfg_scale=true_cfg_scale,
                                            max_sequence_length=max_sequence_length, num_frames=num_frames, fps=fps))
    check_job_file(input)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out-dir {str(out_dir)!r} is a file: pass a folder (it is created if missing)")
    if not 1 <= batch_size <= 32:
        raise ValueError(f"--batch-size {batch_size} must be from 1 to 32")
    setup = check_node_options(device, dtype, vram, vram_budget, quantize, offload, vae_tiling, lora)
    check_media(model, options)
    defaults = JobDefaults(seed=seed, steps=steps, guidance=guidance, width=width, height=height,
                           negative_prompt=negative_prompt, true_cfg_scale=true_cfg_scale, loras=setup.loras,
                           model=model, encoder_model=encoder_model, max_sequence_length=max_sequence_length,
                           num_frames=num_frames, fps=fps)
    options = BatchOptions(batch_size=batch_size, prefetch=max(0, prefetch), strict=strict, shard=parse_shard(shard),
                           max_sequence_length=max_sequence_length)
    with _client(encoder, token, tls_ca, timeout, tls_cert=tls_cert, tls_key=tls_key, cache_dir=cache_dir) as client:
        summary = run_batch_command(client, input, out_dir, model, defaults=defaults, options=options,
                                    device=setup.device, dtype=setup.dtype, vram=setup.vram,
                                    vram_budget=setup.vram_budget, explicit=setup.explicit, echo=_echo_err)
    for line in summary.lines():
        typer.echo(line, err=not summary.ok and line.startswith("  "))
    if not summary.ok:
        raise typer.Exit(1)
