"""What a node command is asked to make, and the one validator of it.

`GenerateOptions` holds one image's (or video's) parameters; `generate`, job lines and the web console all check them
with `check_options`, which names the argument the way its caller spells it (`--width` on the command line, `width=`
in a job line) and says the fix; `media_problems` checks them against what the family makes (images or video).
Everything here runs before any model loads and imports neither torch nor grpc.
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
VIDEO_FORMATS = {".mp4": "MP4", ".gif": "GIF"}
DEFAULT_FPS = 16  # Wan's own examples export at 16 frames a second
MAX_FPS = 120
FRAMES_PER_LATENT = 4  # Wan's VAE packs 4 frames into each latent frame after the first: 4k+1 frames
MAX_FRAMES = 1001


@dataclass(kw_only=True)
class GenerateOptions:
    """One image's (video's) parameters; `None` means the pipeline's own default. Keyword-only, so the items that
    extend it (`node.RenderItem`, `jobs.JobItem`) put their own fields first."""

    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    negative_prompt: str | None = None
    true_cfg_scale: float | None = None
    max_sequence_length: int | None = None
    reference_images: tuple[str, ...] = ()  # FLUX.2: opened and encoded by the node's own VAE
    num_frames: int | None = None  # video families
    fps: int | None = None  # video families: frames a second of the file written (default 16)


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
    frames = options.num_frames
    if frames is not None and (not 1 <= frames <= MAX_FRAMES or (frames - 1) % FRAMES_PER_LATENT):
        near = max(1, min(MAX_FRAMES, round((frames - 1) / FRAMES_PER_LATENT) * FRAMES_PER_LATENT + 1))
        say("num_frames", f"must be {FRAMES_PER_LATENT}k+1 from 1 to {MAX_FRAMES} (the video VAE packs "
                          f"{FRAMES_PER_LATENT} frames into each latent frame after the first), e.g. {near}")
    if options.fps is not None and not 1 <= options.fps <= MAX_FPS:
        say("fps", f"must be from 1 to {MAX_FPS} frames a second")
    return problems


def media_problems(options: GenerateOptions, family: str, media: str, name: Callable[[str], str] = cli_flag
                   ) -> list[str]:
    """Options that do not fit what `family` makes (`media`: "image" or "video"): frames and fps for an image
    family."""
    if media == "video":
        return []
    problems = []
    for field in ("num_frames", "fps"):
        value = getattr(options, field)
        if value is not None:
            text = f"is for video families (wan), and {family} makes images: drop it"
            problems.append(f"{name(field)} {value}: {text}" if name is cli_flag else f"{name(field)}={value} {text}")
    return problems


def check_options(options: GenerateOptions, name: Callable[[str], str] = cli_flag) -> GenerateOptions:
    """`options` if valid, else `ValueError` listing every problem."""
    problems = option_problems(options, name)
    if problems:
        raise ValueError("; ".join(problems))
    return options


def check_image_path(path: str | os.PathLike, flag: str = "--out", formats: dict[str, str] = IMAGE_FORMATS) -> str:
    """The image format `path`'s suffix names; `ValueError` if it names none, or if `path` cannot be written."""
    return check_output_path(path, "image", flag, formats)


def check_output_path(path: str | os.PathLike, media: str = "image", flag: str = "--out",
                      formats: dict[str, str] | None = None) -> str:
    """The format `path`'s suffix names, among those of `media` ("image": PNG, JPEG, WebP; "video": MP4, GIF);
    `ValueError` if it names none, or if `path` cannot be written."""
    path = Path(path)
    formats = formats or (VIDEO_FORMATS if media == "video" else IMAGE_FORMATS)
    example = "video.mp4" if media == "video" else "image.png"
    if path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a folder: name the file to write, e.g. {path / example}")
    fmt = formats.get(path.suffix.lower())
    if fmt is None:
        other = IMAGE_FORMATS if media == "video" else VIDEO_FORMATS
        kind = "a video format" if media == "video" else "an image format"
        hint = f" (this model makes {media}s)" if path.suffix.lower() in other else ""
        raise ValueError(f"{flag} {str(path)!r}: the suffix {path.suffix or '(none)'!r} is not {kind} promptcast "
                         f"writes{hint}; use one of {', '.join(sorted(formats))}")
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

