"""Model families and the factory that picks one from `model_index.json`.

Each family's encoder is its own file here; `shared.families` holds its record (`encoder` names the class), and a
class is imported only when a model of its family is loaded, so one family's dependencies never load another's.
"""

from __future__ import annotations

import importlib

import torch

from encoder_server.errors import SourceError
from encoder_server.families.base import Encoder, OutputSpec
from shared.families import FAMILIES, PIPELINE_FAMILIES, family_of_pipeline
from shared.sources import ModelSourceError, resolve_source

__all__ = ["Encoder", "OutputSpec", "get_encoder", "family_class"]


def family_class(family: str) -> type[Encoder]:
    if family not in FAMILIES:
        raise SourceError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    module, _, cls = FAMILIES[family].encoder.partition(":")
    return getattr(importlib.import_module(module), cls)


def get_encoder(source: str, *, name: str | None = None, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, family: str | None = None, **options) -> Encoder:
    """Load the text encoders of `source` (hub repo id or local folder), picking the family from
    `model_index.json`'s `_class_name` unless `family` is given. `options` (`compile=`, `quantize=`, `cuda_graphs=`:
    True, False, or None for the server's default) reach `Encoder.__init__` and through it `Encoder.prepare_module`."""
    from encoder_server.acceleration import check_acceleration
    from encoder_server.quantize import check_quantize

    # Before minutes of loading, not after.
    check_quantize(options.get("quantize"), torch.device(device))
    check_acceleration(options.get("compile", False), options.get("cuda_graphs", False), torch.device(device))
    try:
        resolved = resolve_source(source)
        if family is None:
            class_name = resolved.read_json("model_index.json").get("_class_name")
            record = family_of_pipeline(class_name)
            if record is None:
                raise SourceError(f"{source!r} is a {class_name!r}; promptcast serves "
                                  f"{', '.join(sorted(PIPELINE_FAMILIES))} (or pass --family)")
            family = record.name
        name = name or source.rstrip("/").split("/")[-1].split("@")[0]
        return family_class(family)(name, resolved, torch.device(device), dtype, **options)
    except ModelSourceError as e:
        raise SourceError(str(e)) from None
    except OSError as e:  # from_pretrained: missing files, hub unreachable
        raise SourceError(f"could not load the text encoders of {source!r}: {e}") from e
