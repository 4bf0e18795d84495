"""Tiny FLUX.2 klein: a Qwen3ForCausalLM text encoder (28 layers), a one-block Flux2 transformer, distilled."""

from __future__ import annotations

from promptcast.tiny_models.parts import flux2_transformer, flux2_vae, scheduler
from promptcast.tiny_models.tokenizers import qwen3_tokenizer

# The class names the published model_index.json files use (transformers 5 drops "Fast"; these resolve in both).
TOKENIZER_CLASSES = {"tokenizer": "Qwen2TokenizerFast"}


def build(seeded):
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = qwen3_tokenizer()
    # 28 layers: hidden_states[27], the deepest one stacked, must not be the final-normed last one (real: 36).
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=24, intermediate_size=48, num_hidden_layers=28, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=4096, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    # Like FLUX.2 [klein] 4B: step-distilled, so no guidance embedding and no CFG pass.
    pipe = Flux2KleinPipeline(
        scheduler=scheduler(),
        text_encoder=seeded(Qwen3ForCausalLM, config),
        tokenizer=tokenizer,
        transformer=seeded(flux2_transformer, joint_attention_dim=3 * 24, guidance_embeds=False),
        vae=seeded(flux2_vae),
        is_distilled=True,
    )
    return pipe, TOKENIZER_CLASSES
