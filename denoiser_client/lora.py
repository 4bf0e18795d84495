"""LoRA styles on a denoiser node: each file loaded once, switched per item without reloading the transformer.

Loading goes through diffusers' own `load_lora_weights(path, adapter_name=...)` (so every LoRA format diffusers
converts, kohya, xlabs..., works), switching through `set_adapters(names, weights)` and `disable_lora()`.
Every file is checked against the local transformer *before* any denoising: a missing file, a pickle file, or
layers that do not exist in this transformer (or have other shapes) fail at once with the reason, instead of diffusers' warning about unexpected keys and a silently unstyled image.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from denoiser_client.errors import InvalidArgument

logger = logging.getLogger(__name__)

_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_A.bias", ".lora_B.bias", ".lora_magnitude_vector")


@dataclass(frozen=True)
class LoraRef:
    """One LoRA of an item: an absolute file path and its weight."""

    path: str
    weight: float = 1.0


def parse_lora(text: str, base: Path | None = None) -> LoraRef:
    """`PATH[:WEIGHT]` -> LoraRef (a path may itself hold colons: only a number after the last one is a weight)."""
    path, sep, weight = text.rpartition(":")
    try:
        value = float(weight) if sep else None
    except ValueError:
        value = None
    if value is None:
        path, value = text, 1.0
    return LoraRef(absolute_path(path, base), value)


def absolute_path(path: str, base: Path | None) -> str:
    """Job-file paths are relative to the job file's folder; command-line ones to the working directory."""
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base or Path.cwd()) / p)


class LoraError(InvalidArgument):
    """A LoRA file that cannot be applied to the local transformer."""


def adapter_name(path: str) -> str:
    """A stable adapter name for a file (peft names become module keys: no dots)."""
    stem = "".join(c if c.isalnum() else "_" for c in Path(path).stem)[:24]
    return f"{stem}_{hashlib.sha256(path.encode()).hexdigest()[:8]}"


