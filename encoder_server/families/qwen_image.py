"""Qwen-Image: the last hidden state of Qwen2.5-VL 7B's language model, its chat-template tokens dropped.

The encode path is diffusers' own: `QwenImagePipeline.encode_prompt` (the pipeline's template with its fixed system
turn, the first 34 tokens dropped, truncation to `max_sequence_length`), called on a pipeline that holds only the
tokenizer and a `LastHiddenStateEncoder` in place of `Qwen2_5_VLForConditionalGeneration`: the language model alone,
never the vision tower (unused for text prompts) nor the lm_head (whose logits diffusers throws away).

`encode_prompt` pads a batch to its longest prompt, and padding moves the last bits of the shorter prompts' states.
So prompts are encoded in groups of equal token count, which need no padding: each prompt's bytes are those of
`encode_prompt([prompt])` (what one image's call computes) whichever prompts share its batch, and each travels at its
own length. A client pads them to its call's longest and builds `prompt_embeds_mask` (`shared.collate`).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast

from encoder_server.families.base import Encoder, OutputSpec
from encoder_server.families.truncated import TextModelWrapper, load_text_model, load_tokenizer
from shared.collate import PAD, Layout

# Qwen2.5-VL checkpoints name the language model `model.` (transformers' saved layout: handled by its own prefix
# logic) or `model.language_model.` (its in-memory layout).
QWEN2_5_VL_TEXT_KEYS = {r"^model\.language_model\.": ""}


class LastHiddenStateEncoder(TextModelWrapper):
    r"""
    Stands in for `QwenImagePipeline`'s `text_encoder`: Qwen2.5-VL's language model, without the vision tower and the
    lm_head.

    The pipeline calls it as it calls `Qwen2_5_VLForConditionalGeneration` and reads `output.hidden_states[-1]`, the
    last layer's output after the final norm, which is transformers' `last_hidden_state`. For text-only input the full
    model embeds the tokens and runs this same language model with the same (1-D) positions, so the state is the
    same, bit for bit; the other hidden states are not kept.

    Args:
        text_model (`transformers.Qwen2_5_VLTextModel`): The language model.
    """

    def __init__(self, text_model: nn.Module):
        super().__init__()
        self.text_model = text_model

    def forward(self, input_ids, attention_mask=None, output_hidden_states=True):
        last = self.text_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return BaseModelOutputWithPast(last_hidden_state=last, hidden_states=(last,))


class QwenImageEncoder(Encoder):
    r"""
    The text encoder of [`~diffusers.QwenImagePipeline`], without its vision tower and lm_head.

    `encode` returns `{"prompt_embeds": [B tensors (L_i, hidden_size)]}` in the model's dtype: prompt `i`'s rows of
    `QwenImagePipeline.encode_prompt([prompt_i], max_sequence_length=...)[0]`, `L_i` its token count after the
    template's are dropped (at most `max_sequence_length`). Batched by a client as the pipeline takes them:
    `prompt_embeds` zero-padded to the longest and `prompt_embeds_mask`. Negatives (`true_cfg_scale > 1` with a
    negative prompt) are encoded the same way.

    Args:
        name (`str`): The name clients ask for.
        source (`ModelSource`): A Qwen-Image diffusers folder or hub repo.
        device (`torch.device`), dtype (`torch.dtype`): Where and in what the text encoder runs.
    """

    family = "qwen-image"

    def __init__(self, name, source, device, dtype, **options):
        super().__init__(name, source, device, dtype, **options)
        from diffusers import QwenImagePipeline

        # Straight onto the device, unless quantizing: bitsandbytes quantizes as weights move from the CPU.
        text_model = load_text_model(source, dtype=dtype, device=torch.device("cpu") if self.quantize else device,
                                     key_mapping=QWEN2_5_VL_TEXT_KEYS, reads="the last hidden state")
        self.text_encoder = self.prepare_module(LastHiddenStateEncoder(text_model))
        self.text_model = self.text_encoder.text_model
        self.tokenizer = load_tokenizer(source)
        self.pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=self.text_encoder,
                                      tokenizer=self.tokenizer, transformer=None)

    @property
    def outputs(self) -> list[OutputSpec]:
        return [OutputSpec("prompt_embeds", self.text_model.dtype,
                           (self.default_max_sequence_length, self.text_model.config.hidden_size), per_token=True,
                           layout=Layout(PAD, mask="prompt_embeds_mask"))]

    def fingerprint_parts(self) -> dict:
        pipe = self.pipe
        return {**super().fingerprint_parts(), "prompt_template": pipe.prompt_template_encode,
                "dropped_tokens": pipe.prompt_template_encode_start_idx,
                "tokenizer_max_length": pipe.tokenizer_max_length, "hidden_state": "last, after the final norm",
                "tokenizer_class": type(self.tokenizer).__name__, "batching": "groups of equal token count",
                "default_max_sequence_length": self.default_max_sequence_length,
                "max_sequence_length_limit": self.max_sequence_length_limit}

    def token_counts(self, prompts: list[str]) -> list[int]:
        """Each prompt's token count as `_get_qwen_prompt_embeds` tokenizes it (template included, truncated)."""
        pipe = self.pipe
        texts = [pipe.prompt_template_encode.format(p) for p in prompts]
        ids = self.tokenizer(texts, max_length=pipe.tokenizer_max_length + pipe.prompt_template_encode_start_idx,
                             truncation=True).input_ids
        return [len(i) for i in ids]

    @torch.inference_mode()
    def encode(self, prompts, prompts_2, max_sequence_length):
        groups: dict[int, list[int]] = defaultdict(list)
        for i, count in enumerate(self.token_counts(list(prompts))):
            groups[count].append(i)
        rows: list[torch.Tensor | None] = [None] * len(prompts)
        for members in groups.values():
            embeds, _mask = self.pipe.encode_prompt(
                [prompts[i] for i in members], device=self.device, max_sequence_length=max_sequence_length)
            for row, i in enumerate(members):  # one length, no padding: each row is the prompt's own
                rows[i] = embeds[row]
        return {"prompt_embeds": rows}
