"""FLUX.2 klein: hidden states 9, 18 and 27 of Qwen3, stacked per token to (B, L, 3 * hidden_size).

The encode path is diffusers' own: `Flux2KleinPipeline._get_qwen3_prompt_embeds` (Qwen3 chat template with thinking
off, per-prompt padding and truncation to `max_sequence_length`, attention mask, stacking), called with a
`TruncatedTextEncoder` in place of `Qwen3ForCausalLM`: its first 27 layers, never the rest nor the lm_head.
"""

from __future__ import annotations

import torch

from encoder_server.errors import InvalidInput
from encoder_server.families.base import Encoder, OutputSpec
from encoder_server.families.truncated import TruncatedTextEncoder, load_tokenizer


class Flux2KleinEncoder(Encoder):
    r"""
    The text encoder of [`~diffusers.Flux2KleinPipeline`], cut after the last layer it reads.

    `encode` returns `{"prompt_embeds": (B, max_sequence_length, 3 * hidden_size)}` in the model's dtype, equal to
    `Flux2KleinPipeline.encode_prompt(prompts, max_sequence_length=...)[0]`. The pipeline's
    `negative_prompt_embeds` (used by undistilled klein models with `guidance_scale > 1`) are always the encoding of
    `""`: a client gets them by encoding the empty prompt, which the cache then serves to every job.

    Args:
        name (`str`): The name clients ask for.
        source (`ModelSource`): A FLUX.2 klein diffusers folder or hub repo.
        device (`torch.device`), dtype (`torch.dtype`): Where and in what the text encoder runs.
    """

    family = "flux2-klein"
    encoder_folders = ("text_encoder", "tokenizer")
    # `Flux2KleinPipeline.encode_prompt`'s default `text_encoder_out_layers`.
    hidden_states_layers = (9, 18, 27)

    def __init__(self, name, source, device, dtype, **options):
        super().__init__(name, source, device, dtype, **options)
        # Qwen3ForCausalLM checkpoints name the decoder `model.`, which transformers strips for the bare Qwen3Model.
        # Straight onto the device, unless quantizing: bitsandbytes quantizes as weights move from the CPU.
        self.text_encoder = self.prepare_module(TruncatedTextEncoder.from_pretrained(
            source, self.hidden_states_layers, dtype=dtype, device=torch.device("cpu") if self.quantize else device))
        self.text_model = self.text_encoder.text_model
        self.tokenizer = load_tokenizer(source)
        # `Flux2KleinPipeline.tokenizer_max_length`: check_inputs sets no bound, the pipeline pads to 512.
        self.default_max_sequence_length = self.max_sequence_length_limit = 512

    @property
    def outputs(self) -> list[OutputSpec]:
        width = len(self.hidden_states_layers) * self.text_model.config.hidden_size
        return [OutputSpec("prompt_embeds", self.text_model.dtype, (self.default_max_sequence_length, width),
                           per_token=True)]

    def fingerprint_parts(self) -> dict:
        return {**super().fingerprint_parts(), "hidden_states_layers": list(self.hidden_states_layers),
                "chat_template": self.tokenizer.chat_template, "tokenizer_class": type(self.tokenizer).__name__,
                "default_max_sequence_length": self.default_max_sequence_length,
                "max_sequence_length_limit": self.max_sequence_length_limit}

    @torch.inference_mode()
    def encode(self, prompts, prompts_2, max_sequence_length):
        from diffusers import Flux2KleinPipeline

        if prompts_2:
            raise InvalidInput(f"prompts_2 was given, but model {self.name!r} (FLUX.2 klein) has one text encoder: "
                               "send prompts only")
        # `Flux2KleinPipeline.encode_prompt` is this call plus `text_ids`, which the pipeline derives from the shape.
        prompt_embeds = Flux2KleinPipeline._get_qwen3_prompt_embeds(
            text_encoder=self.text_encoder, tokenizer=self.tokenizer, prompt=list(prompts), device=self.device,
            max_sequence_length=max_sequence_length, hidden_states_layers=self.hidden_states_layers)
        return {"prompt_embeds": prompt_embeds}
