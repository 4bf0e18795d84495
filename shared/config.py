"""Small parsers and checks shared by the commands of both sides: sizes, devices, dtypes, ports, the cache home."""

from __future__ import annotations

import errno
import os
import re
import socket
from pathlib import Path

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")
DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")
# Where bitsandbytes comes from, for every message that asks for it (`pip install -e ".[quant]"` pins the same).
BITSANDBYTES_HINT = "pip install 'bitsandbytes>=0.50.2' (or the [quant] extra)"


def cache_home() -> Path:
    """`$XDG_CACHE_HOME/promptcast`, or `~/.cache/promptcast` when it is unset or empty (as the XDG spec says)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "promptcast"


def parse_bytes(text: str) -> int:
    """'2GiB' -> 2147483648; '512MB' -> 512000000; '0' -> 0."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a size: use a number with an optional unit such as 512MiB or 2GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def resolve_device(device: str, option: str = "--device") -> str:
    """`auto` -> cuda when available, else cpu. Any other value is checked: a CUDA device must exist here."""
    if not _DEVICE.match(device or ""):
        raise ValueError(f"{option} {device!r} is not a device: use auto, cpu, cuda or cuda:N")
    if device == "cpu":
        return device
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{option} mps: this machine has no Apple GPU (MPS); use {option} cpu")
        return device
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"{option} {device}: {why} (torch {torch.__version__}); use {option} cpu, or install a "
                         "CUDA build of torch on a machine with an NVIDIA GPU")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ValueError(f"{option} {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"numbered from 0; use {option} cuda:0")
    return device


def parse_dtype(name: str, device: str):
    """auto (bf16 on CUDA, fp32 elsewhere), bf16, fp16, fp32 -> torch dtype."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    dtypes = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
              "fp16": torch.float16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"--dtype {name!r} is not one of {', '.join(DTYPE_CHOICES)}")
    return dtypes[name]


def check_dtype(name: str) -> str:
    """Check a --dtype value without importing torch."""
    if name not in DTYPE_CHOICES + ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype {name!r} is not one of {', '.join(DTYPE_CHOICES)}")
    return name


def check_port(port: int | None, option: str = "--port", allow_zero: bool = True) -> int | None:
    """A TCP port number: 0 (pick a free one) to 65535."""
    if port is not None and not (0 if allow_zero else 1) <= port <= 65535:
        raise ValueError(f"{option} {port} is not a port: use {'0 (a free one) to' if allow_zero else '1 to'} 65535")
    return port


def check_port_free(host: str, port: int | None, option: str = "--port") -> None:
    """Refuse a port another process listens on, before any model loads (0 and None pick one later)."""
    if not port:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC and uvicorn bind
        try:
            probe.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise OSError(f"{option} {port}: {host}:{port} is already in use (another server?); stop it, pick "
                              f"another {option}, or use {option} 0 for a free one") from None
            if e.errno in (errno.EACCES, errno.EPERM):
                raise OSError(f"{option} {port}: not allowed to listen on {host}:{port} (ports below 1024 need "
                              f"root); pick another {option}") from None
            if e.errno == errno.EADDRNOTAVAIL or isinstance(e, socket.gaierror):
                raise OSError(f"--host {host!r} is not an address of this machine") from None
            raise
