"""The node's own cache tier: embeddings kept on the denoiser node, so a repeated prompt never crosses the network.

A plain get/put layer under `RemoteTextEncoder`. Entries are addressed by the server's cache key, which the client
computes itself (`shared.cache_keys.embedding_key` over the model fingerprint `ListModels` reports, the
`max_sequence_length`, the prompt and `prompt_2`), so a hit needs no round trip. Files are the same verified
safetensors entries as the server's disk tier (`shared.disk_cache.DiskTier`): a damaged one is a miss.
"""

from __future__ import annotations

import os

import torch

from shared.cache_keys import embedding_key
from shared.disk_cache import DiskTier


class LocalEmbeddingCache:
    """A `DiskTier` named `local`, keyed like the server's cache."""

    def __init__(self, directory: str | os.PathLike, max_bytes: int = 10 << 30):
        self.tier = DiskTier(directory, max_bytes, name="local")

    @staticmethod
    def keys(fingerprint: str, max_sequence_length: int, prompts: list[str], prompts_2: list[str] | None) -> list[str]:
        return [embedding_key(fingerprint, max_sequence_length, p, None if prompts_2 is None else prompts_2[i])
                for i, p in enumerate(prompts)]

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        """One prompt's tensors (no batch dimension), or None."""
        return self.tier.get(key)

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        self.tier.put(key, tensors)
