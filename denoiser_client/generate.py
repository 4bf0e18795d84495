"""One image on a denoiser node: a job of one item, rendered by the same `DenoiserNode` as `promptcast batch`."""

from __future__ import annotations

import os
from pathlib import Path

from denoiser_client.embeddings import RemoteEmbedder
from denoiser_client.errors import InvalidArgument
from denoiser_client.node import DenoiserNode, RenderItem
from denoiser_client.options import GenerateOptions, check_image_path, check_options
from denoiser_client.pipeline import Timings, pick_encoder_model, save_atomically
from denoiser_client.remote import RemoteTextEncoder
from denoiser_client.vram import VramOptions
from shared.prompts import prompt_text


def render_one(node: DenoiserNode, encoder: RemoteTextEncoder, prompt, options: GenerateOptions, *, loras=(),
               progress=None) -> tuple[object, Timings, RenderItem]:
    """One image from `node` with embeddings from `encoder`: (PIL image, timings, the item as rendered)."""
    item = RenderItem(prompt=prompt_text(prompt), seed=options.seed, steps=options.steps, guidance=options.guidance,
                      width=options.width, height=options.height, negative_prompt=options.negative_prompt,
                      true_cfg_scale=options.true_cfg_scale, loras=tuple(loras),
                      reference_images=tuple(options.reference_images))
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
    Generate one image through the split pipeline and save it atomically.

    Args:
        encoder ([`RemoteTextEncoder`]): the encoder server's client.
        source (`str`): hub repo id or local diffusers folder (its transformer and VAE are loaded, text encoders never).
        prompt (`str` or `dict`): the prompt; a JSON object is sent as its compact JSON text (FLUX.2).
        out (`str` or `os.PathLike`): the image file (PNG, JPEG or WebP by suffix).
        options ([`GenerateOptions`]): seed, steps, size, guidance, negative prompt, reference images...
        pipe ([`DenoiserNode`] or a pipeline, *optional*): an already loaded denoiser to use.
        vram (`str` or [`VramOptions`], *optional*): `"auto"`, a plan name, or explicit options.
        vram_budget (`float`, *optional*): GiB the plan may use (default: the card's free memory).
        loras (`tuple[LoraRef, ...]`): LoRAs to apply with their weights, checked before any denoising.
        echo (`callable`, *optional*): where the chosen memory plan is reported.

    Returns:
        `(path, timings)`.
    """
    check_options(options)
    check_image_path(out)
    if pipe is None:
        explicit = vram if isinstance(vram, VramOptions) else None
        node = DenoiserNode.load(encoder, source, encoder_model=encoder_model, device=device, dtype=dtype,
                                 vram="auto" if explicit else vram, vram_budget=vram_budget, explicit=explicit,
                                 pixels=(options.width or 1024) * (options.height or 1024),
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
        image, timings, _ = render_one(node, encoder, prompt, options, loras=loras)
    finally:
        if loras:
            node.adapters.activate(())  # a loaded node goes back to the base model
    return save_atomically(image, out), timings
