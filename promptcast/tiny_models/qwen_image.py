"""Tiny Qwen-Image: a Qwen2_5_VLForConditionalGeneration text encoder, a QwenImageTransformer2DModel, its VAE."""

from __future__ import annotations

from promptcast.tiny_models.parts import scheduler
from promptcast.tiny_models.tokenizers import QWEN2_5_VL_SPECIALS, qwen2_5_vl_tokenizer

# The class names the published model_index.json files use (transformers 5 drops "Fast"; these resolve in both).
TOKENIZER_CLASSES = {"tokenizer": "Qwen2Tokenizer"}


def build(seeded):
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    # QwenImagePipeline wraps every prompt in a fixed template and drops its first 34 tokens (the system turn): learned
    # whole here, as the real vocabulary holds its words, so the dropped tokens are exactly that turn.
    tokenizer = qwen2_5_vl_tokenizer(template_lines=_template_lines())
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2_5_VL_SPECIALS}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=24, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096, rope_theta=1000000.0,
            rope_scaling={"type": "mrope", "mrope_section": [2, 2, 2]}, tie_word_embeddings=False,
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=24,
                           fullatt_block_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    pipe = QwenImagePipeline(
        scheduler=scheduler(),
        text_encoder=seeded(Qwen2_5_VLForConditionalGeneration, config),
        tokenizer=tokenizer,
        # in_channels 16 = 4 latent channels x the pipeline's 2x2 packing; rope axes (8, 4, 4) sum to the head dim.
        transformer=seeded(
            QwenImageTransformer2DModel, patch_size=2, in_channels=16, out_channels=4, num_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(8, 4, 4),
        ),
        vae=seeded(
            AutoencoderKLQwenImage, base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1,
            temperal_downsample=[False], latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
        ),
    )
    return pipe, TOKENIZER_CLASSES


def _template_lines() -> list[str]:
    from diffusers import QwenImagePipeline

    # The template is set in __init__; a pipeline without components has it too.
    return QwenImagePipeline(None, None, None, None, None).prompt_template_encode.format("").splitlines()
