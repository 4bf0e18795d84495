"""The one interface every model family implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from encoder_server.sources import ModelSource
from shared.cache_keys import model_fingerprint
from shared.tensor_codec import DTYPE_NAMES


@dataclass(frozen=True)
class OutputSpec:
    """One tensor an encoder returns: its diffusers argument name, dtype and per-prompt shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    per_token: bool = False  # shape[0] is max_sequence_length

    def at_length(self, max_sequence_length: int) -> tuple[int, ...]:
        return (max_sequence_length, *self.shape[1:]) if self.per_token else self.shape


class Encoder(ABC):
    """A family's text encoders, loaded on one device, encoding a batch of prompts at a time."""

    family: ClassVar[str]
    # Folders whose files define the output bytes (hashed into the fingerprint).
    encoder_folders: ClassVar[tuple[str, ...]]

    def __init__(self, name: str, source: ModelSource, device: torch.device, dtype: torch.dtype):
        self.name, self.source, self.device, self.dtype = name, source, device, dtype
        self.default_max_sequence_length = 512
        self.max_sequence_length_limit = 512

    @property
    @abstractmethod
    def outputs(self) -> list[OutputSpec]:
        """Per-prompt outputs at the default max_sequence_length."""

    @abstractmethod
    def encode(self, prompts: list[str], prompts_2: list[str] | None, max_sequence_length: int
               ) -> dict[str, torch.Tensor]:
        """Encode a batch; returns `{diffusers argument name: (B, ...) tensor}` on any device."""

    def fingerprint_parts(self) -> dict:
        """What besides the files changes the bytes; families add their layer set, template..."""
        import diffusers
        import transformers

        return {"family": self.family, "dtype": DTYPE_NAMES[self.dtype], "quantization": None,
                "transformers": transformers.__version__, "diffusers": diffusers.__version__}

    @property
    def fingerprint(self) -> str:
        if not hasattr(self, "_fingerprint"):
            self._fingerprint = model_fingerprint(
                {**self.fingerprint_parts(), "files": self.source.fingerprint(list(self.encoder_folders))})
        return self._fingerprint
