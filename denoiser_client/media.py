"""What a node writes: an image, or a video's frames as MP4, GIF or, with no MP4 encoder installed, numbered PNGs.

Every output is complete or absent at its final path (`shared.atomic_files`): a video is written to a temp file with
its suffix (encoders pick the format by it) and renamed; frames go to a temp folder that is renamed. MP4 is written
with imageio-ffmpeg's ffmpeg when imageio is installed (the `video` extra; the same libx264 settings as diffusers'
`export_to_video`), else by `export_to_video` through OpenCV; GIF by diffusers' `export_to_gif` (Pillow only).

ffmpeg is started with `posix_spawn`, not `fork`: a node has gRPC threads running (a channel, or in the demo a whole
server), and a fork while they call into gRPC skips gRPC's fork handlers and can leave its poller with closed
descriptors (seen as ffmpeg's "Broken pipe" and gRPC's "epoll_wait error: Bad file descriptor"). So the frames are
written as PNGs first and ffmpeg reads them, instead of a pipe from a forked child.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import tempfile
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
    encoder = mp4_encoder()
    if encoder == "imageio":
        return write_path_atomically(out, lambda tmp: _ffmpeg_mp4(frames, tmp, fps)), None
    if encoder is not None:
        return write_path_atomically(out, lambda tmp: export_to_video(frames, str(tmp), fps=fps)), None
    folder = frames_folder(out)
    write_folder_atomically(folder, lambda tmp: [frame.save(tmp / f"{i:05d}.png", format="PNG")
                                                 for i, frame in enumerate(frames)])
    return folder, no_mp4_note(f"wrote the {len(frames)} frames as PNG files to {folder}/ instead of {out}")


def _ffmpeg_mp4(frames: list, out: Path, fps: int) -> None:
    """H.264 MP4 of `frames` with imageio-ffmpeg's ffmpeg, as `export_to_video` writes it (libx264, yuv420p, crf 25),
    from PNG frames (ffmpeg started with posix_spawn: no fork; see the module docstring)."""
    import imageio_ffmpeg

    with tempfile.TemporaryDirectory(prefix="promptcast-frames-") as folder:
        for i, frame in enumerate(frames):
            frame.convert("RGB").save(Path(folder) / f"{i:05d}.png", format="PNG")
        command = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-framerate", str(fps), "-i",
                   str(Path(folder) / "%05d.png"), "-an", "-vcodec", "libx264", "-pix_fmt", "yuv420p", "-crf", "25",
                   "-f", "mp4", str(out)]
        # close_fds=False (and no preexec_fn or cwd) is what lets subprocess use posix_spawn instead of fork.
        done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, close_fds=False)
    if done.returncode != 0:
        raise OSError(f"ffmpeg could not write {out.name}: {done.stderr.decode(errors='replace').strip()[-500:]}")


def save_output(result, out: str | os.PathLike, media: str = "image", fps: int | None = None
                ) -> tuple[Path, str | None]:
    """One pipeline result (a PIL image, or a list of frames for `media="video"`) saved at `out`: `(path, note)`."""
    if media == "video":
        return save_video(result, out, fps)
    return save_image(result, out), None
