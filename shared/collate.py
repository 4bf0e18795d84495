"""How one prompt's tensors become a pipeline call's arguments: the batching rule of each output.

Most outputs have one shape for every prompt and are stacked. Some pipelines take variable-length text: the server
sends each prompt at its own length (so its bytes, and its cache entry, do not depend on the other prompts of a
batch) and the client batches them by the output's layout, not by family:

- `stack`: `torch.stack` (every prompt has the same shape);
- `pad`: zero-padded to the longest prompt of the call, with a mask argument (1 for a prompt's tokens, 0 for the
  padding) named by the layout, as `QwenImagePipeline` takes `prompt_embeds` + `prompt_embeds_mask`;
- `list`: a Python list of per-prompt tensors, as `ZImagePipeline` takes `prompt_embeds`.

A node that builds its own batches (a prompt and its negative, several jobs) collates each group on its own, with
the prefix its arguments need (`negative_`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

STACK, PAD, LIST = "stack", "pad", "list"
COLLATES = (STACK, PAD, LIST)


@dataclass(frozen=True)
class Layout:
    r"""
    How a client batches one output's per-prompt tensors.

    Args:
        collate (`str`, defaults to `"stack"`): `"stack"`, `"pad"` or `"list"`.
        mask (`str`, *optional*): with `"pad"`, the name of the mask argument the client builds (int64, `(B, L)`);
            empty for none.
    """

    collate: str = STACK
    mask: str = ""

    def __post_init__(self):
        if self.collate not in COLLATES:
            raise ValueError(f"collate={self.collate!r} is not one of {', '.join(COLLATES)}")
        if self.mask and self.collate != PAD:
            raise ValueError(f"mask={self.mask!r} needs collate='pad', not {self.collate!r}")


Batch = dict[str, "torch.Tensor | list[torch.Tensor]"]


def batch_of(rows: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
    """`{name: [each prompt's tensor]}` from one dict per prompt (all with the same names)."""
    if not rows:
        raise ValueError("no prompts to collate")
    return {name: [row[name] for row in rows] for name in rows[0]}


def rows_of(batch: Mapping[str, torch.Tensor | Sequence[torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """One dict per prompt from a batch whose values are `(B, ...)` tensors or lists of B tensors."""
    sizes = {name: len(value) for name, value in batch.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"outputs hold different numbers of prompts: {sizes}")
    count = next(iter(sizes.values()), 0)
    return [{name: value[i] for name, value in batch.items()} for i in range(count)]


def collate(batch: Mapping[str, torch.Tensor | Sequence[torch.Tensor]], layouts: Mapping[str, Layout], *,
            prefix: str = "") -> Batch:
    r"""
    The arguments of one pipeline call, from each output's per-prompt tensors.

    Args:
        batch (`Mapping[str, torch.Tensor | Sequence[torch.Tensor]]`):
            Output name -> a list of per-prompt tensors (see `batch_of`), or a `(B, ...)` tensor already stacked
            (passed through).
        layouts (`Mapping[str, Layout]`):
            Output name -> its layout; a name not in it is stacked.
        prefix (`str`, *optional*):
            Put before every argument name, the mask's too (`"negative_"`: `negative_prompt_embeds`,
            `negative_prompt_embeds_mask`).

    Returns:
        `dict`: argument name -> `(B, ...)` tensor, or a list of tensors for `"list"` outputs.
    """
    out: Batch = {}
    for name, values in batch.items():
        layout = layouts.get(name, Layout())
        if isinstance(values, torch.Tensor):
            if layout.collate != STACK:
                raise ValueError(f"{name} is a {layout.collate!r} output: pass its prompts' tensors as a list")
            out[prefix + name] = values
        elif layout.collate == LIST:
            out[prefix + name] = list(values)
        elif layout.collate == PAD:
            embeds, mask = pad(list(values))
            out[prefix + name] = embeds
            if layout.mask:
                out[prefix + layout.mask] = mask
        else:
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise ValueError(f"{name}: prompts have different shapes {sorted(shapes)}; a stacked output needs "
                                 "one shape (is the server's layout for it 'pad' or 'list'?)")
            out[prefix + name] = torch.stack(list(values))
    return out


def pad(values: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad `(L_i, ...)` tensors to `(B, max L_i, ...)` (diffusers pads with `new_zeros` too), and their mask:
    `(B, max L_i)` int64, 1 on each prompt's own tokens."""
    if not values:
        raise ValueError("no prompts to pad")
    trailing = {tuple(v.shape[1:]) for v in values}
    if len(trailing) > 1:
        raise ValueError(f"prompts differ beyond their length axis: {sorted(trailing)}")
    length = max(v.shape[0] for v in values)
    first = values[0]
    embeds = first.new_zeros((len(values), length, *first.shape[1:]))
    mask = torch.zeros((len(values), length), dtype=torch.long, device=first.device)
    for i, v in enumerate(values):
        embeds[i, :v.shape[0]] = v
        mask[i, :v.shape[0]] = 1
    return embeds, mask
