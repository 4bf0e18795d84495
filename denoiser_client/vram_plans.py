"""`--vram auto`: the fastest memory plan that fits the card, from plans measured on a GPU.

How the table was measured: `bench/consumer_cards.py` builds each model's transformer and VAE at their real shapes
with random weights in GPU memory, loads them under every plan of `vram.PLANS`, and makes one image at 1024x1024 with
the embeddings already on the device. For each plan it records the bytes the weights hold once loaded
(`torch.cuda.memory_allocated`, per transformer parameter), the peak tensors held during the image
(`torch.cuda.max_memory_allocated`) above those weights, and the seconds per image (denoising at the model's usual
step count, and the decode). The caching allocator reserves more than tensors hold when memory is plentiful and gives
cached blocks back when a cap (or a full card) is reached: under caps the reserved peak was measured between the
allocated peak and 1.25 times it, so a plan is predicted to fit when its allocated peak is within `1 - MARGIN` of the
budget.
`python bench/consumer_cards.py --write-table` regenerates `MEASURED` below from its results.

A plan's predicted peak for another model of the family, another size or another batch scales the two parts:
weights by the transformer's parameter count, the rest by pixels times images per call. `pick_plan` takes the
fastest plan whose prediction fits the budget with a margin; when a call still runs out of memory, the node steps
down to the next plan (`next_plan`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from denoiser_client.vram import PLANS, VramOptions

logger = logging.getLogger(__name__)

GIB = 1 << 30
MARGIN = 0.15  # of the budget, kept for the allocator's fragmentation, cuBLAS workspaces and the CUDA context


@dataclass(frozen=True)
class PlanCost:
    weight_bytes_per_param: float  # resident once loaded (transformer + VAE), per transformer parameter
    extra_bytes: float  # peak allocated above the weights for one 1024x1024 image
    seconds_per_image: float  # 1024x1024 at the model's usual steps on the measuring GPU; only the order matters


# family -> measured models of it, each {"model", "params", "gpu", "plans": {plan name: PlanCost}}.
# BEGIN MEASURED (written by bench/consumer_cards.py --write-table)
MEASURED: dict[str, list[dict]] = {
    # bench/consumer_cards.py on NVIDIA H200: consumer_cards_a.json, consumer_cards_b.json
    "flux1": [
        {"model": "flux1-dev", "params": 1.19e+10, "gpu": "NVIDIA H200", "plans": {
            "full": PlanCost(2.0146, 2.415 * GIB, 5.1705),
            "full+tiling": PlanCost(2.0175, 0.607 * GIB, 5.1375),
            "fp8": PlanCost(1.0226, 2.383 * GIB, 6.2096),
            "fp8+tiling": PlanCost(1.0226, 0.606 * GIB, 6.3608),
            "nf4+tiling": PlanCost(0.5804, 0.606 * GIB, 5.3829),
            "fp8+group-offload": PlanCost(0.017, 1.092 * GIB, 8.9155),
            "sequential-offload": PlanCost(0.0029, 0.607 * GIB, 85.4975),
        }},
    ],
    "flux2-klein": [
        {"model": "flux2-klein-4b", "params": 3.876e+09, "gpu": "NVIDIA H200", "plans": {
            "full": PlanCost(2.0541, 2.396 * GIB, 0.465),
            "full+tiling": PlanCost(2.0541, 0.620 * GIB, 0.5682),
            "fp8": PlanCost(1.0665, 2.396 * GIB, 0.4821),
            "fp8+tiling": PlanCost(1.0665, 0.658 * GIB, 0.5738),
            "nf4+tiling": PlanCost(0.6171, 0.657 * GIB, 0.5577),
            "fp8+group-offload": PlanCost(0.0523, 1.131 * GIB, 1.4972),
            "sequential-offload": PlanCost(0.0089, 0.658 * GIB, 4.4224),
        }},
        {"model": "flux2-klein-9b", "params": 9.079e+09, "gpu": "NVIDIA H200", "plans": {
            "full": PlanCost(2.0191, 2.437 * GIB, 1.029),
            "full+tiling": PlanCost(2.0229, 0.778 * GIB, 0.9609),
            "fp8": PlanCost(1.034, 2.406 * GIB, 0.8587),
            "fp8+tiling": PlanCost(1.034, 0.903 * GIB, 0.9482),
            "nf4+tiling": PlanCost(0.5865, 0.904 * GIB, 0.8801),
            "fp8+group-offload": PlanCost(0.0226, 1.817 * GIB, 1.5739),
            "sequential-offload": PlanCost(0.0038, 0.902 * GIB, 10.6846),
        }},
    ],
    "flux2": [
        {"model": "flux2-dev", "params": 3.222e+10, "gpu": "NVIDIA H200", "plans": {
            "full": PlanCost(2.0065, 2.413 * GIB, 27.709),
            "full+tiling": PlanCost(2.0065, 1.157 * GIB, 27.7446),
            "fp8": PlanCost(1.0141, 2.411 * GIB, 31.9645),
            "fp8+tiling": PlanCost(1.0141, 1.436 * GIB, 32.0834),
            "nf4+tiling": PlanCost(0.5689, 1.436 * GIB, 29.4706),
            "fp8+group-offload": PlanCost(0.0063, 3.819 * GIB, 70.9351),
            "sequential-offload": PlanCost(0.0011, 1.438 * GIB, 495.3287),
        }},
    ],
}
# END MEASURED


@dataclass(frozen=True)
class PlanChoice:
    name: str
    options: VramOptions
    predicted_bytes: float | None  # None: no measurement for this family
    budget_bytes: float | None

    def describe(self) -> str:
        if self.predicted_bytes is None or self.budget_bytes is None:
            return f"memory plan {self.name}"
        return (f"memory plan {self.name} (predicted peak {self.predicted_bytes / GIB:.1f} GiB of "
                f"{self.budget_bytes / GIB:.1f} GiB)")


def costs_for(family: str, params: float) -> tuple[dict[str, PlanCost], bool]:
    """(plan costs of the measured model of `family` nearest in size to `params`, whether `family` was measured).
    A family without measurements borrows FLUX.1's, which then mostly orders the plans."""
    entries = MEASURED.get(family)
    if not entries:
        return MEASURED["flux1"][0]["plans"], False
    nearest = min(entries, key=lambda e: abs(math.log(e["params"] / max(params, 1.0))))
    return nearest["plans"], True