def check_lora_file(pipe, path: str) -> dict:
    """Check that a LoRA file fits `pipe.transformer`; returns its state dict in diffusers' format. Raises
    `LoraError`."""
    file = Path(path)
    if not file.is_file():
        raise LoraError(f"LoRA file {path!r} does not exist")
    if file.suffix != ".safetensors":
        raise LoraError(f"LoRA file {path!r} is not a .safetensors file; pickle formats are refused (convert it "
                        "with safetensors' convert script)")
    try:
        state_dict = pipe.lora_state_dict(str(file), use_safetensors=True)
    except Exception as e:  # noqa: BLE001 - a corrupt file or a format diffusers cannot convert
        raise LoraError(f"LoRA file {path!r} could not be read as a LoRA for {type(pipe).__name__}: {e}") from None
    state_dict = state_dict[0] if isinstance(state_dict, tuple) else state_dict
    modules = dict(pipe.transformer.named_modules())
    layers, problems, text_encoder_keys = set(), [], 0
    for key, tensor in state_dict.items():
        if key.startswith(("text_encoder", "te_", "lora_te")):
            text_encoder_keys += 1
            continue
        if not key.startswith("transformer."):
            problems.append(f"{key!r} belongs to no transformer")
            continue
        name = key.removeprefix("transformer.")
        suffix = next((s for s in _LORA_SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            continue  # alphas and other metadata
        module_name = name[: -len(suffix)]
        module = modules.get(module_name)
        if module is None:
            problems.append(f"layer {module_name!r} does not exist in {type(pipe.transformer).__name__}")
            continue
        layers.add(module_name)
        expected = getattr(module, "in_features", None) if "lora_A.weight" in suffix else \
            getattr(module, "out_features", None) if "lora_B.weight" in suffix else None
        got = tensor.shape[1] if "lora_A.weight" in suffix else tensor.shape[0] if "lora_B.weight" in suffix else None
        if expected is not None and got != expected:
            side = "input" if "lora_A" in suffix else "output"
            problems.append(f"layer {module_name!r} has {side} width {expected} here, the LoRA's is {got}")
    if problems or not layers:
        detail = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
        raise LoraError(f"LoRA file {path!r} was made for another architecture than this "
                        f"{type(pipe.transformer).__name__}: {detail or 'it adapts none of its layers'}")
    if text_encoder_keys:
        logger.warning("LoRA %s also adapts the text encoder (%d tensors); text encoders run on the encoder "
                       "server, so that part is ignored here", path, text_encoder_keys)
    return state_dict


def _keep_lora_precision(pipe, name: str, state_dict: dict) -> None:
    """With `--quantize fp8` (layerwise casting) peft creates the LoRA matrices in the base layer's float8 dtype,
    which neither computes nor keeps a LoRA's small values: put the file's exact values back in the compute dtype.
    (They are tiny next to the base weights.)"""
    transformer, dtype = pipe.transformer, pipe.vae.dtype
    for key, tensor in state_dict.items():
        for side in ("lora_A", "lora_B"):
            if key.startswith("transformer.") and key.endswith(f".{side}.weight"):
                module = transformer.get_submodule(key.removeprefix("transformer.")[: -len(f".{side}.weight")])
                weight = getattr(module, side)[name].weight
                if weight.dtype.itemsize == 1:
                    weight.data = tensor.to(weight.device, dtype)


class LoraAdapters:
    r"""
    The LoRAs of one pipeline: loaded once, switched per item.

    Args:
        pipe ([`~diffusers.DiffusionPipeline`]): a pipeline with a LoRA loader mixin (FLUX.1, FLUX.2).

    Example:
    ```py
    >>> adapters = LoraAdapters(pipe)
    >>> adapters.load([LoraRef("/loras/ink.safetensors", 0.8), LoraRef("/loras/film.safetensors", 0.5)])
    >>> adapters.activate((LoraRef("/loras/ink.safetensors", 0.8),))  # set_adapters(["ink_..."], [0.8])
    >>> adapters.activate(())  # disable_lora(): the base model, bit for bit
    ```
    """

    def __init__(self, pipe):
        self.pipe = pipe
        self.names: dict[str, str] = {}  # path -> adapter name
        self.active: tuple[LoraRef, ...] = ()
        self.switches = 0

    def check(self, refs: Iterable[LoraRef]) -> dict[str, dict]:
        """Check every distinct file not yet loaded (before any denoising); raises `LoraError` naming the first bad
        one. Returns each checked file's state dict (diffusers' format) by path."""
        if not hasattr(self.pipe, "load_lora_weights"):
            raise LoraError(f"{type(self.pipe).__name__} cannot load LoRAs")
        return {path: check_lora_file(self.pipe, path)
                for path in dict.fromkeys(ref.path for ref in refs) if path not in self.names}

    def load(self, refs: Iterable[LoraRef]) -> None:
        """Check, then load every file not yet loaded, each as its own adapter."""
        refs = list(refs)
        checked = self.check(refs)  # every file, before the first is loaded
        for path in dict.fromkeys(ref.path for ref in refs):
            if path not in self.names:
                name = adapter_name(path)
                self.pipe.load_lora_weights(path, adapter_name=name, use_safetensors=True)
                _keep_lora_precision(self.pipe, name, checked.pop(path))
                self.names[path] = name
                logger.info("loaded LoRA %s as adapter %r", path, name)
        if refs and not self.active:  # loading activates the new adapter: keep the base model until asked
            self.pipe.disable_lora()

    def activate(self, loras: tuple[LoraRef, ...]) -> None:
        """Make exactly `loras` (with their weights) active; `()` is the base model. No-op if already active."""
        loras = tuple(loras)
        if loras == self.active:
            return
        if not loras:
            self.pipe.disable_lora()
        else:
            missing = [ref.path for ref in loras if ref.path not in self.names]
            if missing:
                self.load(loras)
            self.pipe.enable_lora()
            self.pipe.set_adapters([self.names[ref.path] for ref in loras], [ref.weight for ref in loras])
        self.active = loras
        self.switches += 1

    def unload(self, paths: Iterable[str] | None = None) -> None:
        """Delete adapters (all by default) and free their weights."""
        paths = list(self.names) if paths is None else [p for p in paths if p in self.names]
        if not paths:
            return
        self.pipe.delete_adapters([self.names.pop(p) for p in paths])
        if any(ref.path in paths for ref in self.active):
            self.active = ()
        if not self.names:
            self.pipe.unload_lora_weights()
            self.active = ()


def order_for_few_switches(items: list, lora_of=lambda item: item.loras) -> list:
    """Items grouped by their LoRA set (base model first, then in order of first appearance): one switch a set."""
    first: dict[tuple, int] = {}
    for i, item in enumerate(items):
        first.setdefault(lora_of(item), 0 if not lora_of(item) else i + 1)
    return sorted(items, key=lambda item: first[lora_of(item)])  # sorted is stable: file order within a set
