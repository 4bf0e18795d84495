"""FLUX.2-dev: hidden states 10, 20 and 30 of Mistral Small 3.1, stacked per token to (B, L, 3 * 5120).

The encode path is diffusers' own: `Flux2Pipeline._get_mistral_3_small_prompt_embeds` (chat template with the
pipeline's system message, padding and truncation to `max_sequence_length`, attention mask, stacking), called with
a `TruncatedTextEncoder` in place of `Mistral3ForConditionalGeneration`. That holds the language model's first 30
layers only: layers 31-40, the lm_head and the vision tower (unused for text-only prompts) are never loaded.
"""

from __future__ import annotations

import torch

from encoder_server.families.truncated import StackedHiddenStatesEncoder

# Mistral3ForConditionalGeneration checkpoints name the language model `language_model.model.` (what
# transformers writes) or `model.language_model.` (its in-memory layout); the bare decoder has no prefix.
MISTRAL3_TEXT_KEYS = {r"^language_model\.model\.": "", r"^model\.language_model\.": ""}


class Flux2Encoder(StackedHiddenStatesEncoder):
    r"""
    The text encoder of [`~diffusers.Flux2Pipeline`], cut after the last layer it reads.

    `encode` returns `{"prompt_embeds": (B, max_sequence_length, 3 * hidden_size)}` in the model's dtype, equal to
    `Flux2Pipeline.encode_prompt(prompts, max_sequence_length=...)[0]`. `Flux2Pipeline` takes no negative or pooled
    embeddings (guidance is distilled into the transformer), and derives `text_ids` from `prompt_embeds`' shape.

    Args:
        name (`str`): The name clients ask for.
        source (`ModelSource`): A FLUX.2-dev diffusers folder or hub repo.
        device (`torch.device`), dtype (`torch.dtype`): Where and in what the text encoder runs.
    """

    family = "flux2"
    # `Flux2Pipeline.encode_prompt`'s default `text_encoder_out_layers`.
    hidden_states_layers = (10, 20, 30)
    key_mapping = MISTRAL3_TEXT_KEYS

    def __init__(self, name, source, device, dtype, **options):
        super().__init__(name, source, device, dtype, **options)
        from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

        self.system_message = SYSTEM_MESSAGE

    def fingerprint_parts(self) -> dict:
        return {**super().fingerprint_parts(), "system_message": self.system_message}

    @torch.inference_mode()
    def encode(self, prompts, prompts_2, max_sequence_length):
        from diffusers import Flux2Pipeline

        # `Flux2Pipeline.encode_prompt` is this call plus `text_ids`, which the pipeline derives from the shape.
        prompt_embeds = Flux2Pipeline._get_mistral_3_small_prompt_embeds(
            text_encoder=self.text_encoder, tokenizer=self.tokenizer, prompt=list(prompts), device=self.device,
            max_sequence_length=max_sequence_length, system_message=self.system_message,
            hidden_states_layers=self.hidden_states_layers)
        return {"prompt_embeds": prompt_embeds}
