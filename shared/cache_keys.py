"""Content addresses of embeddings.

An embedding's key is the SHA-256 of a canonical JSON document holding everything that changes its
bytes. The model half (family, text-encoder and tokenizer file hashes, dtype, quantization, layer
set, system message, library versions) is folded once into the model's *fingerprint*; the request
half (max_sequence_length, prompt, prompt_2) is added per prompt. Two servers that load the same
files the same way therefore agree on every key, which is what lets replicas share a cache.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

KEY_VERSION = 1


def canonical_json(document: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8: one byte string per document."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def model_fingerprint(parts: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json({"v": KEY_VERSION, **parts})).hexdigest()


def embedding_key(fingerprint: str, max_sequence_length: int, prompt: str, prompt_2: str | None) -> str:
    document = {"v": KEY_VERSION, "model": fingerprint, "max_sequence_length": max_sequence_length,
                "prompt": prompt, "prompt_2": prompt_2}
    return hashlib.sha256(canonical_json(document)).hexdigest()
