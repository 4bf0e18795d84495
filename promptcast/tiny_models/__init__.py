"""Tiny, offline diffusers folders of every model family, for tests and the `demo` command.

Every component is the real class the diffusers pipeline expects, with a small config and seeded random weights;
tokenizers are built locally (`tokenizers.py`), so nothing is downloaded. Each family's builder is its own file,
named by its record in `shared.families`.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import shutil
import uuid

import torch

from shared.families import FAMILIES


def _write(family: str, seed: int, out: pathlib.Path):
    counter = iter(range(1000))

    def seeded(build, *args, **kwargs):
        # Each component gets its own seed, so adding one never changes another's weights.
        torch.manual_seed(seed * 1000 + next(counter))
        return build(*args, **kwargs).eval()

    module, _, function = FAMILIES[family].tiny_model.partition(":")
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
        pipe, tokenizer_classes = getattr(importlib.import_module(module), function)(seeded)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bars for a 1 MB model
    try:
        pipe.save_pretrained(out)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    for file in out.rglob("*"):
        if file.is_file():
            file.chmod(0o644)  # safetensors files come out 0600; a shared model folder should be readable
    index_file = out / "model_index.json"
    index = json.loads(index_file.read_text())
    for name, cls in tokenizer_classes.items():
        index[name] = ["transformers", cls]
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _is_complete(path: pathlib.Path, family: str) -> bool:
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    if index.get("_class_name") != FAMILIES[family].pipeline:
        return False
    parts = [name for name, value in index.items() if isinstance(value, list) and value[0] is not None]
    return all((path / name).is_dir() and any((path / name).iterdir()) for name in parts)


def make_tiny_model(
    path: str | os.PathLike, family: str = "flux1", *, seed: int = 0, overwrite: bool = False
) -> pathlib.Path:
    r"""
    Write a complete, small diffusers folder for a model family, fully offline.

    Every component is the class the diffusers pipeline loads (for example `FluxTransformer2DModel`,
    `T5EncoderModel`, `Mistral3ForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`, `UMT5EncoderModel`)
    with a tiny config and seeded random weights; tokenizers are trained here on an embedded English corpus. The
    result loads with the pipeline's plain `from_pretrained` and produces (noise) images, or for `wan` video frames,
    in well under a second on a CPU.

    Args:
        path (`str` or `os.PathLike`):
            The folder to write. It is built in a hidden sibling folder and renamed into place, so a crash never
            leaves a half-written model here.
        family (`str`, *optional*, defaults to `"flux1"`):
            A name of `shared.families.FAMILIES`: `"flux1"` (`FluxPipeline`), `"flux2"` (`Flux2Pipeline`),
            `"flux2-klein"` (`Flux2KleinPipeline`), `"sd3"` (`StableDiffusion3Pipeline`), `"qwen-image"`
            (`QwenImagePipeline`), `"z-image"` (`ZImagePipeline`) or `"wan"` (`WanPipeline`).
        seed (`int`, *optional*, defaults to 0):
            Seed of the random weights. The same seed writes the same bytes.
        overwrite (`bool`, *optional*, defaults to `False`):
            Rebuild even if `path` already holds a complete model of `family`, and replace whatever `path` holds.

    Returns:
        `pathlib.Path`: `path`, made absolute.

    Raises:
        `ValueError`: if `family` is unknown.
        `FileExistsError`: if `path` exists, is not empty and holds no complete `family` model, and `overwrite` is
            `False`.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    path = pathlib.Path(os.path.abspath(path))
    if not overwrite and _is_complete(path, family):
        return path
    if not overwrite and path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and does not hold a complete {family} model; pass overwrite=True")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex}")
    try:
        _write(family, seed, tmp)
        if path.is_dir() and not path.is_symlink():
            os.replace(path, old)  # a directory cannot be renamed over a non-empty one: move it aside first
        elif path.exists() or path.is_symlink():
            path.unlink()
        try:
            os.replace(tmp, path)
        except OSError:
            # Another process finished the same model first: use theirs.
            if not overwrite and _is_complete(path, family):
                return path
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return path
