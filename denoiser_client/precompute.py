"""`promptcast encode`: precompute embeddings for a job file (or a dataset's captions) and export them for plain
diffusers and training loops.

Every prompt becomes one safetensors file whose tensor names are the diffusers call's own arguments, as the
pipeline takes them for one prompt (batch dimension 1, at the prompt's own length: Qwen-Image's `prompt_embeds`
unpadded, with its all-ones `prompt_embeds_mask`), so no promptcast code is needed to use it:

    tensors = safetensors.torch.load_file("out/<name>.safetensors")
    image = pipe(**tensors, num_inference_steps=28).images[0]

safetensors holds tensors, not lists: Z-Image's `prompt_embeds` (a list of `(L, D)` tensors in its call) is stored
as `(1, L, D)`, and `list()` gives the list back, `pipe(**{k: list(v) for k, v in tensors.items()})`; the file's
`collate` metadata names such outputs.

Encoding through the server also warms its cache tiers: a second run (another epoch's export, another
machine) is answered from them, which each row of `index.jsonl` says (`cache_status`). Files are named by
the prompt's cache key and written atomically, so a rerun skips prompts already exported. `index.jsonl`
(one line per job, with its line number and, for a dataset's `metadata.jsonl`, its `file_name`) and
`index.json` (prompt -> file) list them. A bad line (not UTF-8, not JSON, no prompt) is reported by its
number and the others are exported; a call the server refuses for one of its prompts is retried prompt by
prompt, so that prompt alone fails; a server that stops answering stops the run, and what was encoded is
still written.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from denoiser_client.cli import EncoderOpt, TimeoutOpt, TlsCaOpt, TlsCertOpt, TlsKeyOpt, TokenOpt, _client

logger = logging.getLogger(__name__)

# A dataset's `metadata.jsonl` (Hugging Face imagefolder) names its caption `text` or `caption`, beside `file_name`.
CAPTION_FIELDS = ("text", "caption")


@dataclass
class Job:
    line: int  # 1-based line of the input file; 0 for --prompt
    prompt: str
    prompt_2: str | None = None
    negative_prompt: str | None = None
    file_name: str | None = None  # the image a dataset's caption belongs to


class JobError(ValueError):
    pass


def parse_job(line_no: int, text: str) -> Job:
    """`{"prompt": ..., "prompt_2"?, "negative_prompt"?}`, DataFlow `{"conversations": [...]}` (last user turn), or a
    dataset's `{"file_name": ..., "text" | "caption": ...}`."""
    try:
        record = json.loads(text)
    except ValueError as e:
        raise JobError(f"line {line_no}: not JSON ({e})") from None
    if not isinstance(record, dict):
        raise JobError(f"line {line_no}: expected a JSON object, got {type(record).__name__}")
    from denoiser_client.jobs import prompt_of

    caption = next((f for f in CAPTION_FIELDS if isinstance(record.get(f), str)), None)
    if caption and "prompt" not in record and "conversations" not in record:
        record = {**record, "prompt": record[caption]}
    try:
        prompt = prompt_of(record)  # the same rules as `promptcast batch`, so exported keys match its requests
    except ValueError as e:
        raise JobError(f"line {line_no}: no prompt: {e}") from None
    extra = {}
    for field in ("prompt_2", "negative_prompt", "file_name"):
        value = record.get(field)
        if value is not None and not isinstance(value, str):
            raise JobError(f"line {line_no}: {field} must be a string, got {type(value).__name__}")
        extra[field] = value
    return Job(line_no, prompt, **extra)


