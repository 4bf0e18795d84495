"""One image (or video) on a denoiser node: a job of one item, rendered by the same `DenoiserNode` as `promptcast
batch`."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from denoiser_client.embeddings import RemoteEmbedder
from denoiser_client.errors import InvalidArgument
from denoiser_client.media import save_output
from denoiser_client.node import DenoiserNode, RenderItem, planned_pixels
from denoiser_client.options import GenerateOptions, check_options, check_output_path, media_problems
from denoiser_client.pipeline import Timings, family_of, pick_encoder_model
from denoiser_client.remote import RemoteTextEncoder
from denoiser_client.vram import VramOptions
from shared.families import FAMILIES, PIPELINE_FAMILIES
from shared.prompts import prompt_text

logger = logging.getLogger(__name__)


def render_one(node: DenoiserNode, encoder: RemoteTextEncoder, prompt, options: GenerateOptions, *, loras=(),
               progress=None) -> tuple[object, Timings, RenderItem]:
    """One image from `node` with embeddings from `encoder`: (PIL image, or a video pipeline's list of frames,
    timings, the item as rendered). The prompt and the negative its pipeline's CFG needs come in one request, and
    are batched apart."""
    item = RenderItem.of(prompt_text(prompt), options, loras=tuple(loras))
    problem = node.check(item)
    if problem:
        raise InvalidArgument(problem)
    if item.loras:
        node.adapters.load(item.loras)  # checks each file against the transformer before any denoising
    timings = Timings()
    embedder = RemoteEmbedder(encoder, node.info.name, options.max_sequence_length, timings=timings)
    texts = [item.prompt] + ([item.negative_text] if item.negative_text is not None else [])
    rows = embedder.encode(texts)
    images = node.render([item], rows[:1], rows[1:] or None, timings=timings, progress=progress)
    return images[0], timings, item


def generate(encoder: RemoteTextEncoder, source: str, prompt, out: str | os.PathLike, *,
             encoder_model: str | None = None, options: GenerateOptions = GenerateOptions(), device: str = "cpu",
             dtype=None, pipe=None, progress: bool = True, vram: str | VramOptions = "auto",
             vram_budget: float | None = None, loras=(), echo=None) -> tuple[Path, Timings]:
    r"""
    Generate one image (a video family: one video) through the split pipeline and save it atomically.

    Args:
        encoder ([`RemoteTextEncoder`]): the encoder server's client.
        source (`str`): hub repo id or local diffusers folder (its transformer and VAE are loaded, text encoders never).
        prompt (`str` or `dict`): the prompt; a JSON object is sent as its compact JSON text (FLUX.2).
        out (`str` or `os.PathLike`): the image file (PNG, JPEG or WebP by suffix); a video family's MP4 or GIF (with
            no MP4 encoder installed, an MP4's frames go to `NAME_frames/` as PNG files, and `echo` says so).
        options ([`GenerateOptions`]): seed, steps, size, guidance, negative prompt, reference images, frames...
        pipe ([`DenoiserNode`] or a pipeline, *optional*): an already loaded denoiser to use.
        vram (`str` or [`VramOptions`], *optional*): `"auto"`, a plan name, or explicit options.
        vram_budget (`float`, *optional*): GiB the plan may use (default: the card's free memory).
        loras (`tuple[LoraRef, ...]`): LoRAs to apply with their weights, checked before any denoising.
        echo (`callable`, *optional*): where the chosen memory plan, and frames written instead of an MP4, are
            reported (default: the log).

    Returns:
        `(path written, timings)`.
    """
    check_options(options)
    if pipe is None:
        family = family_of(source)
    else:
        family = PIPELINE_FAMILIES[type(pipe.pipe if isinstance(pipe, DenoiserNode) else pipe).__name__]
    media = FAMILIES[family].media
    check_output_path(out, media)
    problems = media_problems(options, family, media)
    if problems:
        raise ValueError("; ".join(problems))
    if pipe is None:
        explicit = vram if isinstance(vram, VramOptions) else None
        node = DenoiserNode.load(encoder, source, encoder_model=encoder_model, device=device, dtype=dtype,
                                 vram="auto" if explicit else vram, vram_budget=vram_budget, explicit=explicit,
                                 pixels=planned_pixels(options.width, options.height, options.num_frames, media),
                                 max_sequence_length=options.max_sequence_length, echo=echo)
    elif isinstance(pipe, DenoiserNode):
        node = pipe
    else:
        from denoiser_client.pipeline import handshake

        node = DenoiserNode(pipe, source=source, device=device, dtype=dtype,
                            info=pick_encoder_model(encoder, source, encoder_model))
        handshake(pipe, node.family, node.info)
    node.pipe.set_progress_bar_config(disable=not progress)
    try:
        result, timings, item = render_one(node, encoder, prompt, options, loras=loras)
    finally:
        if loras:
            node.adapters.activate(())  # a loaded node goes back to the base model
    path, note = save_output(result, out, media, fps=item.fps)
    if note:
        (echo or logger.warning)(note)
    return path, timings
