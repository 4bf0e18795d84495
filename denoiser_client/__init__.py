"""The denoiser side of promptcast: a remote text encoder client and text-encoder-free pipelines."""

from denoiser_client.errors import PromptcastError
from denoiser_client.remote import EncodeInfo, ModelInfo, RemoteTextEncoder

__all__ = ["RemoteTextEncoder", "ModelInfo", "EncodeInfo", "PromptcastError"]
