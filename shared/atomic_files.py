"""Files that are complete or absent: the one way promptcast writes images, videos, cache entries and exports.

Write to a temp file in the same folder, fsync, rename over the final path, fsync the folder. A crash at
any moment leaves either the old file or the new one, never a torn one at the final path; the temp file
(`.NAME.*.tmp`, `.NAME.*.tmp.SUFFIX` for writers that need the suffix) is removed on error and is easy to sweep
after a `kill -9`. A folder of files (a video's frames) is filled under a temp name and renamed the same way.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

_UMASK = os.umask(0o022)
os.umask(_UMASK)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in `path` durable. Some filesystems cannot fsync a folder; the rename stays atomic."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], None]) -> Path:
    """Write `data` (bytes, or a function that writes to the open file) to `path` all at once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:40]}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; these files are for sharing like any other
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_path_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Like `write_atomically`, for writers that take a path and pick the format by its suffix (video encoders): the
    temp file (`.NAME.*.tmp.SUFFIX`) keeps `path`'s suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:40]}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_folder_atomically(path: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """A folder that is complete or absent: `fill` writes into a temp folder (`.NAME.*.tmp`), whose files are fsynced
    and which is then renamed to `path`. A folder already at `path` is moved aside first (put back if the rename
    fails) and removed after, so `path` never holds a mix of old and new files."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name[:40]}.", suffix=".tmp"))
    aside = None
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)
        fill(tmp)
        for file in tmp.iterdir():
            _fsync_file(file)
        fsync_dir(tmp)
        if path.exists():
            aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name[:40]}.", suffix=".tmp")) / path.name
            os.replace(path, aside)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None and not path.exists():
            os.replace(aside, path)
        raise
    finally:
        if aside is not None:
            shutil.rmtree(aside.parent, ignore_errors=True)
    fsync_dir(path.parent)
    return path


def _fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
