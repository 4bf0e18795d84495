"""`promptcast ui`: parse and check everything (node options, styles, every LoRA path, the port, Gradio being
installed), then load the node once and serve the console until interrupted."""

from __future__ import annotations

import importlib.util
import socket
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer

from denoiser_client.cli import (CacheDirOpt, DeviceOpt, DtypeOpt, EncoderOpt, OffloadOpt, QuantizeOpt, TimeoutOpt,
                                 TlsCaOpt, TlsCertOpt, TlsKeyOpt, TokenOpt, VaeTilingOpt, VramBudgetOpt, VramOpt,
                                 _client, _echo_err, check_node_options)

GRADIO_HINT = "pip install 'promptcast[ui]' (in a checkout: pip install -e '.[ui]')"


def check_gradio() -> None:
    """Gradio is an optional extra: say how to install it, before anything loads."""
    if importlib.util.find_spec("gradio") is None:
        raise ValueError(f"promptcast ui needs Gradio, which is not installed: {GRADIO_HINT}")


def check_listen_address(host: str, port: int) -> None:
    """`host:port` can be listened on now (port 0: any free port)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port} must be from 0 to 65535 (0: a free port)")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r} is not an address of this machine ({e.strerror}): use 127.0.0.1, or "
                         "0.0.0.0 to listen on every interface") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port just freed (TIME_WAIT) is usable
        try:
            probe.bind(address)
        except OSError as e:
            raise ValueError(f"--port {port} cannot be used on {host} ({e.strerror}): pick another port, or --port 0 "
                             "for a free one") from None


def check_out_dir(out_dir: Path | None) -> Path:
    """The folder images (or videos) are saved in (created if missing); a new temporary folder by default."""
    if out_dir is None:
        return Path(tempfile.mkdtemp(prefix="promptcast-ui-"))
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out-dir {str(out_dir)!r} is a file: pass a folder (it is created if missing)")
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def ui(
    encoder: EncoderOpt,
    model: Annotated[str, typer.Option("--model", "-m", help="Hub repo id or local diffusers folder (transformer + VAE "
                                       "are loaded; text encoders never).")],
    encoder_model: Annotated[Optional[str], typer.Option(help="Model name on the server (default: its only model, "
                                                         "else the one named like --model's last part).")] = None,
    styles: Annotated[Optional[Path], typer.Option(help='Styles file: {"styles": [{"name", "loras": [{"path", '
                                                   '"weight"}], "prompt": "{prompt}, ...", "negative_prompt"}]}; '
                                                   "paths are relative to the file.")] = None,
    lora_dir: Annotated[Optional[Path], typer.Option(help="Add one style per .safetensors LoRA in this folder (its "
                                                     "file name, weight 1.0).")] = None,
    host: Annotated[str, typer.Option(help="Address to serve the page on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the page (0: a free one).")] = 7860,
    out_dir: Annotated[Optional[Path], typer.Option(help="Folder for the images, or a video model's videos "
                                                    "(default: a new temporary folder).")] = None,
    device: DeviceOpt = "auto", dtype: DtypeOpt = "auto", vram: VramOpt = "auto", vram_budget: VramBudgetOpt = None,
    quantize: QuantizeOpt = None, offload: OffloadOpt = None, vae_tiling: VaeTilingOpt = False,
    token: TokenOpt = None, tls_ca: TlsCaOpt = None, tls_cert: TlsCertOpt = None, tls_key: TlsKeyOpt = None,
    timeout: TimeoutOpt = 120.0, cache_dir: CacheDirOpt = None,
):
    """Serve a web console on this node: prompt, LoRA styles switched without reloading, seed, steps, history."""
    check_gradio()
    setup = check_node_options(device, dtype, vram, vram_budget, quantize, offload, vae_tiling)
    from denoiser_client.ui.styles import load_styles

    style_list = load_styles(styles, lora_dir)  # every LoRA path checked before the model loads
    check_listen_address(host, port)
    images = check_out_dir(out_dir)
    from denoiser_client.node import DenoiserNode
    from denoiser_client.pipeline import family_of

    family_of(model)  # a model of no known family is refused before the encoder server is dialled

    def connect():
        return _client(encoder, token, tls_ca, timeout, tls_cert=tls_cert, tls_key=tls_key, cache_dir=cache_dir)

    client = connect()
    node = DenoiserNode.load(client, model, encoder_model=encoder_model, device=setup.device, dtype=setup.dtype,
                             vram="auto" if setup.explicit else setup.vram, vram_budget=setup.vram_budget,
                             explicit=setup.explicit, echo=_echo_err)
    from denoiser_client.ui.page import start_console

    page, console, url = start_console(node, client, style_list, out_dir=images, host=host, port=port,
                                       connect=connect)
    for problem in console.problems:
        _echo_err(f"warning: {problem}")
    saved = "videos" if console.facts.video else "images"
    typer.echo(f"promptcast ui: {url} (styles: {', '.join(console.style_names)}; {saved} in {images})")
    try:
        page.block_thread()
    finally:
        console.encoder.close()
