"""Triton kernels that give the text encoders' elementwise steps the exact bytes eager PyTorch gives, in fewer passes.

At the batches a server runs, a third of T5-XXL's device time is elementwise work that reads and writes whole
activations: `NewGELUActivation` is eight eager kernels over a (batch, 512, 10240) tensor (pow, three scalar
multiplies, two adds, tanh, a product), and each T5 / RMS norm casts to float32, squares, scales by the row's
reciprocal root, casts back and multiplies by its weight in five more. These kernels do each chain in one pass and
round to the tensor's dtype after every step, where eager does: eager's CUDA kernels compute each op in float32 and
store it in the tensor's dtype (x ** 3 is `(x * x) * x` in bfloat16 arithmetic, two roundings), so replaying the same
float32 operations with the same roundings, with no fused multiply-adds, is the same IEEE arithmetic. The one
reduction (a norm's mean of squares) stays ATen's own kernel on the same float32 squares.

That claim is checked, not assumed: `fuse_elementwise` compares each fused step with the module it replaces on the
device before using it (every finite bfloat16 / float16 value through the GELU; a sample of rows through a norm), and
leaves a class eager if one byte differs. The embeddings keep their fingerprint: the bytes are the same.

Used on CUDA under CUDA graphs, where Triton imports (it ships with PyTorch's CUDA wheels): a replay launches them at
no host cost, while launched from Python each costs more host time than the ATen kernels it replaces (at batch 1,
more than it saves). `--compile` fuses with Inductor instead. `PROMPTCAST_FUSED_KERNELS=0` turns them off.
"""

from __future__ import annotations

import logging
import math
import os
import types

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Norm classes whose forward is T5's RMS norm: float32 mean of squares, times its reciprocal root, cast to the
# weight's (T5) or the input's (Mistral, Qwen) dtype, times the weight. Only inputs of the weight's dtype are fused,
# where the two casts are the same.
RMS_NORMS = ("T5LayerNorm", "UMT5LayerNorm", "MistralRMSNorm", "Qwen3RMSNorm", "Qwen2RMSNorm", "Qwen2_5_VLRMSNorm")
GELUS = ("NewGELUActivation",)
FLOATS = (torch.bfloat16, torch.float16, torch.float32)
BLOCK = 2048

_kernels = None


def available() -> bool:
    """Whether the kernels can run here: Triton imports and they are not turned off."""
    return os.environ.get("PROMPTCAST_FUSED_KERNELS", "1") != "0" and _triton() is not None


def _triton():
    global _kernels
    if _kernels is None:
        try:
            _kernels = _build()
        except ImportError:
            _kernels = False
    return _kernels or None


