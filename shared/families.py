"""Facts about each model family that both sides need: which diffusers pipelines belong to it,
which components are text encoding (remote) and which embedding widths the transformer expects."""

from __future__ import annotations

PIPELINE_FAMILIES = {
    "FluxPipeline": "flux1", "FluxImg2ImgPipeline": "flux1", "FluxInpaintPipeline": "flux1",
    "FluxControlPipeline": "flux1", "FluxFillPipeline": "flux1", "FluxKontextPipeline": "flux1",
    "Flux2Pipeline": "flux2", "Flux2KleinPipeline": "flux2-klein",
}

# Components a denoiser node never loads: they live on the encoder server.
TEXT_COMPONENTS = {
    "flux1": ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
    "flux2": ("text_encoder", "tokenizer"),
    "flux2-klein": ("text_encoder", "tokenizer"),
}

# output name -> transformer config key whose value must equal the output's last dimension.
EMBEDDING_WIDTHS = {
    "flux1": {"prompt_embeds": "joint_attention_dim", "pooled_prompt_embeds": "pooled_projection_dim"},
    "flux2": {"prompt_embeds": "joint_attention_dim"},
    "flux2-klein": {"prompt_embeds": "joint_attention_dim"},
}
