"""The `promptcast` command. Logging is set up before anything heavy is imported; every
promptcast error ends as one line on stderr and a non-zero exit code, never a traceback."""

from __future__ import annotations

import logging
import os
import sys

import typer

from denoiser_client import cache_cli, precompute
from denoiser_client import cli as node
from encoder_server import cli as server

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Serve text encoders on a big GPU box; denoise on small ones.")
app.command("serve")(server.serve)
app.command("models")(node.models)
app.command("generate")(node.generate)
app.command("batch")(node.batch)
app.command("demo")(node.demo)
app.command("make-tiny-model")(node.make_tiny_model)
app.command("encode")(precompute.encode)
app.add_typer(cache_cli.app, name="cache")


def _setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("PROMPTCAST_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    _setup_logging()
    from denoiser_client.errors import PromptcastError
    from encoder_server.errors import EncoderServerError

    try:
        app()
    except (PromptcastError, EncoderServerError, ValueError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2 if isinstance(e, ValueError) else 1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
