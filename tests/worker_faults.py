"""Faults a model worker process applies to itself (`ProcessEncoder(wrap="worker_faults:wrap")`): prompts that ask
for them run out of memory when batched, come back with NaN, or end the process mid-request."""

from __future__ import annotations

import os

import torch


class Faults:
    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, prompts, prompts_2, max_sequence_length):
        if any("CRASH" in p for p in prompts):
            os._exit(7)
        if len(prompts) > 1 and any("OOM" in p for p in prompts):
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")
        out = self.inner.encode(prompts, prompts_2, max_sequence_length)
        if any("POISON" in p for p in prompts):
            out = {name: t.clone() for name, t in out.items()}
            for i, prompt in enumerate(prompts):
                if "POISON" in prompt:
                    out["prompt_embeds"][i, 3, 5] = float("nan")
        return out


def wrap(encoder):
    return Faults(encoder)
