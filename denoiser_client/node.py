"""A denoiser node: one loaded pipeline (transformer + VAE), its memory plan, its LoRAs, and the one way it renders.

`generate`, `batch` and the web console all render through `DenoiserNode.render`: the same checks, the same
diffusers call built by `CallBuilder` (arguments the pipeline's own signature takes; the prompts of a call, and apart
from them their negatives, batched by the server model's layouts), the same placement of embeddings on the execution
device, the same handling of an out-of-memory (an `OutOfGpuMemory` naming the plan in use and the next one to try;
`step_down` moves to it).
"""

from __future__ import annotations

import gc
import inspect
import logging
from dataclasses import dataclass, fields

import torch

from denoiser_client.errors import IncompatibleModel, InvalidArgument, OutOfGpuMemory
from denoiser_client.lora import LoraAdapters, LoraRef
from denoiser_client.options import DEFAULT_FPS, FRAMES_PER_LATENT, GenerateOptions
from denoiser_client.pipeline import (family_of, handshake, load_denoiser, load_reference_images, negative_prompt_for,
                                      pick_encoder_model, run_pipeline, transformer_parameters)
from denoiser_client.vram import PLANS, VramOptions, plan_named
from denoiser_client.vram_plans import GIB, PlanChoice, next_plan, pick_plan
from shared.collate import batch_of, collate
from shared.families import FAMILIES, PIPELINE_FAMILIES

logger = logging.getLogger(__name__)


@dataclass
class RenderItem(GenerateOptions):
    """What one image (or video) needs from the pipeline: its prompt, its options and LoRAs (job lines and `generate`
    both become these)."""

    prompt: str
    loras: tuple[LoraRef, ...] = ()
    negative_text: str | None = None  # what the pipeline's CFG rule needs encoded (set by `DenoiserNode.check`)

    @classmethod
    def of(cls, prompt: str, options: GenerateOptions, **extra) -> "RenderItem":
        """An item with every option of `options` (and `extra` fields)."""
        return cls(prompt=prompt, **{f.name: getattr(options, f.name) for f in fields(GenerateOptions)}, **extra)


