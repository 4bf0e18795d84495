"""Making the transformer fit a small card: dtype, fp8/nf4/int8 weights, CPU offloading, VAE tiling.

A node's *memory plan* is one `VramOptions`. The named plans (`PLANS`, fastest first) are what `--vram auto` picks
from (`vram_plans.pick_plan`); `--vram NAME` asks for one, and `--quantize/--offload/--vae-tiling` build any other.

`--quantize fp8` on a node is diffusers' layerwise casting (`diffusers.hooks.apply_layerwise_casting`): weights are
stored in float8_e4m3fn and each layer is upcast to the compute dtype just before it runs. (The encoder server's
`--quantize fp8` is torchao's float8 weight-only config; its `fp8-dynamic` also quantizes activations.) We chose
layerwise casting for nodes because it is part of diffusers itself (kept working with diffusers' own offloading and
LoRA hooks), works on every device including CPU (so it is tested here), needs no compile or warm-up, and torchao's
weight-only float8 path dequantises before a bf16 matmul just the same, so it is not faster.

What stays in the compute dtype under fp8: the embedders and the final `norm_out`/`proj_out` (`FP8_KEEP`). Unlike
diffusers' default skip list (whose "norm" pattern also keeps every block's AdaLN modulation Linear, about 3.2 B of
FLUX.1's 11.9 B parameters, in bf16), the modulation layers are stored in fp8 like every other block Linear, as fp8
FLUX checkpoints commonly store them: the FLUX.1 transformer drops from 22.2 to 11.1 GiB.

`--quantize nf4|int8` uses bitsandbytes, which only runs on CUDA; it is refused on CPU before anything is loaded.
Whatever the options, text encoders are never loaded: `load_denoiser` passes them as None.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

from denoiser_client.errors import InvalidArgument
from shared.config import BITSANDBYTES_HINT

logger = logging.getLogger(__name__)

QUANTIZE = ("fp8", "nf4", "int8")
# re.search patterns of transformer modules kept in the compute dtype under --quantize fp8 (see the module doc).
FP8_KEEP = ("pos_embed", "patch_embed", "embed", r"^proj_in$", r"^proj_out$", r"^norm_out")
OFFLOAD = ("model", "sequential", "group")


@dataclass(frozen=True)
class VramOptions:
    r"""
    How the denoiser's weights are held: one memory plan.

    Args:
        quantize (`str`, *optional*):
            `fp8` (float8 storage, computed in the pipeline dtype), `nf4` or `int8` (bitsandbytes, CUDA only).
        offload (`str`, *optional*):
            `model` (`enable_model_cpu_offload`), `sequential` (`enable_sequential_cpu_offload`) or `group`
            (transformer group offloading, block by block with a CUDA stream). Needs an accelerator.
        vae_tiling (`bool`, *optional*, defaults to `False`):
            Decode in tiles: the VAE's peak memory at 1024x1024 and above drops to a tile's.
    """

    quantize: str | None = None
    offload: str | None = None
    vae_tiling: bool = False

    @property
    def name(self) -> str:
        """The plan's name in `PLANS`, or its options spelled out."""
        for name, plan in PLANS.items():
            if plan == self:
                return name
        parts = [self.quantize or "full", *([f"{self.offload}-offload"] if self.offload else []),
                 *(["tiling"] if self.vae_tiling else [])]
        return "+".join(parts)

    def check(self, device: str) -> None:
        """Refuse impossible combinations before any weight is read."""
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise InvalidArgument(f"--quantize {self.quantize!r} is not one of {', '.join(QUANTIZE)}")
        if self.offload is not None and self.offload not in OFFLOAD:
            raise InvalidArgument(f"--offload {self.offload!r} is not one of {', '.join(OFFLOAD)}")
        on_cuda = str(device).startswith("cuda")
        if self.quantize in ("nf4", "int8"):
            if not on_cuda:
                raise InvalidArgument(f"--quantize {self.quantize} uses bitsandbytes, which needs a CUDA device, but "
                                      f"--device is {device!r}: use --quantize fp8 (works everywhere) or a CUDA device")
            if importlib.util.find_spec("bitsandbytes") is None:
                raise InvalidArgument(f"--quantize {self.quantize} needs bitsandbytes: {BITSANDBYTES_HINT}")
        if self.offload is not None and not on_cuda:
            raise InvalidArgument(f"--offload {self.offload} moves weights between CPU memory and a GPU, but --device is "
                                  f"{device!r}: drop --offload or use a CUDA device")
        if self.offload is not None and self.quantize in ("nf4", "int8"):
            raise InvalidArgument(f"--offload {self.offload} cannot move bitsandbytes {self.quantize} weights; "
                                  "use --quantize fp8 with offloading, or no offloading")

    def usable(self, device: str) -> bool:
        try:
            self.check(device)
        except InvalidArgument:
            return False
        return True

    def from_pretrained_kwargs(self, dtype) -> dict:
        """Extra `from_pretrained` arguments: bitsandbytes quantises the transformer while it loads."""
        if self.quantize not in ("nf4", "int8"):
            return {}
        from diffusers import BitsAndBytesConfig
        from diffusers.quantizers import PipelineQuantizationConfig

        config = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
                  if self.quantize == "nf4" else BitsAndBytesConfig(load_in_8bit=True))
        return {"quantization_config": PipelineQuantizationConfig(quant_mapping={"transformer": config})}

    def apply(self, pipe, device: str, dtype):
        """Cast, place and offload a freshly loaded pipeline; returns it."""
        if self.quantize == "fp8":
            cast_fp8(pipe.transformer, dtype)
        if self.vae_tiling:
            enable_vae_tiling(pipe.vae)
        if self.offload is not None:
            offload(pipe, self.offload, device)
        elif self.quantize not in ("nf4", "int8"):  # bitsandbytes already placed its weights on the GPU
            pipe.to(device)
        else:
            pipe.vae.to(device)
        return pipe


