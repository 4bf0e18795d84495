"""Denoiser-side pipelines: the diffusers pipeline with its text encoders left on the server."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from denoiser_client.errors import IncompatibleModel, InvalidArgument
from denoiser_client.remote import ModelInfo, RemoteTextEncoder
from shared.families import FAMILIES, PIPELINE_FAMILIES, family_of_pipeline
from shared.sources import ModelSourceError, resolve_source

logger = logging.getLogger(__name__)


def read_model_index(source: str) -> dict:
    """`model_index.json` of a local folder or hub repo (`org/name[@revision]`); `InvalidArgument` naming the file
    and the fix otherwise."""
    try:
        return resolve_source(source).read_json("model_index.json")
    except ModelSourceError as e:
        raise InvalidArgument(str(e)) from None


def load_denoiser(source: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32, vram=None):
    """Load a diffusers pipeline with every text encoder and tokenizer set to None: their weights
    are never read (nor downloaded) on the denoiser node, whatever `vram` (a `vram.VramOptions`: fp8/nf4/int8
    weights, CPU offloading, VAE tiling) says. Returns `(pipe, family)`."""
    import diffusers

    from denoiser_client.vram import VramOptions

    vram = vram or VramOptions()
    vram.check(device)  # before any weight is read

    class_name = read_model_index(source).get("_class_name")
    record = family_of_pipeline(class_name)
    if record is None:
        raise InvalidArgument(f"{source!r} is a {class_name!r}; promptcast denoises "
                              f"{', '.join(sorted(PIPELINE_FAMILIES))}")
    family = record.name
    none = {component: None for component in record.text_components}
    pipe = getattr(diffusers, class_name).from_pretrained(source, dtype=dtype, **none,
                                                          **vram.from_pretrained_kwargs(dtype))
    return vram.apply(pipe, device, dtype), family


def handshake(pipe, family: str, info: ModelInfo) -> None:
    """Refuse a server model whose embeddings do not fit this transformer, naming both numbers."""
    if info.family != family:
        raise IncompatibleModel(f"server model {info.name!r} is {info.family}, but the local pipeline is {family}: "
                                "pick a matching --encoder-model")
    config = pipe.transformer.config
    for output, key in FAMILIES[family].embedding_widths.items():
        spec = info.output(output)
        if spec is None:
            raise IncompatibleModel(f"server model {info.name!r} does not produce {output}")
        if spec.shape[-1] != config[key]:
            raise IncompatibleModel(
                f"server model {info.name!r} produces {output} of width {spec.shape[-1]}, but the local transformer's "
                f"{key} is {config[key]}: they belong to different models")


@dataclass
class Timings:
    encode: float = 0.0  # server time (queue + encode, or cache lookup)
    transfer: float = 0.0  # the rest of the encode call: network, (de)serialisation
    denoise: float = 0.0
    decode: float = 0.0
    wire_bytes: int = 0
    cache_status: list[str] = field(default_factory=list)


def remote_embeddings(encoder: RemoteTextEncoder, model: str, prompt: str, *, negative_prompt: str | None = None,
                      max_sequence_length: int | None = None, timings: Timings | None = None) -> dict:
    """Embeddings of a prompt (and its negative prompt), keyed as the diffusers call wants them."""
    timings = timings if timings is not None else Timings()
    prompts = [prompt] if negative_prompt is None else [prompt, negative_prompt]
    started = time.perf_counter()
    tensors, info = encoder.encode(prompts, model, max_sequence_length=max_sequence_length, with_info=True)
    total = time.perf_counter() - started
    timings.encode += info.server_seconds
    timings.transfer += max(0.0, total - info.server_seconds)
    timings.wire_bytes += info.bytes_received
    timings.cache_status += info.cache_status
    kwargs = {name: t[:1] for name, t in tensors.items()}
    if negative_prompt is not None:
        kwargs.update({f"negative_{name}": t[1:] for name, t in tensors.items()})
    return kwargs


MAX_REFERENCE_IMAGES = 10


def negative_prompt_for(pipe, family: str, negative_prompt: str | None, *, guidance: float | None = None,
                        true_cfg_scale: float | None = None) -> str | None:
    """The negative prompt whose embeddings this call needs from the server, if any.

    Mirrors each pipeline's own rule: FLUX.1 runs true CFG only with `true_cfg_scale > 1` and a negative
    prompt; a FLUX.2 klein *base* model (not distilled) runs CFG whenever guidance > 1, with "" as the
    default negative prompt; FLUX.2-dev is guidance-distilled and takes none.
    """
    try:
        return FAMILIES[family].negative_prompt(pipe.config, negative_prompt, guidance, true_cfg_scale)
    except ValueError as e:
        raise InvalidArgument(f"{family} {e}") from None


def load_reference_images(paths: list[str], family: str) -> list:
    """FLUX.2 reference images, opened locally (the VAE encodes them on this node)."""
    if not paths:
        return []
    if family == "flux1":
        raise InvalidArgument("reference images (--image) need a FLUX.2 model; FLUX.1 text-to-image takes none")
    if len(paths) > MAX_REFERENCE_IMAGES:
        raise InvalidArgument(f"{len(paths)} reference images is over {MAX_REFERENCE_IMAGES}, FLUX.2's limit")
    from PIL import Image

    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except OSError as e:
            raise InvalidArgument(f"reference image {path!r} cannot be read: {e}") from None
    return images


def run_pipeline(pipe, embeddings: dict, *, timings: Timings | None = None, **call_kwargs):
    """Call the pipeline on precomputed embeddings, splitting its time into denoise and decode."""
    timings = timings if timings is not None else Timings()
    marks = []

    def mark_step(pipeline, step, timestep, callback_kwargs):
        marks.append(time.perf_counter())
        return callback_kwargs

    started = time.perf_counter()
    image = pipe(**embeddings, **call_kwargs, callback_on_step_end=mark_step).images[0]
    finished = time.perf_counter()
    last_step = marks[-1] if marks else started
    timings.denoise += last_step - started
    timings.decode += finished - last_step
    return image