class CallBuilder:
    """The diffusers call for a batch of items; defaults resolved from the pipeline so results record real values."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.family = PIPELINE_FAMILIES[type(pipe).__name__]
        self.media = FAMILIES[self.family].media
        self.params = inspect.signature(pipe.__call__).parameters
        self.size = getattr(pipe, "default_sample_size", 128) * getattr(pipe, "vae_scale_factor", 8)

    def default(self, name):
        p = self.params.get(name)
        return None if p is None else p.default

    def used(self, item) -> dict:
        """The steps, guidance and size the call will use (a video's frames and fps too)."""
        used = {"steps": item.steps or self.default("num_inference_steps"),
                "guidance": item.guidance if item.guidance is not None else self.default("guidance_scale"),
                "width": item.width or self.default("width") or self.size,
                "height": item.height or self.default("height") or self.size}
        if self.media == "video":
            used.update(num_frames=item.num_frames or self.default("num_frames"), fps=item.fps or DEFAULT_FPS)
        return used

    def problem(self, item) -> str | None:
        """Why this pipeline cannot run the item (checked before any denoising), or None; sets its negative text."""
        name = type(self.pipe).__name__
        for field, param in (("true_cfg_scale", "true_cfg_scale"), ("guidance", "guidance_scale"),
                             ("num_frames", "num_frames")):
            if getattr(item, field) is not None and param not in self.params:
                return f"{name} takes no {param}: drop {field}"
        if item.fps is not None and self.media != "video":
            return f"{name} makes images: drop fps"
        if item.guidance is not None and self.default("guidance_scale") is None \
                and not self.pipe.transformer.config.get("guidance_embeds", True):
            return (f"{name} takes guidance_scale only for guidance-distilled models, and this one runs true CFG: "
                    "drop guidance, set true_cfg_scale")
        problem = self.shape_problem(item)
        if problem:
            return problem
        try:
            item.negative_text = negative_prompt_for(self.pipe, self.family, item.negative_prompt,
                                                     guidance=item.guidance, true_cfg_scale=item.true_cfg_scale)
            if item.reference_images:
                load_reference_images(list(item.reference_images), self.family)
        except InvalidArgument as e:
            return str(e)
        return None

    def shape_problem(self, item) -> str | None:
        """A size or frame count this pipeline would round silently (a Wan VAE of 16x, not 8x, needs multiples of
        32), or None."""
        name, multiple = type(self.pipe).__name__, size_multiple(self.pipe)
        for side in ("width", "height"):
            value = getattr(item, side)
            if value is not None and value % multiple:
                return f"{side}={value}: {name} with this VAE needs a multiple of {multiple} (e.g. " \
                       f"{max(multiple, value // multiple * multiple)})"
        temporal = getattr(self.pipe, "vae_scale_factor_temporal", None)
        if item.num_frames is not None and temporal and (item.num_frames - 1) % temporal:
            return f"num_frames={item.num_frames}: {name} with this VAE takes {temporal}k+1 frames (e.g. " \
                   f"{(item.num_frames - 1) // temporal * temporal + 1})"
        return None

    def kwargs(self, items: list, embeddings: list[dict], negatives: list[dict] | None,
               layouts: dict | None = None) -> tuple[dict, dict]:
        """(embeddings of the batch, the other call arguments). `embeddings` and `negatives` hold one row per item,
        batched apart by `layouts` (the server model's; stacked when unknown). Embeddings stay where they are:
        `run_pipeline` places them."""
        layouts = layouts or {}
        tensors = collate(batch_of(embeddings), layouts)
        if negatives is not None:
            tensors.update(collate(batch_of(negatives), layouts, prefix="negative_"))
        first = items[0]
        call = dict(generator=[torch.Generator("cpu").manual_seed(item.seed) for item in items],
                    num_inference_steps=first.steps, guidance_scale=first.guidance, width=first.width,
                    height=first.height, true_cfg_scale=first.true_cfg_scale, num_frames=first.num_frames)
        if self.media == "video":
            call["output_type"] = "pil"  # frames as PIL images, as images are: one conversion to 8 bits for all
        if first.reference_images:
            call["image"] = load_reference_images(list(first.reference_images), self.family)
        return tensors, {k: v for k, v in call.items() if v is not None and k in self.params}


def size_multiple(pipe) -> int:
    """What width and height must be multiples of for `pipe` to use them as given: at least 16 (an 8x VAE and 2x2
    patches, packed into the latents or patchified by the transformer), more where the VAE's spatial factor times the
    transformer's patch size is larger (a 16x Wan 2.2 VAE with 2x2 patches: 32)."""
    patch = getattr(pipe.transformer.config, "patch_size", 2) if pipe.transformer is not None else 2
    patch = patch[-1] if isinstance(patch, (list, tuple)) else patch
    spatial = getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_scale_factor", 8)
    return max(16, spatial * patch)


def planned_pixels(width: int | None, height: int | None, num_frames: int | None = None, media: str = "image"
                   ) -> float:
    """What the memory planner scales activations by: an image's pixels (1024x1024 when unset), times a video's
    latent frames (81 frames: 21)."""
    pixels = (width or 1024) * (height or 1024)
    return pixels * (((num_frames or 81) - 1) // FRAMES_PER_LATENT + 1) if media == "video" else pixels


def plan_for(family: str, source: str, device: str, *, vram: str = "auto", budget_gib: float | None = None,
             explicit: VramOptions | None = None, pixels: float = 1024**2, images: int = 1) -> PlanChoice:
    """The memory plan to load with: explicit options win, then `--vram NAME`, then auto (CUDA: the fastest plan
    predicted to fit the free memory or `--vram-budget`; elsewhere: no planning)."""
    if explicit is not None:
        return PlanChoice(explicit.name, explicit, None, None)
    if vram != "auto":
        return PlanChoice(vram, plan_named(vram), None, None)
    if not str(device).startswith("cuda"):
        return PlanChoice("full", PLANS["full"], None, None)
    budget = budget_gib * GIB if budget_gib is not None else torch.cuda.mem_get_info(torch.device(device))[0]
    return pick_plan(family, transformer_parameters(source), pixels, budget, device, images)


class DenoiserNode:
    r"""
    A pipeline loaded for denoising with remote embeddings.

    Args:
        pipe ([`~diffusers.DiffusionPipeline`]): loaded with its text encoders set to None (`load_denoiser`).
        plan (`PlanChoice`, *optional*): the memory plan it was loaded with.
        source (`str`, *optional*), device (`str`, *optional*), dtype (`torch.dtype`, *optional*): how to load it
            again under another plan (`step_down`).
        info (`ModelInfo`, *optional*): the encoder server's model it is paired with (checked at the handshake).
    """

    def __init__(self, pipe, *, plan: PlanChoice | None = None, source: str | None = None, device: str = "cpu",
                 dtype: torch.dtype | None = None, info=None):
        self.pipe, self.family = pipe, PIPELINE_FAMILIES[type(pipe).__name__]
        self.plan = plan or PlanChoice("custom", VramOptions(), None, None)
        self.source, self.device, self.dtype, self.info = source, device, dtype, info
        self.adapters = LoraAdapters(pipe)
        self.builder = CallBuilder(pipe)

    @classmethod
    def load(cls, encoder, source: str, *, encoder_model: str | None = None, device: str = "cpu",
             dtype: torch.dtype | None = None, vram: str = "auto", vram_budget: float | None = None,
             explicit: VramOptions | None = None, pixels: float = 1024**2, images: int = 1,
             max_sequence_length: int | None = None, echo=None) -> "DenoiserNode":
        """Pick the server's model (one ListModels call), check what can be checked against it, choose the memory
        plan, load, handshake."""
        info = pick_encoder_model(encoder, source, encoder_model)
        family = family_of(source)
        if info.family != family:  # before minutes of loading
            raise IncompatibleModel(f"server model {info.name!r} is {info.family}, but {source!r} is {family}: "
                                    "pick a matching --encoder-model")
        if max_sequence_length is not None and max_sequence_length > info.max_max_sequence_length:
            raise InvalidArgument(f"--max-sequence-length {max_sequence_length} is over "
                                  f"{info.max_max_sequence_length}, the limit of server model {info.name!r}")
        plan = plan_for(family, source, device, vram=vram, budget_gib=vram_budget, explicit=explicit,
                        pixels=pixels, images=images)
        if echo is not None and str(device).startswith("cuda"):
            echo(f"vram: {plan.describe()}")
        dtype = dtype or torch.float32
        pipe, _ = load_denoiser(source, device=device, dtype=dtype, vram=plan.options)
        handshake(pipe, family, info)
        return cls(pipe, plan=plan, source=source, device=device, dtype=dtype, info=info)

    @property
    def media(self) -> str:
        """What the pipeline makes: "image", or "video" (frames)."""
        return self.builder.media

    @property
    def layouts(self) -> dict:
        """How the server model's outputs are batched (none known without a server model: stacked)."""
        return self.info.layouts if self.info is not None else {}

    def check(self, item) -> str | None:
        return self.builder.problem(item)

    def render(self, items: list, embeddings: list[dict], negatives: list[dict] | None = None, *, layouts=None,
               timings=None, progress=None) -> list:
        """Images (a video pipeline: each item's frames) for `items`, from one row of embeddings per item (and per
        negative) as `RemoteEmbedder` gives them, batched by `layouts` (default: the server model's), in one
        diffusers call (they share steps, size and LoRAs). Raises `OutOfGpuMemory`."""
        self.adapters.activate(tuple(items[0].loras))
        tensors, call = self.builder.kwargs(items, embeddings, negatives,
                                            self.layouts if layouts is None else layouts)
        try:
            return run_pipeline(self.pipe, tensors, timings=timings, progress=progress, **call)
        except torch.OutOfMemoryError:
            pass  # raised below, outside the handler: its traceback would pin the failed call's activations
        free_memory()
        used = self.builder.used(items[0])
        following = self.next_plan(used["width"] * used["height"], len(items))
        hint = f"try --vram {following}" if following else "no smaller memory plan is left: use a smaller size"
        raise OutOfGpuMemory(f"out of GPU memory with {self.plan.describe()} at {used['width']}x{used['height']} "
                             f"({len(items)} image(s) a call): {hint}")

    def next_plan(self, pixels: float, images: int = 1) -> str | None:
        if self.source is None or not str(self.device).startswith("cuda"):
            return None
        return next_plan(self.family, self.plan.options, transformer_parameters(self.source), pixels, self.device,
                         images)

    def step_down(self, pixels: float, images: int = 1) -> str | None:
        """Reload under the next memory plan down (LoRAs loaded again); its name, or None when none is left."""
        following = self.next_plan(pixels, images)
        if following is None:
            return None
        options = PLANS[following]
        loaded = [LoraRef(path) for path in self.adapters.names]
        active = self.adapters.active
        if options.quantize == self.plan.options.quantize and options.offload == self.plan.options.offload:
            from denoiser_client.vram import enable_vae_tiling

            enable_vae_tiling(self.pipe.vae)  # only tiling differs: no reload
        else:
            self.adapters.unload()
            self.pipe = self.builder.pipe = None
            free_memory()
            self.pipe, _ = load_denoiser(self.source, device=self.device, dtype=self.dtype, vram=options)
            self.builder = CallBuilder(self.pipe)
            self.adapters = LoraAdapters(self.pipe)
            if loaded:
                self.adapters.load(loaded)
                self.adapters.activate(active)
        logger.warning("memory plan %s ran out of memory; continuing with %s", self.plan.name, following)
        self.plan = PlanChoice(following, options, None, None)
        return following


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
