"""Where a node's embeddings come from: the encoder server (or precomputed ones), fetched ahead of the denoiser."""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor

from shared.collate import rows_of


class RemoteEmbedder:
    """Embeddings from an encoder server: `encode(texts)` -> one `{name: tensor}` dict per text, each tensor that
    text's own (no batch axis; a variable-length one at the text's own length), as the server sends it. Whoever
    builds a call batches them with `shared.collate.collate` and `info.layouts`."""

    def __init__(self, encoder, model: str, max_sequence_length: int | None = None, timings=None):
        self.encoder, self.model, self.max_sequence_length = encoder, model, max_sequence_length
        self.timings = timings  # a `pipeline.Timings` to add each call's server and transfer time to
        self.server_hits = 0
        self.server_seconds = 0.0  # the server's side of the calls (queue + encode, or cache lookups)
        self.layouts = None  # how the model's rows are batched (`ModelInfo.layouts`), known after the first call

    def encode(self, texts: list[str]) -> list[dict]:
        started = time.perf_counter()
        tensors, info = self.encoder.encode(texts, self.model, max_sequence_length=self.max_sequence_length,
                                            with_info=True, collated=False)
        if self.timings is not None:
            self.timings.add_encode(info, time.perf_counter() - started)
        self.server_hits += sum(status not in ("miss", "unknown") for status in info.cache_status)
        self.server_seconds += info.server_seconds
        if self.layouts is None:  # asked once the server has answered (ListModels, kept by the client)
            self.layouts = self.encoder.model_info(self.model).layouts
        return rows_of(tensors)


class MemoryEmbedder:
    """Precomputed embeddings held in memory (benchmarks: the same denoising with no encoder in the loop), one
    `{name: tensor}` dict per text as `RemoteEmbedder` gives them."""

    server_hits = 0

    def __init__(self, embeddings: dict[str, dict], layouts: dict | None = None):
        self.embeddings = embeddings
        self.layouts = layouts or {}  # every output stacked unless told otherwise

    def encode(self, texts: list[str]) -> list[dict]:
        return [self.embeddings[t] for t in texts]


class EmbeddingPrefetcher:
    """Requests embeddings on a background thread; each distinct text once, freed when no item needs it."""

    def __init__(self, embedder, uses: Counter):
        self.embedder = embedder
        self.uses = uses  # text -> items still to denoise
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="promptcast-prefetch")
        self._entries: dict[str, tuple[Future, int]] = {}
        self.reused = 0
        self.encoded = 0

    def request(self, texts: list[str]) -> None:
        new = [t for t in dict.fromkeys(texts) if t not in self._entries]
        self.reused += len(texts) - len(new)
        if new:
            future = self._executor.submit(self.embedder.encode, new)
            self._entries.update({t: (future, i) for i, t in enumerate(new)})
            self.encoded += len(new)

    def get(self, text: str) -> dict:
        future, index = self._entries[text]
        return future.result()[index]

    def release(self, text: str) -> None:
        self.uses[text] -= 1
        if self.uses[text] <= 0:
            self._entries.pop(text, None)  # the call's other texts keep the future alive while they are needed

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
