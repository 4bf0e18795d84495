"""Z-Image: the penultimate hidden state of Qwen3 (4B), one variable-length tensor per prompt.

The encode path is diffusers' own: `ZImagePipeline.encode_prompt` (Qwen3's chat template, thinking on as the pipeline
sets it, padding and truncation to `max_sequence_length`, each prompt's own tokens kept), called on a pipeline that
holds only the tokenizer and a `PenultimateTextEncoder` in place of `Qwen3Model`. The pipeline reads
`hidden_states[-2]`, the input of the last layer: that layer and the final norm are computed and thrown away, so
here they are never loaded.
"""

from __future__ import annotations

import torch

from encoder_server.families.base import Encoder, OutputSpec
from encoder_server.families.truncated import TruncatedTextEncoder, load_tokenizer, text_config
from shared.collate import LIST, Layout


class PenultimateTextEncoder(TruncatedTextEncoder):
    r"""
    Stands in for `ZImagePipeline`'s `text_encoder`: Qwen3's decoder without its last layer and final norm.

    The full model's `hidden_states` end with the last layer's normed output; this one's end one state earlier, at
    the state the pipeline reads. One `None` is appended where the state it never computes would be, so every index
    (`hidden_states[-2]` included) names the same state as in the full model.
    """

    def forward(self, input_ids, attention_mask=None, output_hidden_states=True, use_cache=False):
        output = super().forward(input_ids, attention_mask, output_hidden_states, use_cache)
        output.hidden_states = (*output.hidden_states, None)
        return output


class ZImageEncoder(Encoder):
    r"""
    The text encoder of [`~diffusers.ZImagePipeline`], cut before its last layer.

    `encode` returns `{"prompt_embeds": [B tensors (L_i, hidden_size)]}` in the model's dtype, equal to
    `ZImagePipeline.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=...)[0]`: the
    list the pipeline takes, `L_i` prompt `i`'s token count (template included, at most `max_sequence_length`).
    Negatives (`guidance_scale > 0`, "" by default) are encoded the same way.

    Args:
        name (`str`): The name clients ask for.
        source (`ModelSource`): A Z-Image diffusers folder or hub repo.
        device (`torch.device`), dtype (`torch.dtype`): Where and in what the text encoder runs.
    """

    family = "z-image"

    def __init__(self, name, source, device, dtype, **options):
        super().__init__(name, source, device, dtype, **options)
        from diffusers import ZImagePipeline

        # hidden_states[-2] of an N-layer model is hidden_states[N - 1]: the first N - 1 layers give it.
        self.hidden_states_layers = (text_config(source).num_hidden_layers - 1,)
        # Straight onto the device, unless quantizing: bitsandbytes quantizes as weights move from the CPU.
        self.text_encoder = self.prepare_module(PenultimateTextEncoder.from_pretrained(
            source, self.hidden_states_layers, dtype=dtype,
            device=torch.device("cpu") if self.quantize else device))
        self.text_model = self.text_encoder.text_model
        self.tokenizer = load_tokenizer(source)
        self.pipe = ZImagePipeline(scheduler=None, vae=None, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                   transformer=None)

    @property
    def outputs(self) -> list[OutputSpec]:
        return [OutputSpec("prompt_embeds", self.text_model.dtype,
                           (self.default_max_sequence_length, self.text_model.config.hidden_size), per_token=True,
                           layout=Layout(LIST))]

    def fingerprint_parts(self) -> dict:
        return {**super().fingerprint_parts(), "hidden_states_layers": list(self.hidden_states_layers),
                "chat_template": self.tokenizer.chat_template, "enable_thinking": True,
                "tokenizer_class": type(self.tokenizer).__name__,
                "default_max_sequence_length": self.default_max_sequence_length,
                "max_sequence_length_limit": self.max_sequence_length_limit}

    @torch.inference_mode()
    def encode(self, prompts, prompts_2, max_sequence_length):
        # A copy: `ZImagePipeline._encode_prompt` writes the templated text into the list it is given.
        prompt_embeds, _ = self.pipe.encode_prompt(list(prompts), device=self.device, do_classifier_free_guidance=False,
                                                   max_sequence_length=max_sequence_length)
        return {"prompt_embeds": list(prompt_embeds)}
