"""FLUX.1 (dev, schnell): CLIP-L pooled output + T5-XXL last hidden state.

The encode path *is* diffusers': `FluxPipeline.encode_prompt` called on a pipeline that holds only
the two text encoders and their tokenizers (no transformer, no VAE, no scheduler), so truncation,
padding, `prompt_2` handling and dtypes are exactly the library's.
"""

from __future__ import annotations

import torch

from encoder_server.families.base import Encoder, OutputSpec


class Flux1Encoder(Encoder):
    family = "flux1"
    takes_prompt_2 = True

    def __init__(self, name, source, device, dtype, **options):
        super().__init__(name, source, device, dtype, **options)
        from diffusers import FluxPipeline
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        kwargs = {"revision": source.revision} if source.revision else {}
        load = dict(dtype=dtype, **kwargs)
        self.pipe = FluxPipeline(
            scheduler=None, vae=None, transformer=None,
            # CLIP-L is 0.1 B parameters and gives the pooled vector: never quantized. T5-XXL (4.7 B) is.
            text_encoder=self.prepare_module(
                CLIPTextModel.from_pretrained(source.pretrained, subfolder="text_encoder", **load), quantize=False),
            tokenizer=CLIPTokenizer.from_pretrained(source.pretrained, subfolder="tokenizer", **kwargs),
            text_encoder_2=self.prepare_module(
                T5EncoderModel.from_pretrained(source.pretrained, subfolder="text_encoder_2", **load)),
            tokenizer_2=T5TokenizerFast.from_pretrained(source.pretrained, subfolder="tokenizer_2", **kwargs),
        )
        # schnell is distilled without guidance embeddings and trained with 256 T5 tokens.
        transformer_config = source.read_json("transformer/config.json", missing_ok=True) or {}
        self.default_max_sequence_length = 512 if transformer_config.get("guidance_embeds", True) else 256

    @property
    def outputs(self) -> list[OutputSpec]:
        t5, clip = self.pipe.text_encoder_2, self.pipe.text_encoder
        return [
            OutputSpec("prompt_embeds", t5.dtype, (self.default_max_sequence_length, t5.config.d_model), per_token=True),
            OutputSpec("pooled_prompt_embeds", clip.dtype, (clip.config.hidden_size,)),
        ]

    @torch.inference_mode()
    def encode(self, prompts, prompts_2, max_sequence_length):
        prompt_embeds, pooled_prompt_embeds, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=prompts_2, device=self.device, max_sequence_length=max_sequence_length)
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds}
