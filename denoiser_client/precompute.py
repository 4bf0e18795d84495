"""`promptcast encode`: precompute embeddings for a job file and export them for plain diffusers.

Every prompt becomes one safetensors file whose tensor names are the diffusers call's own arguments,
with the batch dimension of one prompt, so no promptcast code is needed to use it:

    tensors = safetensors.torch.load_file("out/<name>.safetensors")
    image = pipe(**tensors, num_inference_steps=28).images[0]

Encoding through the server also warms its cache tiers for the jobs that follow. Files are named by
the prompt's cache key and written atomically, so a rerun skips prompts already exported.
`index.jsonl` (one line per job, with its line number) and `index.json` (prompt -> file) list them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from denoiser_client.cli import EncoderOpt, TimeoutOpt, TlsCaOpt, TlsCertOpt, TlsKeyOpt, TokenOpt, _client

logger = logging.getLogger(__name__)


@dataclass
class Job:
    line: int  # 1-based line of the input file; 0 for --prompt
    prompt: str
    prompt_2: str | None = None
    negative_prompt: str | None = None


class JobError(ValueError):
    pass


def parse_job(line_no: int, text: str) -> Job:
    """`{"prompt": ..., "prompt_2"?, "negative_prompt"?}` or DataFlow `{"conversations": [...]}` (last user turn)."""
    try:
        record = json.loads(text)
    except ValueError as e:
        raise JobError(f"line {line_no}: not JSON ({e})") from None
    if not isinstance(record, dict):
        raise JobError(f"line {line_no}: expected a JSON object, got {type(record).__name__}")
    from denoiser_client.jobs import prompt_of

    try:
        prompt = prompt_of(record)  # the same rules as `promptcast batch`, so exported keys match its requests
    except ValueError as e:
        raise JobError(f"line {line_no}: no prompt: {e}") from None
    extra = {}
    for field in ("prompt_2", "negative_prompt"):
        value = record.get(field)
        if value is not None and not isinstance(value, str):
            raise JobError(f"line {line_no}: {field} must be a string, got {type(value).__name__}")
        extra[field] = value
    return Job(line_no, prompt, **extra)


def read_jobs(path: Path) -> tuple[list[Job], list[str]]:
    """The jobs of a JSONL file and one error message per bad line (blank lines are skipped)."""
    jobs, problems = [], []
    with open(path, encoding="utf-8") as f:
        for line_no, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                jobs.append(parse_job(line_no, text))
            except JobError as e:
                problems.append(str(e))
    return jobs, problems


def export(client, jobs: list[Job], out: Path, *, model: str | None = None, max_sequence_length: int | None = None,
           batch_size: int = 16, echo=print) -> tuple[list[dict], list[str]]:
    """Encode `jobs` on the server and write one file per job into `out`; returns (index rows, problems)."""
    from safetensors.torch import save

    from shared.atomic_files import write_atomically

    info = client.model_info(model)
    length = max_sequence_length or info.default_max_sequence_length
    out.mkdir(parents=True, exist_ok=True)
    batch_size = max(1, min(batch_size, info.max_prompts_per_call or batch_size))

    # Unique texts to encode, split by whether they carry a prompt_2 (one request sends both or neither).
    wanted: dict[tuple[str, str | None], dict] = {}
    for job in jobs:
        wanted.setdefault((job.prompt, job.prompt_2), {})
        if job.negative_prompt is not None:
            wanted.setdefault((job.negative_prompt, None), {})
    problems: list[str] = []
    for with_2 in (False, True):
        texts = [t for t in wanted if (t[1] is not None) == with_2]
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            try:
                tensors, call = client.encode([p for p, _ in chunk], info.name,
                                              prompt_2=[p2 for _, p2 in chunk] if with_2 else None,
                                              max_sequence_length=length, with_info=True)
            except Exception as e:  # noqa: BLE001 - one failed batch must not sink the others
                problems.append(f"{len(chunk)} prompts failed to encode: {e}")
                continue
            for i, text in enumerate(chunk):
                wanted[text] = {"key": call.cache_keys[i], "status": call.cache_status[i],
                                "tensors": {name: t[i:i + 1].clone() for name, t in tensors.items()}}

    rows = []
    for job in jobs:
        positive = wanted[(job.prompt, job.prompt_2)]
        negative = wanted[(job.negative_prompt, None)] if job.negative_prompt is not None else None
        if not positive or negative == {}:
            problems.append(f"line {job.line}: not exported (its encode failed)")
            continue
        tensors = dict(positive["tensors"])
        key = positive["key"]
        if negative is not None:
            tensors.update({f"negative_{name}": t for name, t in negative["tensors"].items()})
            key = hashlib.sha256(f"{key}:{negative['key']}".encode()).hexdigest()
        name = f"{key}.safetensors"
        metadata = {"prompt": job.prompt, "prompt_2": job.prompt_2 or "", "negative_prompt": job.negative_prompt or "",
                    "model": info.name, "family": info.family, "fingerprint": info.fingerprint,
                    "max_sequence_length": str(length), "cache_key": key}
        if not (out / name).exists():
            write_atomically(out / name, save({k: t.contiguous() for k, t in tensors.items()}, metadata))
        rows.append({"line": job.line, "prompt": job.prompt, "prompt_2": job.prompt_2,
                     "negative_prompt": job.negative_prompt, "file": name, "cache_key": key,
                     "cache_status": positive["status"],
                     "shapes": {k: list(t.shape) for k, t in tensors.items()},
                     "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch.")})
    write_atomically(out / "index.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    write_atomically(out / "index.json", json.dumps({r["prompt"]: r["file"] for r in rows}, ensure_ascii=False,
                                                    indent=1, sort_keys=True).encode())
    echo(f"{len(rows)} prompts exported to {out} (model {info.name}, max_sequence_length {length})")
    return rows, problems


def encode(
    encoder: EncoderOpt,
    out: Annotated[Path, typer.Option(help="Folder for one safetensors file per prompt plus index.jsonl/index.json.")],
    input: Annotated[Optional[Path], typer.Argument(help="Job file: JSONL lines {\"prompt\": ...} (optional prompt_2, "
                                                    "negative_prompt) or DataFlow {\"conversations\": [...]}.")
                     ] = None,
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", help="A prompt (repeatable), instead of or "
                                                        "besides INPUT.")] = None,
    encoder_model: Annotated[Optional[str], typer.Option(help="Model name on the server (default: its only model).")
                             ] = None,
    max_sequence_length: Annotated[Optional[int], typer.Option(help="Text tokens (default: the server model's).")
                                   ] = None,
    batch_size: Annotated[int, typer.Option(help="Prompts per server call.")] = 16,
    token: TokenOpt = None,
    tls_ca: TlsCaOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
    timeout: TimeoutOpt = 300.0,
):
    """Precompute embeddings (warming the server's cache) and export them as safetensors for plain diffusers."""
    if input is None and not prompt:
        raise typer.BadParameter("give a job file (INPUT.jsonl) or at least one --prompt", param_hint="INPUT")
    jobs, problems = [Job(0, p) for p in prompt or []], []
    if input is not None:
        if not input.is_file():
            raise typer.BadParameter(f"{input} is not a file", param_hint="INPUT")
        file_jobs, problems = read_jobs(input)
        jobs += file_jobs
    for problem in problems:
        typer.echo(f"{input}: {problem}", err=True)
    if jobs:
        with _client(encoder, token, tls_ca, timeout, tls_cert=tls_cert, tls_key=tls_key) as client:
            _, failed = export(client, jobs, out, model=encoder_model, max_sequence_length=max_sequence_length,
                               batch_size=batch_size, echo=typer.echo)
        for problem in failed:
            typer.echo(f"error: {problem}", err=True)
        problems += failed
    if problems:
        typer.echo(f"{len(problems)} problem(s); the other prompts were exported", err=True)
        raise typer.Exit(1)