def read_jobs(path: Path) -> tuple[list[Job], list[str]]:
    """The jobs of a JSONL file and one error message per bad line (blank lines are skipped). Each line is decoded
    on its own, so one that is not UTF-8 is reported by number and the rest still run."""
    jobs, problems = [], []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8").removeprefix("\ufeff" if line_no == 1 else "")
            except UnicodeDecodeError as e:
                problems.append(f"line {line_no}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                "save the file as UTF-8")
                continue
            if not text.strip():
                continue
            try:
                jobs.append(parse_job(line_no, text))
            except JobError as e:
                problems.append(str(e))
    return jobs, problems


def encode_texts(client, info, texts: list[tuple[str, str | None]], length: int, batch_size: int
                 ) -> tuple[dict, dict[tuple, str], str | None]:
    """Encode `(prompt, prompt_2)` pairs in calls of `batch_size`: (results by pair, failure reason by pair, why the
    run stopped or None)."""
    from denoiser_client import errors  # grpc: not on `promptcast --help`'s path

    # Errors one prompt can cause (too long, NaN/Inf in its embedding): its call is retried prompt by prompt. Errors
    # every later call would get too stop the run.
    per_prompt = (errors.InvalidArgument, errors.EncodeError)
    stopping = (errors.ServerUnavailable, errors.Unauthenticated)
    done, failed = {}, {}
    for with_2 in (False, True):
        group = [t for t in texts if (t[1] is not None) == with_2]
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            try:
                try:
                    done.update(_encode(client, info, chunk, with_2, length))
                except per_prompt as e:  # one prompt may be the cause: the others must not fail with it
                    if len(chunk) == 1:
                        raise
                    logger.info("a call of %d prompts was refused (%s); retrying them one by one", len(chunk), e)
                    for text in chunk:
                        try:
                            done.update(_encode(client, info, [text], with_2, length))
                        except per_prompt as single:
                            failed[text] = str(single)
            except stopping as e:
                return done, failed, str(e)
            except errors.PromptcastError as e:  # overloaded, deadline...: this call's prompts fail, the next may pass
                failed.update({text: str(e) for text in chunk if text not in done})
    return done, failed, None


def _encode(client, info, chunk, with_2: bool, length: int) -> dict:
    from shared.collate import rows_of

    prompts_2 = [p2 for _, p2 in chunk] if with_2 else None
    tensors, call = client.encode([p for p, _ in chunk], info.name, prompt_2=prompts_2, max_sequence_length=length,
                                  with_info=True, collated=False)
    return {text: {"key": call.cache_keys[i], "status": call.cache_status[i], "tensors": row}
            for i, (text, row) in enumerate(zip(chunk, rows_of(tensors)))}


def one_prompt_call(row: dict, layouts: dict, prefix: str = "") -> dict:
    """One prompt's tensors as the pipeline takes them for one prompt, each its own tensor (a list output's one
    tensor as `(1, L, D)`: safetensors holds no lists)."""
    import torch

    from shared.collate import batch_of, collate

    call = collate(batch_of([row]), layouts, prefix=prefix)
    return {name: torch.stack(value) if isinstance(value, list) else value for name, value in call.items()}


def export(client, jobs: list[Job], out: Path, *, model: str | None = None, max_sequence_length: int | None = None,
           batch_size: int = 16, echo=print) -> tuple[list[dict], list[str]]:
    """Encode `jobs` on the server and write one file per job into `out`; returns (index rows, problems)."""
    from safetensors.torch import save

    from denoiser_client import errors
    from shared.atomic_files import write_atomically

    info = client.model_info(model)
    length = max_sequence_length or info.default_max_sequence_length
    if not 1 <= length <= info.max_max_sequence_length:  # refused for every prompt alike: say so once
        raise errors.InvalidArgument(f"--max-sequence-length {length} is outside 1-{info.max_max_sequence_length}, "
                                     f"the range of model {info.name!r}")
    out.mkdir(parents=True, exist_ok=True)
    batch_size = max(1, min(batch_size, info.max_prompts_per_call or batch_size))

    # Unique texts to encode (one request sends prompt_2 for all its prompts or for none).
    wanted: dict[tuple[str, str | None], None] = {}
    for job in jobs:
        wanted.setdefault((job.prompt, job.prompt_2))
        if job.negative_prompt is not None:
            wanted.setdefault((job.negative_prompt, None))
    encoded, failed, stopped = encode_texts(client, info, list(wanted), length, batch_size)
    problems: list[str] = []
    if stopped:
        problems.append(f"stopped after {len(encoded)} of {len(wanted)} prompts: {stopped}")

    rows = []
    for job in jobs:
        texts = [(job.prompt, job.prompt_2)]
        if job.negative_prompt is not None:
            texts.append((job.negative_prompt, None))
        missing = [t for t in texts if t not in encoded]
        if missing:
            reason = failed.get(missing[0], "the server stopped answering before it was sent")
            problems.append(f"line {job.line}: not exported: {reason}")
            continue
        positive = encoded[texts[0]]
        negative = encoded[texts[1]] if len(texts) > 1 else None
        tensors = one_prompt_call(positive["tensors"], info.layouts)
        key = positive["key"]
        if negative is not None:  # batched apart: a prompt is never padded to its negative's length
            tensors.update(one_prompt_call(negative["tensors"], info.layouts, prefix="negative_"))
            key = hashlib.sha256(f"{key}:{negative['key']}".encode()).hexdigest()
        name = f"{key}.safetensors"
        metadata = {"prompt": job.prompt, "prompt_2": job.prompt_2 or "", "negative_prompt": job.negative_prompt or "",
                    "model": info.name, "family": info.family, "fingerprint": info.fingerprint,
                    "max_sequence_length": str(length), "cache_key": key,
                    "collate": json.dumps({o.name: o.layout.collate for o in info.outputs}, sort_keys=True)}
        if not (out / name).exists():
            write_atomically(out / name, save({k: t.contiguous() for k, t in tensors.items()}, metadata))
        rows.append({"line": job.line, "prompt": job.prompt, "prompt_2": job.prompt_2,
                     "negative_prompt": job.negative_prompt, "file": name, "cache_key": key,
                     "cache_status": positive["status"],
                     "shapes": {k: list(t.shape) for k, t in tensors.items()},
                     "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch."),
                     **({"file_name": job.file_name} if job.file_name is not None else {})})
    write_atomically(out / "index.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    write_atomically(out / "index.json", json.dumps({r["prompt"]: r["file"] for r in rows}, ensure_ascii=False,
                                                    indent=1, sort_keys=True).encode())
    statuses = Counter(r["cache_status"] for r in rows)
    cache = ", ".join(f"{status} {n}" for status, n in sorted(statuses.items())) or "-"
    echo(f"{len(rows)} prompts exported to {out} (model {info.name}, max_sequence_length {length}; cache {cache})")
    return rows, problems


def encode(
    encoder: EncoderOpt,
    out: Annotated[Path, typer.Option(help="Folder for one safetensors file per prompt plus index.jsonl/index.json.")],
    input: Annotated[Optional[Path], typer.Argument(help="Job file: JSONL lines {\"prompt\": ...} (optional prompt_2, "
                                                    "negative_prompt), DataFlow {\"conversations\": [...]}, or a "
                                                    "dataset's metadata.jsonl {\"file_name\", \"text\"}.")
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
