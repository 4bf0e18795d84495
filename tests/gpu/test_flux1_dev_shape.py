"""One FLUX.1-dev-shaped image through the real CLI on CUDA: the real transformer (19 + 38 blocks, 3072 wide) and
VAE with random weights, saved as a diffusers folder, served by a server whose CLIP and T5 have FLUX.1's output
widths (768, 4096) but one layer each. `--vram-budget 16` makes auto plan a 16 GiB card for a 1024x1024 image
(the command runs through the console script's entry point in this process, as in test_commands_on_cuda)."""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image



@pytest.fixture(scope="module")
def flux1_dev_shaped(tmp_path_factory, tiny_models):
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    root = tmp_path_factory.mktemp("flux1-dev-shaped") / "model"
    shutil.copytree(tiny_models["flux1"], root)
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        shutil.rmtree(root / part)
    vocab = {"text_encoder": 49408, "text_encoder_2": 32128}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            FluxTransformer2DModel(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                                   joint_attention_dim=4096, pooled_projection_dim=768, in_channels=64,
                                   guidance_embeds=True, axes_dims_rope=[16, 56, 56]).save_pretrained(root / "transformer")
            AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512],
                          down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                          layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611,
                          shift_factor=0.1159, use_quant_conv=False,
                          use_post_quant_conv=False).save_pretrained(root / "vae")
            CLIPTextModel(CLIPTextConfig(vocab_size=vocab["text_encoder"], hidden_size=768, intermediate_size=3072,
                                         num_hidden_layers=1, num_attention_heads=12, max_position_embeddings=77,
                                         projection_dim=768)).save_pretrained(root / "text_encoder")
            T5EncoderModel(T5Config(vocab_size=vocab["text_encoder_2"], d_model=4096, d_kv=64, d_ff=10240,
                                    num_layers=1, num_heads=64, feed_forward_proj="gated-gelu")
                           ).save_pretrained(root / "text_encoder_2")
    finally:
        torch.set_default_dtype(previous)
    torch.cuda.empty_cache()
    return root


def test_flux1_dev_shaped_generate_plans_a_16_gib_card(flux1_dev_shaped, tmp_path, capsys):
    from encoder_server.server import BackgroundServer, ModelSpec, ServerConfig
    from promptcast.cli import main

    config = ServerConfig([ModelSpec(str(flux1_dev_shaped), name="flux1-dev")], port=0, device="cuda", cache_dir=None)
    out = tmp_path / "fox.png"
    with BackgroundServer(config) as server:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:  # the console script's entry point, in this process
            main(["generate", "--encoder", server.address, "--model", str(flux1_dev_shaped), "--prompt",
                  "a fox at dusk", "--out", str(out), "--device", "cuda", "--width", "1024", "--height", "1024",
                  "--steps", "4", "--vram-budget", "16"])
        err = capsys.readouterr().err
    assert exit_.value.code == 0, err
    assert Image.open(out).size == (1024, 1024)
    assert "vram: memory plan" in err and "of 16.0 GiB" in err
    print(err.splitlines()[-3:])
