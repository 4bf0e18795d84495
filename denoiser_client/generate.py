"""One image on a denoiser node: handshake, remote embeddings, local denoising, atomic save."""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path

from denoiser_client.errors import InvalidArgument
from denoiser_client.pipeline import (Timings, handshake, load_denoiser, load_reference_images, negative_prompt_for,
                                     remote_embeddings, run_pipeline)
from denoiser_client.remote import ModelInfo, RemoteTextEncoder
from shared.atomic_files import write_atomically
from shared.families import PIPELINE_FAMILIES
from shared.prompts import prompt_text


@dataclass
class GenerateOptions:
    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    negative_prompt: str | None = None
    true_cfg_scale: float | None = None
    max_sequence_length: int | None = None
    images: tuple[str, ...] = ()  # FLUX.2 reference images

    def call_kwargs(self, device: str) -> dict:
        import torch

        if self.width is not None and self.width % 16 or self.height is not None and self.height % 16:
            raise InvalidArgument(f"width={self.width} and height={self.height} must be divisible by 16")
        kwargs = {"generator": torch.Generator("cpu").manual_seed(self.seed),
                  "num_inference_steps": self.steps, "guidance_scale": self.guidance, "width": self.width,
                  "height": self.height, "true_cfg_scale": self.true_cfg_scale,
                  "max_sequence_length": self.max_sequence_length}
        return {k: v for k, v in kwargs.items() if v is not None}


def pick_encoder_model(encoder: RemoteTextEncoder, source: str, name: str | None) -> ModelInfo:
    """`--encoder-model`, else the server's only model, else the one named like SRC's last part."""
    models = {m.name: m for m in encoder.models()}
    if name is not None:
        return encoder.model_info(name)
    if len(models) == 1:
        return next(iter(models.values()))
    guess = source.rstrip("/").split("/")[-1]
    if guess in models:
        return models[guess]
    raise InvalidArgument(f"the server hosts {sorted(models)} and none is named {guess!r}: pass --encoder-model")


def save_atomically(image, out: str | os.PathLike) -> Path:
    """Save a PIL image so that `out` is never a partial image (temp file, fsync, rename)."""
    out = Path(out)
    image_format = (out.suffix.lstrip(".") or "png").upper().replace("JPG", "JPEG")
    return write_atomically(out, lambda f: image.save(f, format=image_format))


def generate(encoder: RemoteTextEncoder, source: str, prompt: str, out: str | os.PathLike, *,
             encoder_model: str | None = None, options: GenerateOptions = GenerateOptions(), device: str = "cpu",
             dtype=None, pipe=None, progress: bool = True, vram=None, loras=()) -> tuple[Path, Timings]:
    """Generate one image through the split pipeline and save it; returns `(path, timings)`.
    `vram` is a `vram.VramOptions`; `loras` are `jobs.LoraRef`s, checked before any denoising."""
    import torch

    info = pick_encoder_model(encoder, source, encoder_model)
    if pipe is None:
        pipe, family = load_denoiser(source, device=device, dtype=dtype or torch.float32, vram=vram)
    else:
        family = PIPELINE_FAMILIES[type(pipe).__name__]
    handshake(pipe, family, info)
    if loras:
        from denoiser_client.lora import LoraAdapters

        adapters = LoraAdapters(pipe)
        adapters.load(loras)
        adapters.activate(tuple(loras))
    pipe.set_progress_bar_config(disable=not progress)
    timings = Timings()
    call_kwargs = options.call_kwargs(device)
    accepted = inspect.signature(pipe.__call__).parameters
    unsupported = sorted(k for k in call_kwargs if k not in accepted)
    if unsupported:
        raise InvalidArgument(f"{type(pipe).__name__} does not take {', '.join(unsupported)}: drop those options")
    images = load_reference_images(list(options.images), family)
    if images:
        call_kwargs["image"] = images
    negative = negative_prompt_for(pipe, family, options.negative_prompt, guidance=options.guidance,
                                   true_cfg_scale=options.true_cfg_scale)
    embeddings = remote_embeddings(encoder, info.name, prompt_text(prompt), negative_prompt=negative,
                                   max_sequence_length=options.max_sequence_length, timings=timings)
    image = run_pipeline(pipe, embeddings, timings=timings, **call_kwargs)
    return save_atomically(image, out), timings
