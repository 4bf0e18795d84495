"""Wan 2.1 / 2.2 text-to-video: umT5-XXL's last hidden state, each prompt's tokens then zeros to max_sequence_length.

The encode path is diffusers' own: `WanPipeline.encode_prompt` (prompt cleaning, padding and truncation to
`max_sequence_length`, the attention mask, the pad positions zeroed) called on a pipeline that holds only the text
encoder and its tokenizer (no transformer, no VAE, no scheduler).
"""

from __future__ import annotations

import torch

from encoder_server.families.base import Encoder, OutputSpec
from encoder_server.families.truncated import load_tokenizer


class WanEncoder(Encoder):
    r"""
    The text encoder of [`~diffusers.WanPipeline`].

    `encode` returns `{"prompt_embeds": (B, max_sequence_length, d_model)}` in the model's dtype, equal to
    `WanPipeline.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=...)[0]`. Negatives
    (`guidance_scale > 1`, "" by default) are encoded by the same code, so a client gets them by encoding the
    negative prompt.

    Args:
        name (`str`): The name clients ask for.
        source (`ModelSource`): A Wan text-to-video diffusers folder or hub repo.
        device (`torch.device`), dtype (`torch.dtype`): Where and in what the text encoder runs.
    """

    family = "wan"

    def __init__(self, name, source, device, dtype, **options):
        super().__init__(name, source, device, dtype, **options)
        from diffusers import WanPipeline
        from transformers import UMT5EncoderModel

        kwargs = {"revision": source.revision} if source.revision else {}
        self.pipe = WanPipeline(
            tokenizer=load_tokenizer(source), vae=None, scheduler=None, transformer=None,
            text_encoder=self.prepare_module(
                UMT5EncoderModel.from_pretrained(source.pretrained, subfolder="text_encoder", dtype=dtype, **kwargs)),
        )

    @property
    def outputs(self) -> list[OutputSpec]:
        t5 = self.pipe.text_encoder
        return [OutputSpec("prompt_embeds", t5.dtype, (self.default_max_sequence_length, t5.config.d_model),
                           per_token=True)]

    def fingerprint_parts(self) -> dict:
        # The pipeline cleans prompts with ftfy when it is installed: another version, or none, can change the text.
        try:
            import ftfy
        except ImportError:
            ftfy_version = None
        else:
            ftfy_version = getattr(ftfy, "__version__", "unknown")
        return {**super().fingerprint_parts(), "ftfy": ftfy_version,
                "tokenizer_class": type(self.pipe.tokenizer).__name__,
                "default_max_sequence_length": self.default_max_sequence_length,
                "max_sequence_length_limit": self.max_sequence_length_limit}

    @torch.inference_mode()
    def encode(self, prompts, prompts_2, max_sequence_length):
        prompt_embeds, _ = self.pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False,
                                                   max_sequence_length=max_sequence_length, device=self.device)
        return {"prompt_embeds": prompt_embeds}
