"""`promptcast cache stats|verify|clear`: inspect, check and empty a disk cache (a server's `--cache-dir`
or a node's `--cache-dir`; both hold the same verified safetensors entries)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Inspect, verify or empty an embedding cache.")

CacheDirOpt = Annotated[Optional[Path], typer.Option(help="The cache folder (default: $XDG_CACHE_HOME/promptcast/"
                                                     "embeddings, the server's default).")]


def _tier(cache_dir: Path | None):
    from shared.disk_cache import DiskTier, default_cache_dir

    directory = cache_dir or default_cache_dir()
    if not directory.is_dir():
        raise typer.BadParameter(f"{directory} is not a folder", param_hint="--cache-dir")
    # No byte bound here: inspecting a cache must never evict from it.
    return DiskTier(directory, max_bytes=1 << 62)


def _when(timestamp: float | None) -> str:
    return "-" if timestamp is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


@app.command()
def stats(cache_dir: CacheDirOpt = None,
          as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False):
    """Entries, bytes and access times of a cache folder."""
    info = _tier(cache_dir).stats()
    info.pop("max_bytes")
    if as_json:
        typer.echo(json.dumps(info))
        return
    typer.echo(f"{info['directory']}\n{info['entries']} entries, {info['bytes']:,} bytes "
               f"({info['bytes'] / 2**20:.1f} MiB)\nleast recently used: {_when(info['oldest_access'])}\n"
               f"most recently used: {_when(info['newest_access'])}\nunfinished writes: {info['temp_files']}")


@app.command()
def verify(cache_dir: CacheDirOpt = None,
           delete: Annotated[bool, typer.Option("--delete", help="Delete the bad entries found.")] = False):
    """Read every entry and check its key, tensor names, dtypes, shapes and checksums; exit 1 if any is bad."""
    checked, problems = _tier(cache_dir).verify(delete=delete)
    for problem in problems:
        typer.echo(f"BAD {problem.path}: {problem.reason}{' (deleted)' if delete else ''}")
    typer.echo(f"{checked} entries checked, {len(problems)} bad")
    if problems:
        if not delete:
            typer.echo("servers treat bad entries as misses and rewrite them; --delete removes them now", err=True)
        raise typer.Exit(1)


@app.command()
def clear(cache_dir: CacheDirOpt = None):
    """Delete every entry (and unfinished write) in the cache folder."""
    removed, freed = _tier(cache_dir).clear()
    typer.echo(f"removed {removed} files, {freed:,} bytes")
