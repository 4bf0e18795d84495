"""The fused elementwise kernels are for CUDA only (their byte-for-byte checks are in tests/gpu): on the CPU a model
is left exactly as loaded."""

from __future__ import annotations

import torch
from transformers import T5Config, T5EncoderModel

from encoder_server.fused_kernels import finite_values, fuse_elementwise


def test_a_cpu_model_is_left_as_loaded():
    config = T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, vocab_size=100,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    model = T5EncoderModel(config).eval()
    before = [(name, type(m)) for name, m in model.named_modules()]
    assert fuse_elementwise(model) == 0
    assert [(name, type(m)) for name, m in model.named_modules()] == before
    assert not any("forward" in vars(m) for m in model.modules())


def test_the_gelu_check_covers_every_finite_16_bit_value():
    for dtype, mantissa in ((torch.bfloat16, 7), (torch.float16, 10)):
        values = finite_values(dtype, "cpu")
        assert bool(torch.isfinite(values).all())
        bits = values.view(torch.int16)
        assert bits.unique().numel() == values.numel() == 2**16 - 2 * 2**mantissa
