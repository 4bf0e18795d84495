"""Components several tiny models share."""

from __future__ import annotations


def scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # FLUX.1-dev's and FLUX.2's settings; both pipelines pass `mu`, which needs dynamic shifting.
    return FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def flux2_vae():
    from diffusers import AutoencoderKLFlux2

    # Two blocks: latents are 1/2 of the image; 4 latent channels -> 16 after the pipeline's 2x2 patchify.
    return AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32,
    )


def flux2_transformer(joint_attention_dim: int, guidance_embeds: bool):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=joint_attention_dim, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance_embeds,
    )
