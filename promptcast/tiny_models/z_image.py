"""Tiny Z-Image: a Qwen3Model text encoder (3 layers), a one-block ZImageTransformer2DModel, an AutoencoderKL."""

from __future__ import annotations

from promptcast.tiny_models.tokenizers import qwen3_tokenizer

# The class names the published model_index.json files use (transformers 5 drops "Fast"; these resolve in both).
TOKENIZER_CLASSES = {"tokenizer": "Qwen2Tokenizer"}


def build(seeded):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = qwen3_tokenizer()
    # 3 layers: the pipeline reads hidden_states[-2], the input of the last layer (real: 36 layers, Qwen3 4B).
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=4096, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # Z-Image-Turbo's
        text_encoder=seeded(Qwen3Model, config),
        tokenizer=tokenizer,
        # cap_feat_dim is the text width; rope axes (8, 4, 4) sum to the head dim (32 / 2 heads).
        transformer=seeded(
            ZImageTransformer2DModel, all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=1,
            n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=24, axes_dims=[8, 4, 4], axes_lens=[256, 32, 32],
        ),
        # Two blocks: latents are 1/2 of the image.
        vae=seeded(
            AutoencoderKL, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32,
            scaling_factor=0.3611, shift_factor=0.1159,
        ),
    )
    return pipe, TOKENIZER_CLASSES
