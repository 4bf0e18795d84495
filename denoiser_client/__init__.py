"""The denoiser side of promptcast: a remote text encoder client and text-encoder-free pipelines.

Names are imported on first use, so `import denoiser_client.cli` (the command line) loads neither torch nor grpc.
"""

from __future__ import annotations

import importlib

__all__ = ["RemoteTextEncoder", "ModelInfo", "EncodeInfo", "PromptcastError"]
_WHERE = {"RemoteTextEncoder": "denoiser_client.remote", "ModelInfo": "denoiser_client.remote",
          "EncodeInfo": "denoiser_client.remote", "PromptcastError": "denoiser_client.errors"}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'denoiser_client' has no attribute {name!r}")
