"""The `promptcast` command: the front door above the encoder server and the denoiser node.

Logging is set up before anything heavy is imported, and no command module imports torch or grpc at import time,
so `promptcast --help` stays fast. Every failure ends as one `error: ...` line on stderr and a non-zero exit code
(2 for a bad argument, 1 for anything else), never a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from denoiser_client import cli as node
from denoiser_client import precompute
from denoiser_client.ui import command as ui_command
from encoder_server import cli as server
from promptcast import cache_cli

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Serve text encoders on a big GPU box; denoise on small ones.")
app.command("serve")(server.serve)
app.command("models")(node.models)
app.command("generate")(node.generate)
app.command("batch")(node.batch)
app.command("encode")(precompute.encode)
app.command("ui")(ui_command.ui)
app.add_typer(cache_cli.app, name="cache")


@app.command("demo")
def demo(out: Annotated[Optional[Path], typer.Option(help="Where to save the image (default: promptcast-demo.png; "
                                                    "a video family's: promptcast-demo.mp4).")] = None,
         prompt: str = "a red fox sitting in a snowy forest at dusk",
         family: Annotated[str, typer.Option(help="A model family: flux1, flux2, flux2-klein, sd3, qwen-image, "
                                                  "z-image, wan.")] = "flux1",
         device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N: where both sides run.")] = "cpu"):
    """Offline end-to-end demo: tiny model, local encoder server, one image (wan: a tiny video) through gRPC."""
    from denoiser_client.options import check_output_path
    from promptcast.demo import default_out, run_demo
    from shared.config import resolve_device
    from shared.families import FAMILIES

    _check_family(family)
    out = out or Path(default_out(family))
    check_output_path(out, FAMILIES[family].media)
    run_demo(str(out), prompt, family, device=resolve_device(device), echo=typer.echo)


@app.command("make-tiny-model")
def make_tiny_model(path: Path,
                    family: Annotated[str, typer.Option(help="A model family: flux1, flux2, flux2-klein, sd3, "
                                                                 "qwen-image, z-image, wan.")] = "flux1",
                    seed: int = 0, overwrite: bool = False):
    """Write a complete small diffusers folder (real classes, random weights, local tokenizers)."""
    _check_family(family)
    from promptcast.tiny_models import make_tiny_model as make

    typer.echo(make(path, family, seed=seed, overwrite=overwrite))


def _check_family(family: str) -> None:
    from shared.families import FAMILIES

    if family not in FAMILIES:
        raise ValueError(f"--family {family!r} is not one of {', '.join(FAMILIES)}")


def _setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("PROMPTCAST_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "filelock", "uvicorn.error"):  # uvicorn: "Started server process" and the like
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _expected(error: BaseException) -> bool:
    """Errors promptcast raises on purpose (their message is the whole story). Imported only once one happened."""
    from denoiser_client.errors import PromptcastError
    from encoder_server.errors import EncoderServerError

    return isinstance(error, (PromptcastError, EncoderServerError, ValueError, OSError))


def main(argv: list[str] | None = None) -> None:
    _setup_logging()
    try:
        code = app(args=argv, standalone_mode=False)
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.TyperException as e:  # a usage error: unknown option, a value of the wrong type
        ctx = getattr(e, "ctx", None)
        command = ctx.command_path if ctx is not None else "promptcast"
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        typer.echo(f"error: {message} (see `{command} --help`)", err=True)
        sys.exit(getattr(e, "exit_code", 2))
    except Exception as e:  # noqa: BLE001 - nothing reaches a person as a traceback
        if not _expected(e):
            logging.getLogger("promptcast").debug("unexpected error", exc_info=e)
            typer.echo(f"error: unexpected {type(e).__name__}: {e} (set PROMPTCAST_LOG_LEVEL=DEBUG to see where it "
                       "came from)", err=True)
            sys.exit(1)
        typer.echo(f"error: {e}", err=True)
        sys.exit(2 if isinstance(e, ValueError) else 1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
