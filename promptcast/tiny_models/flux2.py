"""Tiny FLUX.2-dev: a Mistral3ForConditionalGeneration text encoder (31 layers), a one-block Flux2 transformer."""

from __future__ import annotations

from promptcast.tiny_models.parts import flux2_transformer, flux2_vae, scheduler
from promptcast.tiny_models.tokenizers import mistral_tokenizer

# The class names the published model_index.json files use (transformers 5 drops "Fast"; these resolve in both).
TOKENIZER_CLASSES = {"tokenizer": "PreTrainedTokenizerFast"}


def build(seeded):
    from diffusers import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    tokenizer = mistral_tokenizer()
    # 31 layers: hidden_states[30], the deepest one the pipeline stacks, must not be the last one, which
    # transformers returns after the final norm (the real model has 40 layers).
    text_config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=31, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=4096, sliding_window=None,
        bos_token_id=1, eos_token_id=2, pad_token_id=11,
    )
    vision_config = PixtralVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=8,
        image_size=32, patch_size=8,
    )
    config = Mistral3Config(text_config=text_config, vision_config=vision_config, image_token_index=10)
    pipe = Flux2Pipeline(
        scheduler=scheduler(),
        text_encoder=seeded(Mistral3ForConditionalGeneration, config),
        tokenizer=tokenizer,
        transformer=seeded(flux2_transformer, joint_attention_dim=3 * 32, guidance_embeds=True),
        vae=seeded(flux2_vae),
    )
    return pipe, TOKENIZER_CLASSES
