"""`--compile`: torch.compile of the text encoders' repeated blocks ("regional compilation").

Each text encoder is a stack of identical blocks (T5Block, CLIPEncoderLayer, MistralDecoderLayer, Qwen3DecoderLayer).
Compiling the blocks rather than the whole model lets every layer reuse one compiled graph, so start-up compiles
one layer's code instead of unrolling 24-40 of them, and the tokenizer and diffusers' glue stay eager and unchanged.

Both together: the graphs are captured from the compiled blocks (Inductor's fused kernels, launched by a replay
instead of by Python and the compiled code's guards).

`--cuda-graphs`: each text encoder's forward is captured as a CUDA graph per padded batch size (`GRAPH_BUCKETS`) and
input shape, and replayed. Eager T5-XXL launches ~1,100 kernels a forward from Python; in the server that Python
competes for the GIL with the event loop, which serializes and streams 4-15 MiB a prompt, and the GPU starves (the
benchmark measured a batch taking 1.5x longer inside the server than alone). A replay is one call. Rows are
independent in these encoders, so a batch is padded with copies of its last row up to the bucket and the extra rows
dropped; a replay runs the same kernels as eager at the bucket's batch size.

Attention: in transformers 5.23 T5, CLIP, Mistral and Qwen3 all default to `attn_implementation="sdpa"` (T5 passes its
relative position bias as SDPA's additive mask, with scale 1), so there is nothing to switch; `attention_report`
says what a loaded model uses.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


def accelerate_module(module: nn.Module, *, compile: bool, cuda_graphs: bool) -> None:
    """`--compile` compiles `module`'s repeated blocks; graphed without it, its GELUs and RMS norms take the fused
    kernels that give eager's bytes (`fused_kernels`: launched from Python each costs more host time than the ATen
    kernels it replaces, in a replay nothing); `--cuda-graphs` then replays its forward."""
    from encoder_server.fused_kernels import fuse_elementwise

    if compile:
        compile_repeated_blocks(module)
    elif cuda_graphs:
        fuse_elementwise(module)
    if cuda_graphs:
        enable_cuda_graphs(module)


def check_acceleration(compile: bool, cuda_graphs: bool, device: torch.device) -> None:
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"--cuda-graphs needs a CUDA device; this server runs on {device}: drop --cuda-graphs or "
                         "pass --device cuda")


def default_cuda_graphs(family: str, device: torch.device) -> bool:
    """What the server does without `--cuda-graphs` / `--no-cuda-graphs`: replay graphs on CUDA for a family whose
    pipeline pads every prompt to a fixed length (one graph per batch bucket then serves every request). At batch 1 an
    eager T5-XXL is bound by Python launching its kernels, and inside a server that Python is slowed by everything
    else the process does; a replay is one launch, and runs the same kernels."""
    from shared.families import FAMILIES

    return torch.device(device).type == "cuda" and FAMILIES[family].fixed_text_shapes


def repeated_blocks(module: nn.Module) -> list[nn.Module]:
    """The blocks of every `nn.ModuleList` of two or more modules of one class: a transformer's layers."""
    blocks = []
    for child in module.modules():
        if isinstance(child, nn.ModuleList) and len(child) > 1 and len({type(block) for block in child}) == 1:
            blocks.extend(child)
    return blocks


def compile_repeated_blocks(module: nn.Module) -> int:
    """`torch.compile` each repeated block of `module` in place; returns how many. Compilation is lazy: the
    server's warm-up (`DynamicBatcher.warm_up`) runs the batch sizes in use before health turns SERVING."""
    blocks = repeated_blocks(module)
    # One code object serves every block class (transformers' `GradientCheckpointingLayer.__call__`), and each
    # (class, first layer or not, static or dynamic shapes) is a cache entry: T5's first block computes the position
    # bias, the others take it. Past dynamo's default of 8 entries the rest would silently run eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for block in blocks:
        # dynamic=True: one graph with symbolic batch and length serves every batch size (batch 1 is specialized:
        # dynamo always does for size 1). dynamic=None would first compile a static graph for the first batch size,
        # a compilation that float8 (`--quantize fp8-dynamic`) makes minutes long, and then the dynamic one anyway.
        block.compile(dynamic=True)
    logger.info("compiling %d blocks of %s (%s attention)", len(blocks), type(module).__name__,
                attention_report(module))
    return len(blocks)


def is_compiled(module: nn.Module) -> bool:
    return any(getattr(block, "_compiled_call_impl", None) is not None for block in repeated_blocks(module))


def attention_report(module: nn.Module) -> str:
    config = getattr(module, "config", None)
    return getattr(config, "_attn_implementation", None) or "unknown"


