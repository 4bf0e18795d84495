"""The fused elementwise kernels on CUDA give eager PyTorch's bytes: every finite 16-bit value through the GELU, the
RMS norms of T5, Mistral and Qwen3 at several magnitudes, a whole T5 encoder, and the served model (whose images
`test_commands_on_cuda` compares with the plain pipeline's for every family). A kernel that differs is not used."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers.activations import NewGELUActivation

from encoder_server import fused_kernels
from encoder_server.fused_kernels import FusedNewGELU, finite_values, fuse_elementwise, unfuse_elementwise

pytestmark = pytest.mark.skipif(not fused_kernels.available(), reason="Triton does not import here")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_gelu_kernel_gives_eagers_bytes_for_every_finite_value(dtype):
    x = finite_values(dtype, "cuda")
    if dtype != torch.float32:
        assert x.numel() == 2**16 - 2 * 2**(10 if dtype == torch.float16 else 7)  # all but the Inf / NaN patterns
    eager = NewGELUActivation()
    with torch.inference_mode():
        assert torch.equal(FusedNewGELU(eager)(x), eager(x))
        shaped = x[: 3 * 1000].reshape(3, 10, 100)
        assert torch.equal(FusedNewGELU(eager)(shaped), eager(shaped))


def norms(width: int):
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    return [T5LayerNorm(width), MistralRMSNorm(width), Qwen3RMSNorm(width)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("width", [128, 4096, 5000])
def test_the_norm_kernels_give_eagers_bytes(dtype, width):
    generator = torch.Generator().manual_seed(width)
    for norm in norms(width):
        with torch.no_grad():
            norm.weight.copy_(torch.randn(width, generator=generator))
        norm = norm.to("cuda", dtype)
        x = (torch.randn(3, 77, width, generator=generator) * torch.logspace(-3, 3, 77)[:, None]).to("cuda", dtype)
        with torch.inference_mode():
            expected = norm(x)
            assert fuse_elementwise(torch.nn.Sequential(norm)) == 1, type(norm).__name__
            assert torch.equal(norm(x), expected), type(norm).__name__
            assert torch.equal(norm(x[:, :5]), norm.__class__.forward(norm, x[:, :5]))  # a view: eager's way


def test_a_whole_t5_encoder_gives_eagers_bytes_fused():
    from transformers import T5Config, T5EncoderModel

    config = T5Config(d_model=512, d_ff=1280, num_layers=3, num_heads=8, d_kv=64, vocab_size=1000,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    torch.manual_seed(0)
    model = T5EncoderModel(config).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 1000, (4, 128), device="cuda")
    with torch.inference_mode():
        eager = model(ids).last_hidden_state
        assert fuse_elementwise(model) == 3 + 2 * 3 + 1  # a GELU per block, two norms per block, the final norm
        assert isinstance(model.encoder.block[0].layer[1].DenseReluDense.act, FusedNewGELU)
        assert torch.equal(model(ids).last_hidden_state, eager)
        unfuse_elementwise(model)
        assert isinstance(model.encoder.block[0].layer[1].DenseReluDense.act, NewGELUActivation)
        assert "forward" not in vars(model.encoder.final_layer_norm)


def test_a_kernel_that_differs_from_eager_is_not_used(monkeypatch, caplog):
    """The check before use is what keeps the promise: a GELU kernel with a wrong constant (0.045 for 0.044715)
    stays eager. (A constant off in its fifth digit changes no bfloat16 output: the check, over every input, then
    rightly finds the same bytes.)"""
    monkeypatch.setattr(fused_kernels, "CUBE_SCALE", 0.045)
    module = torch.nn.Sequential(torch.nn.Linear(8, 8), NewGELUActivation()).to("cuda", torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="encoder_server.fused_kernels"):
        assert fuse_elementwise(module) == 0
    assert isinstance(module[1], NewGELUActivation)
    assert "differs from eager NewGELUActivation in bfloat16" in caplog.text


def test_off_by_environment(monkeypatch):
    monkeypatch.setenv("PROMPTCAST_FUSED_KERNELS", "0")
    module = torch.nn.Sequential(torch.nn.Linear(8, 8), NewGELUActivation()).to("cuda", torch.bfloat16)
    assert fuse_elementwise(module) == 0


def test_the_served_flux1_model_runs_fused(tiny_models, capfd):
    """The server's default set-up on CUDA (a worker process replaying graphs) fuses T5's GELUs and norms; the bytes
    it sends equal the thread worker's with the kernels off."""
    from conftest import assert_same
    from denoiser_client import RemoteTextEncoder
    from encoder_server.server import BackgroundServer, ModelSpec, ServerConfig

    got = {}
    for worker, fused in (("process", "1"), ("thread", "0")):
        config = ServerConfig([ModelSpec(str(tiny_models["flux1"]), name="tiny")], port=0, device="cuda",
                              cache_dir=None, cache_mem=0, worker=worker)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("PROMPTCAST_FUSED_KERNELS", fused)
            capfd.readouterr()
            with BackgroundServer(config) as server, RemoteTextEncoder(server.address, timeout=60) as client:
                got[worker] = client.encode(["a fox on a gpu", "two foxes"], max_sequence_length=32)
            log = capfd.readouterr().err
        assert ("fused elementwise kernels in" in log) is (fused == "1"), log[-2000:]
    assert_same(got["process"], got["thread"])