def _build():
    import triton
    import triton.language as tl

    try:
        from triton.language.extra import libdevice
    except ImportError:  # older Triton
        from triton.language.extra.cuda import libdevice

    @triton.jit
    def gelu_new(x_ptr, out_ptr, n, cube_scale, tanh_scale, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        dtype = out_ptr.dtype.element_ty
        x = tl.load(x_ptr + offsets, mask=mask).to(tl.float32)
        cube = ((x * x).to(dtype).to(tl.float32) * x).to(dtype).to(tl.float32)  # torch.pow(x, 3.0)
        inner = (cube * cube_scale).to(dtype).to(tl.float32)  # 0.044715 * ...
        inner = (x + inner).to(dtype).to(tl.float32)  # input + ...
        inner = (inner * tanh_scale).to(dtype).to(tl.float32)  # math.sqrt(2.0 / math.pi) * (...)
        inner = libdevice.tanh(inner).to(dtype).to(tl.float32)
        inner = (inner + 1.0).to(dtype).to(tl.float32)  # 1.0 + torch.tanh(...)
        half = (x * 0.5).to(dtype).to(tl.float32)  # 0.5 * input
        tl.store(out_ptr + offsets, (half * inner).to(dtype), mask=mask)

    @triton.jit
    def square(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        x = tl.load(x_ptr + offsets, mask=mask).to(tl.float32)  # hidden_states.to(torch.float32).pow(2)
        tl.store(out_ptr + offsets, x * x, mask=mask)

    @triton.jit
    def scale_rows(x_ptr, scale_ptr, weight_ptr, out_ptr, width, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = columns < width
        dtype = out_ptr.dtype.element_ty
        x = tl.load(x_ptr + row * width + columns, mask=mask).to(tl.float32)
        scaled = (x * tl.load(scale_ptr + row)).to(dtype).to(tl.float32)  # (x * rsqrt(...)).to(dtype)
        weight = tl.load(weight_ptr + columns, mask=mask).to(tl.float32)
        tl.store(out_ptr + row * width + columns, (weight * scaled).to(dtype), mask=mask)  # self.weight * ...

    return types.SimpleNamespace(triton=triton, gelu_new=gelu_new, square=square, scale_rows=scale_rows)


# Eager's scalar operands are Python floats, which ATen turns into float32 before multiplying.
CUBE_SCALE = 0.044715
TANH_SCALE = math.sqrt(2.0 / math.pi)
EXACT = {"enable_fp_fusion": False}  # no a * b + c contracted into one rounding: eager rounds twice


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """transformers' `NewGELUActivation` (the tanh GELU of T5 v1.1) in one pass, byte for byte."""
    kernels = _triton()
    x = x.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    kernels.gelu_new[(kernels.triton.cdiv(n, BLOCK),)](x, out, n, CUBE_SCALE, TANH_SCALE, BLOCK=BLOCK, **EXACT)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """T5's RMS norm of a contiguous `x` of `weight`'s dtype: squares and scaling fused, ATen's mean between."""
    kernels = _triton()
    width = x.shape[-1]
    squares = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    n = x.numel()
    kernels.square[(kernels.triton.cdiv(n, BLOCK),)](x, squares, n, BLOCK=BLOCK, **EXACT)
    scale = torch.rsqrt(squares.mean(-1, keepdim=True) + eps)
    out = torch.empty_like(x)
    block = min(BLOCK, kernels.triton.next_power_of_2(width))
    kernels.scale_rows[(n // width, kernels.triton.cdiv(width, block))](x, scale, weight, out, width, BLOCK=block,
                                                                       **EXACT)
    return out


class FusedNewGELU(nn.Module):
    """Stands in for a `NewGELUActivation`: the kernel for CUDA tensors of the dtypes it was checked in, the eager
    module for anything else."""

    def __init__(self, eager: nn.Module, dtypes: tuple[torch.dtype, ...] = FLOATS):
        super().__init__()
        self.eager, self.dtypes = eager, dtypes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dtype in self.dtypes and x.numel():
            return gelu_new(x)
        return self.eager(x)


def _fused_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    if (hidden_states.is_cuda and hidden_states.dtype == weight.dtype and hidden_states.is_contiguous()
            and weight.is_contiguous() and hidden_states.numel()):
        return rms_norm(hidden_states, weight, self.variance_epsilon)
    return type(self).forward(self, hidden_states)


def fuse_elementwise(module: nn.Module) -> int:
    """Give `module`'s GELUs and RMS norms (on CUDA, in a float dtype) the fused kernels, where each class's check
    against its own eager forward on this device finds the same bytes. Returns how many modules were changed."""
    parameter = next(module.parameters(), None)
    if parameter is None or parameter.device.type != "cuda" or not available():
        return 0
    verdicts: dict[tuple, bool] = {}
    changed = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            kind = type(child).__name__
            if kind in GELUS and _exact(verdicts, child, parameter):
                setattr(parent, name, FusedNewGELU(child, (parameter.dtype,)))
                changed += 1
            elif kind in RMS_NORMS and "forward" not in vars(child) and _exact(verdicts, child, parameter):
                child.forward = types.MethodType(_fused_norm_forward, child)
                changed += 1
    if changed:
        logger.info("fused elementwise kernels in %d modules of %s", changed, type(module).__name__)
    return changed


def unfuse_elementwise(module: nn.Module) -> None:
    """Put back the eager modules and forwards `fuse_elementwise` replaced (benchmarks compare the two)."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FusedNewGELU):
                setattr(parent, name, child.eager)
            elif getattr(vars(child).get("forward"), "__func__", None) is _fused_norm_forward:
                del child.forward


def _exact(verdicts: dict, child: nn.Module, parameter: torch.Tensor) -> bool:
    """Whether the fused form of `child`'s class gives its eager bytes on this device, checked once per class, dtype
    and width: every finite value through a GELU, rows of magnitudes from 1e-4 to 1e4 through a norm."""
    weight = getattr(child, "weight", None)
    dtype = weight.dtype if weight is not None else parameter.dtype  # a GELU runs in its model's dtype
    key = (type(child), dtype, None if weight is None else weight.shape)
    if key in verdicts:
        return verdicts[key]
    if dtype not in FLOATS:
        verdicts[key] = False
        return False
    if weight is None:
        x, fused = finite_values(dtype, parameter.device), FusedNewGELU(child)
    else:
        generator = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(64, weight.shape[-1], generator=generator) * torch.logspace(-4, 4, 64).unsqueeze(1)
        x = x.to(weight.device, dtype)
        fused = types.MethodType(_fused_norm_forward, child)
    with torch.inference_mode():
        expected, got = child(x), fused(x)
    verdicts[key] = expected.dtype == got.dtype and torch.equal(expected, got)
    if not verdicts[key]:
        logger.warning("the fused kernel differs from eager %s in %s on this device; it stays eager",
                       type(child).__name__, str(dtype).removeprefix("torch."))
    return verdicts[key]


def finite_values(dtype: torch.dtype, device) -> torch.Tensor:
    """Every finite value of a 16-bit float dtype; for float32, 2**20 values of magnitudes from 1e-6 to 1e3."""
    if dtype == torch.float32:
        generator = torch.Generator(device="cpu").manual_seed(0)
        return (torch.randn(1 << 20, generator=generator) * torch.logspace(-6, 3, 1 << 20)).to(device)
    values = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    return values[torch.isfinite(values)].to(device)
