"""Tiny Wan 2.1 text-to-video: a UMT5EncoderModel text encoder, a one-block WanTransformer3DModel, AutoencoderKLWan."""

from __future__ import annotations

from promptcast.tiny_models.tokenizers import t5_tokenizer

# The class names the published model_index.json files use (transformers 5 drops "Fast"; these resolve in both).
TOKENIZER_CLASSES = {"tokenizer": "T5TokenizerFast"}


def build(seeded):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = t5_tokenizer()
    config = UMT5Config(
        vocab_size=len(tokenizer), d_model=40, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    pipe = WanPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        text_encoder=seeded(UMT5EncoderModel, config),
        tokenizer=tokenizer,
        # text_dim is umT5's width (real 4096); patches of 1 frame x 2 x 2 latent pixels.
        transformer=seeded(
            WanTransformer3DModel, patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
            out_channels=4, text_dim=40, freq_dim=32, ffn_dim=32, num_layers=1, rope_max_seq_len=32,
        ),
        # Three spatial halvings (1/8) and two temporal ones (1/4), as the real VAE's.
        vae=seeded(
            AutoencoderKLWan, base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
            temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
        ),
    )
    return pipe, TOKENIZER_CLASSES
