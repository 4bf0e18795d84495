"""FLUX.2 klein: hidden states 9, 18 and 27 of Qwen3, stacked per token to (B, L, 3 * hidden_size).

The encode path is diffusers' own: `Flux2KleinPipeline._get_qwen3_prompt_embeds` (Qwen3 chat template with thinking
off, per-prompt padding and truncation to `max_sequence_length`, attention mask, stacking), called with a
`TruncatedTextEncoder` in place of `Qwen3ForCausalLM`: its first 27 layers, never the rest nor the lm_head.
"""

from __future__ import annotations

import torch

from encoder_server.families.truncated import StackedHiddenStatesEncoder


class Flux2KleinEncoder(StackedHiddenStatesEncoder):
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
    # `Flux2KleinPipeline.encode_prompt`'s default `text_encoder_out_layers`. Qwen3ForCausalLM checkpoints name the
    # decoder `model.`, which transformers strips for the bare Qwen3Model.
    hidden_states_layers = (9, 18, 27)

    @torch.inference_mode()
    def encode(self, prompts, prompts_2, max_sequence_length):
        from diffusers import Flux2KleinPipeline

        # `Flux2KleinPipeline.encode_prompt` is this call plus `text_ids`, which the pipeline derives from the shape.
        prompt_embeds = Flux2KleinPipeline._get_qwen3_prompt_embeds(
            text_encoder=self.text_encoder, tokenizer=self.tokenizer, prompt=list(prompts), device=self.device,
            max_sequence_length=max_sequence_length, hidden_states_layers=self.hidden_states_layers)
        return {"prompt_embeds": prompt_embeds}
