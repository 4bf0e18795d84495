"""`--quantize int8|nf4|fp8`: smaller text encoders for smaller cards.

- `int8`, `nf4`: bitsandbytes (`Linear8bitLt`, LLM.int8() with outlier columns kept in 16 bit; `Linear4bit`, NF4
  with double quantization, computing in the server's dtype). This is what the FLUX.1 seeds use to fit T5-XXL on
  16 GB cards.
- `fp8`: torchao float8 weight-only (`Float8WeightOnlyConfig`): weights stored as float8_e4m3 with a per-channel
  scale, dequantized inside the (compilable) matmul. Chosen over diffusers' layerwise casting, which stores fp8 but
  upcasts each whole weight in a Python hook at every call (slower, and a diffusers-only hook on transformers
  modules), and over bitsandbytes (no fp8). torchao is the PyTorch team's maintained quantization library.
- `fp8-dynamic`: torchao float8 weights *and* activations (`Float8DynamicActivationFloat8WeightConfig`, per-row
  scales, activations scaled at each call): the matmuls run on the float8 tensor cores of Ada and Hopper GPUs (compute
  capability 8.9 or newer) at about twice bf16's rate. The weight-only modes above save memory but compute in bf16.

Only `nn.Linear` layers inside the encoder's repeated blocks are quantized (with bitsandbytes not a model's
`_keep_in_fp32_modules`, as transformers does): embeddings, norms and T5's relative position bias stay in the server's
dtype. All three need CUDA; `check_quantize` says so before anything loads.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

QUANTIZATIONS = {"int8": "bitsandbytes", "nf4": "bitsandbytes", "fp8": "torchao", "fp8-dynamic": "torchao"}


def check_quantize(name: str | None, device: torch.device) -> None:
    """Refuse an unknown name, a CPU device or a missing library, before minutes of loading."""
    if name is None:
        return
    if name not in QUANTIZATIONS:
        raise ValueError(f"--quantize {name!r} is not one of {', '.join(QUANTIZATIONS)}")
    if device.type != "cuda":
        raise ValueError(f"--quantize {name} needs a CUDA device ({QUANTIZATIONS[name]} kernels); this server runs on "
                         f"{device}: drop --quantize or pass --device cuda")
    if name == "fp8-dynamic" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"--quantize fp8-dynamic computes on float8 tensor cores (compute capability 8.9+: Ada, "
                         f"Hopper, Blackwell); {torch.cuda.get_device_name(device)} is {major}.{minor}: use "
                         "--quantize fp8 (float8 weights, bf16 compute) instead")
    library = QUANTIZATIONS[name]
    try:
        __import__(library)
    except ImportError as e:
        raise ValueError(f"--quantize {name} needs {library}, which cannot be imported ({e}); "
                         "install it with: pip install 'promptcast[quant]'") from None


def quantizable_linears(module: nn.Module, name: str) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) for every `nn.Linear` inside the module's repeated blocks."""
    from encoder_server.acceleration import repeated_blocks

    # bitsandbytes leaves a model's `_keep_in_fp32_modules` unquantized, as transformers' own bnb loading does (T5's
    # `wo`: its input overflows fp16, which bnb's int8 matmul casts to, and T5 casts it to packed 4-bit's uint8).
    # torchao's fp8 weights keep reporting the model's dtype, so they take `wo` too.
    keep = set(getattr(module, "_keep_in_fp32_modules", None) or ()) if QUANTIZATIONS[name] == "bitsandbytes" else set()
    found = []
    for block in repeated_blocks(module):
        for parent in block.modules():
            for attr, child in parent.named_children():
                if type(child) is nn.Linear and attr not in keep:
                    found.append((parent, attr, child))
    return found


def quantize_module(module: nn.Module, name: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Quantize `module`'s block linears with `name` and return it on `device`."""
    check_quantize(name, device)
    linears = quantizable_linears(module, name)
    if name in ("int8", "nf4"):
        module = _bitsandbytes(module, linears, name, dtype).to(device)  # bnb quantizes when weights reach the GPU
    else:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Float8WeightOnlyConfig,
            PerRow,
            quantize_,
        )

        module = module.to(device)
        targets = {id(linear) for _, _, linear in linears}
        config = (Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()) if name == "fp8-dynamic"
                  else Float8WeightOnlyConfig())
        quantize_(module, config, filter_fn=lambda m, _fqn: id(m) in targets)
    logger.info("%s: %d linear layers quantized to %s", type(module).__name__, len(linears), name)
    return module


def _bitsandbytes(module, linears, name, dtype):
    import bitsandbytes as bnb

    for parent, attr, linear in linears:
        weight = linear.weight.data.to("cpu", dtype)
        bias = linear.bias is not None
        if name == "int8":
            new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                      threshold=6.0)
            new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        else:
            new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=dtype,
                                    compress_statistics=True, quant_type="nf4")
            new.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4")
        if bias:
            new.bias = nn.Parameter(linear.bias.data.to("cpu", dtype), requires_grad=False)
        setattr(parent, attr, new)
    return module
