"""Stable Diffusion 3 / 3.5: CLIP-L + CLIP-G penultimate states and T5-XXL's, and both CLIPs' pooled outputs.

The encode path is diffusers' own: `StableDiffusion3Pipeline.encode_prompt` called on a pipeline that holds only the
three text encoders and their tokenizers (no transformer, no VAE, no scheduler), so the 77 CLIP tokens, the zero
padding of the CLIP states to T5's width, truncation, `prompt_2` handling and dtypes are exactly the library's.

One change makes a prompt's bytes independent of its batch: each CLIP's `text_projection` (the Linear that makes the
pooled vector) is applied one prompt at a time. A matrix product of one row and one of several rows round
differently (CPU and CUDA kernels alike), so the pooled vector of a prompt encoded among others would differ in its
last bits from the one a pipeline computes for that prompt alone, and from a cache entry made alone.
"""

from __future__ import annotations

import torch

from encoder_server.errors import SourceError
from encoder_server.families.base import Encoder, OutputSpec

CLIP_TOKENS = 77  # CLIP's context: the first 77 tokens of every prompt_embeds row


class PerPromptLinear(torch.nn.Linear):
    """A Linear applied to each row of its input alone: the same bits as a batch of one, whatever the batch."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return torch.cat([super(PerPromptLinear, self).forward(row) for row in input.split(1)])


class StableDiffusion3Encoder(Encoder):
    r"""
    The text encoders of [`~diffusers.StableDiffusion3Pipeline`].

    `encode` returns `{"prompt_embeds": (B, 77 + max_sequence_length, T5 width), "pooled_prompt_embeds": (B, CLIP-L +
    CLIP-G projection widths)}` in the models' dtype, each prompt's equal to `StableDiffusion3Pipeline.encode_prompt(
    [prompt], prompt_2=[prompt_2], max_sequence_length=...)`'s positive half, what the pipeline computes for it in a
    call of its own. The pipeline's negatives (`guidance_scale > 1`,
    "" by default) are encoded by the same code with the same defaults, so a client gets them by encoding the
    negative prompt, and one cache entry serves it as either.

    Args:
        name (`str`): The name clients ask for.
        source (`ModelSource`): An SD3 or SD3.5 diffusers folder or hub repo.
        device (`torch.device`), dtype (`torch.dtype`): Where and in what the text encoders run.
    """

    family = "sd3"
    # `prompts_2` feeds CLIP-G, as the pipeline's `prompt_2`; T5 reads `prompt` (the pipeline's `prompt_3` default).
    takes_prompt_2 = True

    def __init__(self, name, source, device, dtype, **options):
        super().__init__(name, source, device, dtype, **options)
        from diffusers import StableDiffusion3Pipeline
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        kwargs = {"revision": source.revision} if source.revision else {}
        load = dict(dtype=dtype, **kwargs)

        def clip(subfolder: str):
            # CLIP-L (0.1 B) and CLIP-G (0.7 B) give the pooled vector: never quantized. T5-XXL (4.7 B) is.
            model = self.prepare_module(CLIPTextModelWithProjection.from_pretrained(
                source.pretrained, subfolder=subfolder, **load), quantize=False)
            model.text_projection.__class__ = PerPromptLinear
            return model

        self.pipe = StableDiffusion3Pipeline(
            transformer=None, scheduler=None, vae=None,
            text_encoder=clip("text_encoder"),
            tokenizer=CLIPTokenizer.from_pretrained(source.pretrained, subfolder="tokenizer", **kwargs),
            text_encoder_2=clip("text_encoder_2"),
            tokenizer_2=CLIPTokenizer.from_pretrained(source.pretrained, subfolder="tokenizer_2", **kwargs),
            text_encoder_3=self.prepare_module(
                T5EncoderModel.from_pretrained(source.pretrained, subfolder="text_encoder_3", **load)),
            tokenizer_3=T5TokenizerFast.from_pretrained(source.pretrained, subfolder="tokenizer_3", **kwargs),
        )
        if self.pipe.tokenizer_max_length != CLIP_TOKENS:
            raise SourceError(f"{source.source!r}'s CLIP tokenizer has model_max_length "
                              f"{self.pipe.tokenizer_max_length}; SD3 transformers take {CLIP_TOKENS} CLIP tokens")

    @property
    def outputs(self) -> list[OutputSpec]:
        pipe = self.pipe
        width = pipe.text_encoder_3.config.d_model
        pooled = pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
        return [
            OutputSpec("prompt_embeds", pipe.text_encoder_3.dtype,
                       (CLIP_TOKENS + self.default_max_sequence_length, width), per_token=True,
                       fixed_tokens=CLIP_TOKENS),
            OutputSpec("pooled_prompt_embeds", pipe.text_encoder.dtype, (pooled,)),
        ]

    def fingerprint_parts(self) -> dict:
        # encode_prompt's defaults that shape the bytes: CLIP's penultimate layer (clip_skip None), 77 CLIP tokens.
        return {**super().fingerprint_parts(), "clip_skip": None, "clip_tokens": self.pipe.tokenizer_max_length,
                "pooled_projection": "per-prompt",
                "default_max_sequence_length": self.default_max_sequence_length,
                "max_sequence_length_limit": self.max_sequence_length_limit}

    @torch.inference_mode()
    def encode(self, prompts, prompts_2, max_sequence_length):
        prompt_embeds, _, pooled_prompt_embeds, _ = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None if prompts_2 is None else list(prompts_2), prompt_3=None,
            device=self.device, do_classifier_free_guidance=False, max_sequence_length=max_sequence_length)
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds}
