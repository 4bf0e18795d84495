"""The one interface every model family implements."""

from __future__ import annotations

import sys
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from shared.cache_keys import model_fingerprint
from shared.collate import STACK, Layout
from shared.families import FAMILIES
from shared.sources import ModelSource
from shared.tensor_codec import DTYPE_NAMES


@dataclass(frozen=True)
class OutputSpec:
    """One tensor an encoder returns: its diffusers argument name, dtype and per-prompt shape.

    `per_token`: `shape[0]` is `fixed_tokens + max_sequence_length` (SD3 puts 77 CLIP tokens before T5's). `layout`:
    how a client batches the prompts' tensors; anything but `stack` means a variable-length output, whose first axis
    is each prompt's own token count, at most `shape[0]` (`Encoder.encode` returns such an output as a list).
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    per_token: bool = False
    fixed_tokens: int = 0
    layout: Layout = Layout()

    @property
    def variable_length(self) -> bool:
        return self.layout.collate != STACK

    def at_length(self, max_sequence_length: int) -> tuple[int, ...]:
        """The per-prompt shape at `max_sequence_length` (for a variable-length output: the largest)."""
        return (self.fixed_tokens + max_sequence_length, *self.shape[1:]) if self.per_token else self.shape


class Encoder(ABC):
    """A family's text encoders, loaded on one device, encoding a batch of prompts at a time."""

    family: ClassVar[str]
    # Whether a second prompt list feeds a second text encoder (FLUX.1's T5).
    takes_prompt_2: ClassVar[bool] = False

    def __init__(self, name: str, source: ModelSource, device: torch.device, dtype: torch.dtype, *,
                 compile: bool = False, quantize: str | None = None, cuda_graphs: bool | None = False):
        record = FAMILIES[self.family]
        if cuda_graphs is None:  # the server's default: replay graphs where the device and the shapes allow it
            from encoder_server.acceleration import default_cuda_graphs

            cuda_graphs = default_cuda_graphs(self.family, device)
        self.name, self.source, self.device, self.dtype = name, source, device, dtype
        self.compile, self.quantize, self.cuda_graphs = compile, quantize, cuda_graphs
        self.default_max_sequence_length = record.default_max_sequence_length
        self.max_sequence_length_limit = record.max_sequence_length_limit

    @property
    @abstractmethod
    def outputs(self) -> list[OutputSpec]:
        """Per-prompt outputs at the default max_sequence_length."""

    @abstractmethod
    def encode(self, prompts: list[str], prompts_2: list[str] | None, max_sequence_length: int
               ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Encode a batch; returns `{diffusers argument name: (B, ...) tensor}` on any device, or for a
        variable-length output a list of B tensors, each of its prompt's own length and independent of the other
        prompts of the batch (the cache and the batcher depend on that)."""

    def prepare_module(self, module: torch.nn.Module, *, quantize: bool = True) -> torch.nn.Module:
        """Every family passes each loaded text encoder through here (may be on the CPU or the device): it is
        moved to `self.device`, quantized with `--quantize` when `quantize` (pass False for small encoders whose
        precision matters more than their memory, e.g. FLUX.1's CLIP), and its repeated blocks compiled with
        `--compile`, or its forward replayed as CUDA graphs with `--cuda-graphs` (with fused elementwise kernels:
        `accelerate_module`). Returns the module to use."""
        from encoder_server.acceleration import accelerate_module
        from encoder_server.quantize import quantize_module

        module = module.eval()
        if quantize and self.quantize:
            module = quantize_module(module, self.quantize, self.device, self.dtype)
        else:
            module = module.to(self.device)
        accelerate_module(module, compile=self.compile, cuda_graphs=self.cuda_graphs)
        register_execution_device(module, self.device)
        return module

    def fingerprint_parts(self) -> dict:
        """What besides the files changes the bytes; families add their layer set, template..."""
        import diffusers
        import transformers

        # Kernels differ across device types, torch releases and compiled graphs: bytes from a CUDA bf16
        # server must never be served as if a CPU fp32 one had made them.
        return {"family": self.family, "dtype": DTYPE_NAMES[self.dtype], "quantization": self.quantize,
                "device": self.device.type, "compile": self.compile, "torch": torch.__version__.split("+")[0],
                "transformers": transformers.__version__, "diffusers": diffusers.__version__}

    @property
    def fingerprint(self) -> str:
        if not hasattr(self, "_fingerprint"):
            self._fingerprint = model_fingerprint(
                {**self.fingerprint_parts(), "files": self.source.fingerprint(list(self.encoder_folders))})
        return self._fingerprint

    @property
    def encoder_folders(self) -> tuple[str, ...]:
        """The folders whose files define the output bytes (hashed into the fingerprint): the family's text
        components."""
        return FAMILIES[self.family].text_components


# The device each server-held text encoder runs on, for diffusers' `get_module_execution_device`.
EXECUTION_DEVICES: "weakref.WeakKeyDictionary[torch.nn.Module, torch.device]" = weakref.WeakKeyDictionary()


def register_execution_device(module: torch.nn.Module, device: torch.device) -> None:
    """Answer diffusers' `get_module_execution_device(module)` with `device` without walking the module.

    FLUX.1's and Wan's `encode_prompt` ask it for each text encoder on every call, and it looks for offloading hooks
    on every submodule twice (about 1,200 failed attribute lookups for T5-XXL and CLIP-L: 3-4 ms of a batch-1 call
    whose graph replay takes 15). A server's text encoders are never offloaded and never moved, so the answer is
    their device; any other module (a node's pipeline, with its hooks) still gets diffusers' own walk. The lookup is
    rebound in `diffusers.utils.torch_utils` and in every diffusers module that imported it by name."""
    global _lookup
    from diffusers.utils import torch_utils

    EXECUTION_DEVICES[module] = torch.device(device)
    if _lookup is None:
        walk = torch_utils.get_module_execution_device

        def get_module_execution_device(module: torch.nn.Module) -> torch.device:
            device = EXECUTION_DEVICES.get(module)
            return walk(module) if device is None else device

        get_module_execution_device.__wrapped__ = walk
        _lookup = get_module_execution_device
    for name, loaded in list(sys.modules.items()):
        if name.startswith("diffusers") and getattr(loaded, "get_module_execution_device", None) is _lookup.__wrapped__:
            loaded.get_module_execution_device = _lookup


_lookup = None  # the one stand-in for diffusers' lookup, once a module is registered
