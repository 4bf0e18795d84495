"""`promptcast demo`: the whole split on one machine, offline, in a few seconds (a tiny video for wan)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def _quiet() -> None:
    """The demo prints its own report: keep library logs and progress bars out of it."""
    import logging

    import diffusers
    import transformers

    for name in ("encoder_server", "denoiser_client"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()


def default_out(family: str) -> str:
    """`promptcast-demo.png`, or `promptcast-demo.mp4` for a video family."""
    from shared.families import FAMILIES

    return "promptcast-demo.mp4" if FAMILIES[family].media == "video" else "promptcast-demo.png"


def run_demo(out: str | None = None, prompt: str = "a red fox sitting in a snowy forest at dusk",
             family: str = "flux1", seed: int = 0, device: str = "cpu", echo=print) -> Path:
    """Build (or reuse) a tiny model, serve its text encoders on a free local port, generate one
    image (a video family: 5 frames) through gRPC on the denoiser side and report where the time and bytes went."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _quiet()
    from denoiser_client.generate import generate
    from denoiser_client.options import GenerateOptions
    from denoiser_client.remote import RemoteTextEncoder
    from encoder_server.server import BackgroundServer, ModelSpec, ServerConfig
    from promptcast.tiny_models import make_tiny_model
    from shared.config import cache_home, parse_dtype
    from shared.families import FAMILIES

    out = out or default_out(family)
    video = FAMILIES[family].media == "video"
    started = time.perf_counter()
    model_dir = make_tiny_model(cache_home() / f"tiny-{family}", family)
    echo(f"tiny {family} model: {model_dir}")
    # A worker thread even on CUDA: a process of its own pays for another interpreter and CUDA context at start-up,
    # and buys throughput under load, which one image never puts on it.
    config = ServerConfig([ModelSpec(str(model_dir), name=f"tiny-{family}")], port=0, device=device, worker="thread")
    with BackgroundServer(config) as server:
        echo(f"encoder server: {server.address} (text encoders only)")
        with RemoteTextEncoder(server.address, timeout=120) as encoder:
            options = GenerateOptions(seed=seed, steps=4, width=64, height=64, num_frames=5 if video else None)
            path, t = generate(encoder, str(model_dir), prompt, out, options=options, device=device,
                               dtype=parse_dtype("auto", device), progress=False, echo=echo)
    echo(f"{'video' if video else 'image'}: {path.resolve()}")
    echo(f"encode {t.encode * 1000:.1f} ms | transfer {t.transfer * 1000:.1f} ms | denoise {t.denoise * 1000:.1f} ms"
         f" | decode {t.decode * 1000:.1f} ms | {t.wire_bytes:,} embedding bytes over gRPC"
         f" | total {time.perf_counter() - started:.1f} s")
    return path
