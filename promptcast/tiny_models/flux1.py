"""Tiny FLUX.1: CLIP-L and T5 text encoders, a one-block FluxTransformer2DModel, a two-block AutoencoderKL."""

from __future__ import annotations

from promptcast.tiny_models.parts import scheduler
from promptcast.tiny_models.tokenizers import clip_tokenizer, t5_tokenizer

# The class names the published model_index.json files use (transformers 5 drops "Fast"; these resolve in both).
TOKENIZER_CLASSES = {"tokenizer": "CLIPTokenizer", "tokenizer_2": "T5TokenizerFast"}


def build(seeded):
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    # CLIP's pooled output (hidden 32) feeds pooled_projection_dim, T5's states (d_model 48) joint_attention_dim;
    # different widths make a swapped pair of tensors fail loudly downstream.
    clip_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    t5_config = T5Config(
        vocab_size=len(tokenizer_2), d_model=48, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    pipe = FluxPipeline(
        scheduler=scheduler(),
        text_encoder=seeded(CLIPTextModel, clip_config),
        tokenizer=tokenizer,
        text_encoder_2=seeded(T5EncoderModel, t5_config),
        tokenizer_2=tokenizer_2,
        # in_channels 16 = 4 latent channels x the pipeline's 2x2 packing; rope axes (4, 4, 8) sum to the head dim.
        transformer=seeded(
            FluxTransformer2DModel, patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48, pooled_projection_dim=32,
            guidance_embeds=True, axes_dims_rope=(4, 4, 8),
        ),
        vae=seeded(
            AutoencoderKL, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32,
            use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611,
        ),
    )
    return pipe, TOKENIZER_CLASSES
