"""Model families and the factory that picks one from `model_index.json`."""

from __future__ import annotations

import importlib

import torch

from encoder_server.errors import SourceError
from encoder_server.families.base import Encoder, OutputSpec
from encoder_server.sources import resolve_source
from shared.families import PIPELINE_FAMILIES

# family name -> "module:Class"; imported lazily so one family's dependencies never load another's.
FAMILIES = {
    "flux1": "encoder_server.families.flux1:Flux1Encoder",
    "flux2": "encoder_server.families.flux2:Flux2Encoder",
    "flux2-klein": "encoder_server.families.flux2_klein:Flux2KleinEncoder",
}

__all__ = ["Encoder", "OutputSpec", "FAMILIES", "get_encoder", "family_class"]


def family_class(family: str) -> type[Encoder]:
    if family not in FAMILIES:
        raise SourceError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    module, _, cls = FAMILIES[family].partition(":")
    return getattr(importlib.import_module(module), cls)


def get_encoder(source: str, *, name: str | None = None, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, family: str | None = None, **options) -> Encoder:
    """Load the text encoders of `source` (hub repo id or local folder), picking the family from
    `model_index.json`'s `_class_name` unless `family` is given. `options` (`compile=`, `quantize=`) reach
    `Encoder.__init__` and through it `Encoder.prepare_module`."""
    from encoder_server.acceleration import check_acceleration
    from encoder_server.quantize import check_quantize

    # Before minutes of loading, not after.
    check_quantize(options.get("quantize"), torch.device(device))
    check_acceleration(options.get("compile", False), options.get("cuda_graphs", False), torch.device(device))
    resolved = resolve_source(source)
    if family is None:
        class_name = resolved.read_json("model_index.json").get("_class_name")
        if class_name not in PIPELINE_FAMILIES:
            raise SourceError(f"{source!r} is a {class_name!r}; promptcast serves "
                              f"{', '.join(sorted(PIPELINE_FAMILIES))} (or pass --family)")
        family = PIPELINE_FAMILIES[class_name]
    name = name or source.rstrip("/").split("/")[-1].split("@")[0]
    try:
        return family_class(family)(name, resolved, torch.device(device), dtype, **options)
    except OSError as e:  # from_pretrained: missing files, hub unreachable
        raise SourceError(f"could not load the text encoders of {source!r}: {e}") from e