def cast_fp8(transformer, dtype) -> None:
    """Store the transformer's weights in float8_e4m3fn, each layer upcast to `dtype` as it runs."""
    import torch
    from diffusers.hooks import apply_layerwise_casting

    # diffusers' own function behind `enable_layerwise_casting`, which would add the model's "norm" pattern.
    apply_layerwise_casting(transformer, storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype,
                            skip_modules_pattern=FP8_KEEP)


def offload(pipe, mode: str, device: str) -> None:
    """Keep weights in CPU memory and move them to `device` when used: `model`, `sequential` or `group`."""
    import torch

    if mode == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif mode == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.vae.to(device)
        pipe.transformer.enable_group_offload(onload_device=torch.device(device), offload_device=torch.device("cpu"),
                                              offload_type="block_level", num_blocks_per_group=1, use_stream=True)


# The plans `--vram auto` chooses from and `--vram NAME` names, fastest first on the GPUs measured (the order
# `vram_plans` keeps per family is the measured one).
PLANS: dict[str, VramOptions] = {
    "full": VramOptions(),
    "full+tiling": VramOptions(vae_tiling=True),
    "fp8": VramOptions(quantize="fp8"),
    "fp8+tiling": VramOptions(quantize="fp8", vae_tiling=True),
    "nf4+tiling": VramOptions(quantize="nf4", vae_tiling=True),
    "fp8+group-offload": VramOptions(quantize="fp8", offload="group", vae_tiling=True),
    "sequential-offload": VramOptions(offload="sequential", vae_tiling=True),
}


def plan_named(name: str) -> VramOptions:
    if name not in PLANS:
        raise InvalidArgument(f"--vram {name!r} is not a memory plan: use auto or one of {', '.join(PLANS)}")
    return PLANS[name]


def enable_vae_tiling(vae) -> None:
    """Tiled (and, for batches, sliced) decoding. The FLUX VAE only tiles images larger than its sample size
    (1024 px), so its tile is halved: a 1024x1024 image then decodes in overlapping 512 px tiles as well."""
    if getattr(vae, "use_tiling", False):
        return
    vae.enable_tiling()
    if hasattr(vae, "enable_slicing"):
        vae.enable_slicing()
    if getattr(vae, "tile_sample_min_size", 0) >= 1024 and hasattr(vae, "tile_latent_min_size"):
        vae.tile_sample_min_size //= 2
        vae.tile_latent_min_size //= 2
