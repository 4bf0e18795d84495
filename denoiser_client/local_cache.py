"""The client's own cache tier: embeddings kept on the denoiser node, so a repeated prompt never
crosses the network.

Entries are addressed by the server's cache key, which the client computes itself
(`shared.cache_keys.embedding_key` over the model fingerprint that `ListModels` reports, the
`max_sequence_length`, the prompt and `prompt_2`), so a hit needs no round trip at all. Files are
the same verified safetensors entries as the server's disk tier (`shared.disk_cache.DiskTier`).
"""

from __future__ import annotations

import logging
import os
import time

import torch

from shared.cache_keys import embedding_key
from shared.disk_cache import DiskTier

logger = logging.getLogger(__name__)


class LocalEmbeddingCache:
    """A `DiskTier` named `local` plus the bookkeeping to mix its hits with a server call."""

    def __init__(self, directory: str | os.PathLike, max_bytes: int = 10 << 30):
        self.tier = DiskTier(directory, max_bytes, name="local")
        self._warned = False

    def encode(self, client, prompts: list[str], model: str | None, prompts_2: list[str] | None,
               max_sequence_length: int | None):
        """Embeddings of `prompts` (hits from disk, the rest from `client._encode_remote`) and an `EncodeInfo`."""
        from denoiser_client.remote import EncodeInfo

        started = time.perf_counter()
        info = client.model_info(model)  # cached after the first call: a full hit makes no RPC
        length = max_sequence_length or info.default_max_sequence_length
        keys = [embedding_key(info.fingerprint, length, p, None if prompts_2 is None else prompts_2[i])
                for i, p in enumerate(prompts)]
        rows: dict[int, dict[str, torch.Tensor]] = {}
        for i, key in enumerate(keys):
            hit = self.tier.get(key)
            if hit is not None:
                rows[i] = hit
        missing = [i for i in range(len(prompts)) if i not in rows]
        status, server_keys = ["local"] * len(prompts), list(keys)
        remote = EncodeInfo([], [], target="", attempts=0)
        if missing:
            tensors, remote = client._encode_remote(
                [prompts[i] for i in missing], info.name,
                None if prompts_2 is None else [prompts_2[i] for i in missing], length)
            for j, i in enumerate(missing):
                rows[i] = {name: t[j] for name, t in tensors.items()}
                status[i], server_keys[i] = remote.cache_status[j], remote.cache_keys[j]
                if remote.cache_keys[j] != keys[i]:
                    client._models = None  # the model changed under its name: ask ListModels again next time
                    if not self._warned:
                        self._warned = True
                        logger.warning("the server at %s keyed a prompt differently from this client (model "
                                       "reloaded, or another promptcast version); refreshing its model list",
                                       remote.target)
                self.tier.put(remote.cache_keys[j], rows[i])
        if len(missing) == len(prompts):  # all from the server: already one batch, in order
            out = tensors
        else:
            out = {name: torch.stack([rows[i][name] for i in range(len(prompts))]) for name in rows[0]}
        return out, EncodeInfo(status, server_keys, remote.bytes_received, time.perf_counter() - started,
                               remote.server_seconds, remote.target, remote.attempts)