def predict(family: str, plan: str, params: float, pixels: float, images: int = 1) -> float | None:
    costs, _ = costs_for(family, params)
    cost = costs.get(plan)
    if cost is None:
        return None
    return cost.weight_bytes_per_param * params + cost.extra_bytes * (pixels / 1024**2) * max(1, images)


def ordered_plans(family: str, device: str, params: float = 12e9) -> list[str]:
    """Plan names usable on `device`, fastest first (as measured for the nearest model of `family`)."""
    costs, _ = costs_for(family, params)
    names = sorted((n for n in PLANS if n in costs), key=lambda n: costs[n].seconds_per_image)
    return [n for n in names if PLANS[n].usable(device)]


def pick_plan(family: str, params: float, pixels: float, budget_bytes: float, device: str,
              images: int = 1) -> PlanChoice:
    """The fastest plan predicted to fit `budget_bytes`; the plan that needs least memory when none does."""
    plans = ordered_plans(family, device, params)
    limit = budget_bytes * (1 - MARGIN)
    predicted = {name: predict(family, name, params, pixels, images) for name in plans}
    fitting = [name for name in plans if predicted[name] <= limit]
    if fitting:
        # Within 5% of the fastest, the plan that changes least (PLANS order: no tiling, no quantization first), so a
        # card with room makes exactly the plain pipeline's image.
        costs, _ = costs_for(family, params)
        fast = costs[fitting[0]].seconds_per_image * 1.05
        name = min((n for n in fitting if costs[n].seconds_per_image <= fast), key=list(PLANS).index)
        return PlanChoice(name, PLANS[name], predicted[name], budget_bytes)
    smallest = min(plans, key=lambda n: predicted[n])
    logger.warning("no memory plan is predicted to fit %.1f GiB (the smallest, %s, needs %.1f GiB); trying it",
                   budget_bytes / GIB, smallest, predicted[smallest] / GIB)
    return PlanChoice(smallest, PLANS[smallest], predicted[smallest], budget_bytes)


def next_plan(family: str, current: VramOptions, params: float, pixels: float, device: str,
              images: int = 1) -> str | None:
    """The fastest plan predicted to need less memory than `current`, or None when none does."""
    now = predict(family, current.name, params, pixels, images)
    if now is None:  # a hand-made combination: compare with its nearest named plan by what it quantizes
        now = min((predict(family, n, params, pixels, images) for n, p in PLANS.items()
                   if p.quantize == current.quantize and p.offload == current.offload), default=None)
    for name in ordered_plans(family, device, params):
        if PLANS[name] == current:
            continue
        cost = predict(family, name, params, pixels, images)
        if now is None or cost < now:
            return name
    return None