def warm_up_batch_sizes(max_rows: int, cuda_graphs: bool = False) -> list[int]:
    """Batch sizes the warm-up runs. Compiled: 1 (its specialized graph), 2 (the dynamic one) and the largest batch. CUDA graphs:
    every bucket up to the largest batch, largest first (later captures reuse its memory pool)."""
    if cuda_graphs:
        return sorted({b for b in GRAPH_BUCKETS if b < max_rows} | {graph_bucket(max_rows) or max_rows}, reverse=True)
    return sorted({1, min(2, max_rows), max_rows})


GRAPH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)


def graph_bucket(rows: int) -> int | None:
    return next((bucket for bucket in GRAPH_BUCKETS if bucket >= rows), None)


def enable_cuda_graphs(module: nn.Module) -> "CUDAGraphForward":
    """Replace `module.forward` (on this instance) with a `CUDAGraphForward` of it."""
    graphed = CUDAGraphForward(module.forward)
    module.forward = graphed
    return graphed


class CUDAGraphForward:
    """Stands in for a module's `forward`: replays a CUDA graph captured on first use of each (padded batch, input
    shapes, non-tensor arguments); anything it cannot graph (CPU tensors, a batch over the last bucket, more than
    `max_graphs` shapes, a forward that synchronizes) runs eagerly.

    The tensors it returns are the graph's static outputs, overwritten by the next replay: the caller copies them out
    first. The server does (one worker thread per model encodes, then copies the batch to the host).
    """

    max_graphs = 64

    def __init__(self, forward):
        self.eager = forward
        self.graphs: dict = {}  # key -> (graph, static input leaves, static output) or None (could not be captured)
        self.pool = None

    def __call__(self, *args, **kwargs):
        from torch.utils._pytree import tree_flatten

        leaves, spec = tree_flatten((args, kwargs))
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        rows = tensors[0].shape[0] if tensors and tensors[0].dim() else 0
        bucket = graph_bucket(rows) if rows else None
        if (bucket is None or torch.is_grad_enabled()
                or any(not t.is_cuda or not t.dim() or t.shape[0] != rows for t in tensors)):
            return self.eager(*args, **kwargs)
        key = (bucket, repr(spec), tuple((tuple(leaf.shape[1:]), leaf.dtype) if isinstance(leaf, torch.Tensor)
                                         else leaf for leaf in leaves))
        if key not in self.graphs:
            if len(self.graphs) >= self.max_graphs:
                return self.eager(*args, **kwargs)
            self.graphs[key] = self._capture(leaves, spec, bucket)
        if self.graphs[key] is None:
            return self.eager(*args, **kwargs)
        graph, static_leaves, static_out = self.graphs[key]
        _fill(static_leaves, leaves, rows)
        graph.replay()
        return _rows(static_out, bucket, rows)

    def _capture(self, leaves, spec, bucket):
        from torch.utils._pytree import tree_unflatten

        static_leaves = [leaf.new_empty((bucket, *leaf.shape[1:])) if isinstance(leaf, torch.Tensor) else leaf
                         for leaf in leaves]
        _fill(static_leaves, leaves, leaves_rows(leaves))
        args, kwargs = tree_unflatten(static_leaves, spec)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # lazy initialisations (cuBLAS workspaces, autotuning) happen outside the capture
                self.eager(*args, **kwargs)
        torch.cuda.current_stream().wait_stream(side)
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                static_out = self.eager(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - a forward that syncs or branches on data cannot be graphed: stay eager
            logger.warning("could not capture a CUDA graph of %s at batch %d (%s: %s); running it eagerly",
                           getattr(self.eager, "__qualname__", "forward"), bucket, type(e).__name__, e)
            torch.cuda.synchronize()
            return None
        logger.info("captured a CUDA graph of %s at batch %d", getattr(self.eager, "__qualname__", "forward"), bucket)
        return graph, static_leaves, static_out


def leaves_rows(leaves) -> int:
    return next(leaf.shape[0] for leaf in leaves if isinstance(leaf, torch.Tensor))


def _fill(static_leaves, leaves, rows: int) -> None:
    """Copy the inputs into the graph's buffers; pad rows repeat the last real row (valid ids, valid masks)."""
    for static, leaf in zip(static_leaves, leaves):
        if isinstance(leaf, torch.Tensor):
            static[:rows].copy_(leaf)
            if static.shape[0] > rows:
                static[rows:].copy_(leaf[-1:].expand_as(static[rows:]))


def _rows(output, bucket: int, rows: int):
    from torch.utils._pytree import tree_map

    return tree_map(lambda t: t[:rows] if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == bucket else t,
                    output)


__all__ = ["accelerate_module", "default_cuda_graphs", "compile_repeated_blocks", "repeated_blocks", "is_compiled",
           "attention_report", "warm_up_batch_sizes", "enable_cuda_graphs", "CUDAGraphForward", "GRAPH_BUCKETS", "graph_bucket"]
