"""What a node command is asked to make, and the one validator of it.

`GenerateOptions` holds one image's parameters; `generate`, job lines and the web console all check them with
`check_options`, which names the argument the way its caller spells it (`--width` on the command line, `width=` in a
job line) and says the fix. Everything here runs before any model loads and imports neither torch nor grpc.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range
MAX_SIDE = 4096
MAX_STEPS = 1000
SIZE_MULTIPLE = 16  # FLUX-style latents: the VAE's 8x times the transformer's 2x2 patches
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


@dataclass
class GenerateOptions:
    """One image's parameters; `None` means the pipeline's own default."""

    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    negative_prompt: str | None = None
    true_cfg_scale: float | None = None
    max_sequence_length: int | None = None
    reference_images: tuple[str, ...] = ()  # FLUX.2: opened and encoded by the node's own VAE


def cli_flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def line_field(field: str) -> str:
    return field


def option_problems(options: GenerateOptions, name: Callable[[str], str] = cli_flag) -> list[str]:
    """Every problem with `options`, each naming the argument (as `name(field)` spells it), the value and the fix."""
    problems = []

    def say(field: str, text: str) -> None:
        value = getattr(options, field)
        problems.append(f"{name(field)} {value}: {text}" if name is cli_flag else f"{name(field)}={value} {text}")

    if not isinstance(options.seed, int) or not 0 <= options.seed <= MAX_SEED:
        say("seed", f"must be a whole number from 0 to {MAX_SEED}")
    if options.steps is not None and not 1 <= options.steps <= MAX_STEPS:
        say("steps", f"must be from 1 to {MAX_STEPS}")
    for side in ("width", "height"):
        value = getattr(options, side)
        if value is None:
            continue
        if value <= 0 or value % SIZE_MULTIPLE:
            near = max(SIZE_MULTIPLE, round(value / SIZE_MULTIPLE) * SIZE_MULTIPLE)
            say(side, f"must be a positive multiple of {SIZE_MULTIPLE} (e.g. {min(near, MAX_SIDE)})")
        elif value > MAX_SIDE:
            say(side, f"is over {MAX_SIDE}, the largest side promptcast renders")
    for scale in ("guidance", "true_cfg_scale"):
        value = getattr(options, scale)
        if value is not None and not 0 <= value <= 100:
            say(scale, "must be from 0 to 100")
    if options.max_sequence_length is not None and options.max_sequence_length < 1:
        say("max_sequence_length", "must be at least 1")
    return problems


def check_options(options: GenerateOptions, name: Callable[[str], str] = cli_flag) -> GenerateOptions:
    """`options` if valid, else `ValueError` listing every problem."""
    problems = option_problems(options, name)
    if problems:
        raise ValueError("; ".join(problems))
    return options


def check_image_path(path: str | os.PathLike, flag: str = "--out", formats: dict[str, str] = IMAGE_FORMATS) -> str:
    """The image format `path`'s suffix names; `ValueError` if it names none, or if `path` cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a folder: name the file to write, e.g. {path / 'image.png'}")
    fmt = formats.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{flag} {str(path)!r}: the suffix {path.suffix or '(none)'!r} is not an image format "
                         f"promptcast writes; use one of {', '.join(sorted(formats))}")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ValueError(f"{flag} {str(path)!r}: {parent} is a file, not a folder")
    if parent is not None and not os.access(parent, os.W_OK):
        raise ValueError(f"{flag} {str(path)!r}: {parent} is not writable")
    return fmt


def check_readable_files(paths, flag: str) -> None:
    for path in paths:
        if not Path(path).is_file():
            raise ValueError(f"{flag} {str(path)!r} does not exist (or is not a file)")

