"""Denoiser-side pipelines: the diffusers pipeline with its text encoders left on the server.

Loading (text encoders never read), the handshake with the server's model, the one place that puts embeddings on
the pipeline's execution device and dtype (diffusers does not move given embeddings), timed calls.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from denoiser_client.errors import IncompatibleModel, InvalidArgument
from denoiser_client.remote import ModelInfo, RemoteTextEncoder
from shared.collate import batch_of, collate, rows_of
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


def family_of(source: str) -> str:
    """The family of a model source, from its `model_index.json`; `InvalidArgument` if promptcast does not
    denoise it."""
    class_name = read_model_index(source).get("_class_name")
    record = family_of_pipeline(class_name)
    if record is None:
        raise InvalidArgument(f"{source!r} is a {class_name!r}; promptcast denoises "
                              f"{', '.join(sorted(PIPELINE_FAMILIES))}")
    return record.name


def transformer_parameters(source: str) -> int:
    """The transformer's parameter count, from its config alone (built on the meta device: no weights read)."""
    import diffusers

    try:
        resolved = resolve_source(source)
        config = resolved.read_json("transformer/config.json")
    except ModelSourceError as e:
        raise InvalidArgument(str(e)) from None
    cls = getattr(diffusers, config.get("_class_name", ""), None)
    if cls is None:
        raise InvalidArgument(f"{source!r}: transformer/config.json names {config.get('_class_name')!r}, which this "
                              "diffusers does not have")
    with torch.device("meta"):
        model = cls.from_config(config)
    return sum(p.numel() for p in model.parameters())


