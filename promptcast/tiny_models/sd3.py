"""Tiny Stable Diffusion 3: CLIP-L, CLIP-G and T5 text encoders, a one-block SD3Transformer2DModel, an AutoencoderKL."""

from __future__ import annotations

from promptcast.tiny_models.tokenizers import clip_tokenizer, t5_tokenizer

# The class names the published model_index.json files use (transformers 5 drops "Fast"; these resolve in both).
TOKENIZER_CLASSES = {"tokenizer": "CLIPTokenizer", "tokenizer_2": "CLIPTokenizer", "tokenizer_3": "T5TokenizerFast"}


def build(seeded):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    tokenizer, tokenizer_3 = clip_tokenizer(), t5_tokenizer()
    # OpenCLIP bigG's tokenizer pads with "!" where CLIP-L's pads with <|endoftext|>, as in SD3's folders.
    tokenizer_2 = clip_tokenizer(pad_token="!")

    def clip(width: int, tok):
        return CLIPTextConfig(
            vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, projection_dim=width,
            num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu",
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )

    # Widths as in SD3.5 in miniature: CLIP-L 32 + CLIP-G 48 -> pooled 80 (real 768 + 1280 = 2048); the two CLIPs'
    # penultimate states (80 wide) are zero-padded to T5's 96 and put before its tokens (real: 4096).
    t5_config = T5Config(
        vocab_size=len(tokenizer_3), d_model=96, d_kv=16, d_ff=128, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # SD3.5's
        text_encoder=seeded(CLIPTextModelWithProjection, clip(32, tokenizer)),
        tokenizer=tokenizer,
        text_encoder_2=seeded(CLIPTextModelWithProjection, clip(48, tokenizer_2)),
        tokenizer_2=tokenizer_2,
        text_encoder_3=seeded(T5EncoderModel, t5_config),
        tokenizer_3=tokenizer_3,
        transformer=seeded(
            SD3Transformer2DModel, sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
            attention_head_dim=16, num_attention_heads=2, caption_projection_dim=32, joint_attention_dim=96,
            pooled_projection_dim=80, pos_embed_max_size=16,
        ),
        # Two blocks: latents are 1/2 of the image.
        vae=seeded(
            AutoencoderKL, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32,
            use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305,
        ),
    )
    return pipe, TOKENIZER_CLASSES
