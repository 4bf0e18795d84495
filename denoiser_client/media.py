"""What a node writes: an image, or a video's frames as MP4, GIF or, with no MP4 encoder installed, numbered PNGs.

Every output is complete or absent at its final path (`shared.atomic_files`): a video is written to a temp file with
its suffix (encoders pick the format by it) and renamed; frames go to a temp folder that is renamed. MP4 is written
by diffusers' `export_to_video`, which uses imageio with imageio-ffmpeg when imageio is installed (the `video` extra)
and OpenCV otherwise; GIF by diffusers' `export_to_gif` (Pillow only).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from denoiser_client.options import DEFAULT_FPS, IMAGE_FORMATS
from shared.atomic_files import write_atomically, write_folder_atomically, write_path_atomically

VIDEO_HINT = "pip install 'promptcast[video]' for imageio and imageio-ffmpeg"
FRAMES_SUFFIX = "_frames"


def mp4_encoder() -> str | None:
    """What `diffusers.utils.export_to_video` would write MP4 with here: "imageio" (with imageio-ffmpeg's ffmpeg),
    "opencv", or None. diffusers takes imageio whenever it is importable, and then fails without imageio-ffmpeg
    rather than falling back to OpenCV, so imageio alone counts as none."""
    from diffusers.utils.import_utils import is_imageio_available, is_opencv_available

    if is_imageio_available():
        return "imageio" if importlib.util.find_spec("imageio_ffmpeg") is not None else None
    return "opencv" if is_opencv_available() else None


def frames_folder(path: str | os.PathLike) -> Path:
    """Where a video's frames go when no MP4 encoder is installed: `NAME_frames/` next to `NAME.mp4`."""
    path = Path(path)
    return path.with_name(path.stem + FRAMES_SUFFIX)


def no_mp4_note(what: str) -> str:
    """The one line that says frames were written instead of an MP4."""
    return f"no MP4 encoder is installed ({VIDEO_HINT}): {what}"


def save_image(image, out: str | os.PathLike) -> Path:
    """Save a PIL image so that `out` is never a partial image (temp file, fsync, rename)."""
    out = Path(out)
    image_format = IMAGE_FORMATS.get(out.suffix.lower(), "PNG")
    return write_atomically(out, lambda f: image.save(f, format=image_format))


def save_video(frames: list, out: str | os.PathLike, fps: int | None = None) -> tuple[Path, str | None]:
    r"""
    Write a video's frames to `out`, atomically.

    Args:
        frames (`list[PIL.Image.Image]`): the frames, in order.
        out (`str` or `os.PathLike`): a `.mp4` or `.gif` path.
        fps (`int`, *optional*, defaults to 16): frames a second.

    Returns:
        `(path written, note)`: `out` and None; or, for an MP4 with no MP4 encoder installed, the frames folder
        (`NAME_frames/00000.png`, ...) and one line saying so.
    """
    from diffusers.utils import export_to_gif, export_to_video

    out, fps = Path(out), fps or DEFAULT_FPS
    if out.suffix.lower() == ".gif":
        return write_path_atomically(out, lambda tmp: export_to_gif(frames, str(tmp), fps=fps)), None
    if mp4_encoder() is not None:
        return write_path_atomically(out, lambda tmp: export_to_video(frames, str(tmp), fps=fps)), None
    folder = frames_folder(out)
    write_folder_atomically(folder, lambda tmp: [frame.save(tmp / f"{i:05d}.png", format="PNG")
                                                 for i, frame in enumerate(frames)])
    return folder, no_mp4_note(f"wrote the {len(frames)} frames as PNG files to {folder}/ instead of {out}")


def save_output(result, out: str | os.PathLike, media: str = "image", fps: int | None = None
                ) -> tuple[Path, str | None]:
    """One pipeline result (a PIL image, or a list of frames for `media="video"`) saved at `out`: `(path, note)`."""
    if media == "video":
        return save_video(result, out, fps)
    return save_image(result, out), None