def load_denoiser(source: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32, vram=None):
    """Load a diffusers pipeline with every text encoder and tokenizer set to None: their weights
    are never read (nor downloaded) on the denoiser node, whatever `vram` (a `vram.VramOptions`: fp8/nf4/int8
    weights, CPU offloading, VAE tiling) says. Returns `(pipe, family)`."""
    import diffusers

    from denoiser_client.vram import VramOptions

    vram = vram or VramOptions()
    vram.check(device)  # before any weight is read
    family = family_of(source)
    class_name = read_model_index(source)["_class_name"]
    none = {component: None for component in FAMILIES[family].text_components}
    repo, _, revision = source.partition("@") if not Path(source).expanduser().exists() else (source, "", "")
    kwargs = {"revision": revision} if revision else {}
    pipe = getattr(diffusers, class_name).from_pretrained(repo, dtype=dtype, **none, **kwargs,
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


def pick_encoder_model(encoder: RemoteTextEncoder, source: str, name: str | None) -> ModelInfo:
    """`--encoder-model`, else the server's only model, else the one named like SRC's last part (one ListModels)."""
    models = {m.name: m for m in encoder.models()}
    if name is not None:
        return encoder.model_info(name)
    if len(models) == 1:
        return next(iter(models.values()))
    guess = source.rstrip("/").split("/")[-1].split("@")[0]
    if guess in models:
        return models[guess]
    raise InvalidArgument(f"the server hosts {sorted(models)} and none is named {guess!r}: pass --encoder-model")


def compute_dtype(pipe) -> torch.dtype:
    """The dtype the transformer computes in (its weights may be stored in float8 or 4 bits): the VAE's."""
    return pipe.vae.dtype


def place_embeddings(pipe, embeddings: dict) -> dict:
    """Embeddings on the pipeline's execution device, floating-point ones in its compute dtype (each tensor of a list,
    as Z-Image takes them, too): diffusers uses given embeddings as they are, so CPU tensors on a CUDA pipeline, or
    fp32 ones on a bf16 pipeline, would fail there."""
    device, dtype = pipe._execution_device, compute_dtype(pipe)

    def place(t):
        if isinstance(t, (list, tuple)):
            return type(t)(place(x) for x in t)
        return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

    return {name: place(t) for name, t in embeddings.items()}


@dataclass
class Timings:
    encode: float = 0.0  # server time (queue + encode, or cache lookup)
    transfer: float = 0.0  # the rest of the encode call: network, (de)serialisation
    denoise: float = 0.0
    decode: float = 0.0
    wire_bytes: int = 0
    cache_status: list[str] = field(default_factory=list)

    def add_encode(self, info, seconds: float) -> None:
        self.encode += info.server_seconds
        self.transfer += max(0.0, seconds - info.server_seconds)
        self.wire_bytes += info.bytes_received
        self.cache_status += info.cache_status


def remote_embeddings(encoder: RemoteTextEncoder, model: str, prompt: str, *, negative_prompt: str | None = None,
                      max_sequence_length: int | None = None, timings: Timings | None = None) -> dict:
    """Embeddings of a prompt (and its negative prompt), keyed as the diffusers call wants them (CPU tensors:
    `run_pipeline` or `place_embeddings` put them where the pipeline computes). One request; the prompt and its
    negative are batched apart by the model's layouts, as the pipeline encodes them (a Qwen-Image prompt is never
    padded to its negative's length)."""
    prompts = [prompt] if negative_prompt is None else [prompt, negative_prompt]
    started = time.perf_counter()
    tensors, info = encoder.encode(prompts, model, max_sequence_length=max_sequence_length, with_info=True,
                                   collated=False)
    if timings is not None:
        timings.add_encode(info, time.perf_counter() - started)
    rows, layouts = rows_of(tensors), encoder.model_info(model).layouts
    kwargs = collate(batch_of(rows[:1]), layouts)
    if negative_prompt is not None:
        kwargs.update(collate(batch_of(rows[1:]), layouts, prefix="negative_"))
    return kwargs


def negative_prompt_for(pipe, family: str, negative_prompt: str | None, *, guidance: float | None = None,
                        true_cfg_scale: float | None = None) -> str | None:
    """The negative prompt whose embeddings this call needs from the server, if any, by the family's own rule
    (FLUX.1: true CFG with `true_cfg_scale > 1`; a FLUX.2 klein base model: CFG whenever guidance > 1, "" by
    default; FLUX.2-dev: guidance-distilled, none)."""
    try:
        return FAMILIES[family].negative_prompt(pipe.config, negative_prompt, guidance, true_cfg_scale)
    except ValueError as e:
        raise InvalidArgument(f"{family} {e}") from None


def load_reference_images(paths: list[str], family: str) -> list:
    """Reference images (FLUX.2), opened locally: the node's VAE encodes them."""
    if not paths:
        return []
    limit = FAMILIES[family].max_reference_images
    if not limit:
        raise InvalidArgument(f"reference images need a FLUX.2 model; {family} text-to-image takes none")
    if len(paths) > limit:
        raise InvalidArgument(f"{len(paths)} reference images is over {limit}, the limit of {family}")
    from PIL import Image

    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except OSError as e:
            raise InvalidArgument(f"reference image {path!r} cannot be read: {e}") from None
    return images


def run_pipeline(pipe, embeddings: dict, *, timings: Timings | None = None, progress=None, **call_kwargs) -> list:
    """Call the pipeline on precomputed embeddings (placed on its device first); returns one result per prompt: its
    image, or for a video pipeline its frames (`.frames`). Splits the time into denoise and decode;
    `progress(step, steps)` is called after each denoising step."""
    timings = timings if timings is not None else Timings()
    marks = []
    steps = call_kwargs.get("num_inference_steps")

    def mark_step(pipeline, step, timestep, callback_kwargs):
        marks.append(time.perf_counter())
        if progress is not None:
            progress(step + 1, steps or getattr(pipeline, "num_timesteps", step + 1))
        return callback_kwargs

    started = time.perf_counter()
    with torch.inference_mode():
        output = pipe(**place_embeddings(pipe, embeddings), **call_kwargs, callback_on_step_end=mark_step)
    finished = time.perf_counter()
    last_step = marks[-1] if marks else started
    timings.denoise += last_step - started
    timings.decode += finished - last_step
    return output.frames if hasattr(output, "frames") else output.images
