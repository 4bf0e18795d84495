"""`promptcast batch`: a job file through one denoiser node, resumable after any crash.

Crash safety: each image goes to a temp file, is fsynced and renamed to its final path, and only then is its line
appended (one `write`, then fsync) to DIR/results.jsonl. A rerun reads the finished keys (a torn last line is cut
off) and does the rest, so `kill -9` at any moment loses at most the items in progress, never leaves a partial
image at a final path and never produces an item twice.

The node never waits for the encoder: a background thread requests the embeddings of the next `prefetch` items
while the current ones denoise, and a prompt that appears several times is encoded once.
"""

from __future__ import annotations

import fcntl
import inspect
import json
import logging
import os
import sys
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from denoiser_client.errors import InvalidArgument, PromptcastError
from denoiser_client.generate import save_atomically
from denoiser_client.jobs import JobDefaults, JobItem, read_job_file
from denoiser_client.lora import LoraAdapters, order_for_few_switches
from denoiser_client.pipeline import load_reference_images, negative_prompt_for
from shared.families import PIPELINE_FAMILIES

logger = logging.getLogger(__name__)

RESULTS = "results.jsonl"
IMAGES = "images"


@dataclass
class BatchOptions:
    batch_size: int = 1
    prefetch: int = 4
    strict: bool = False
    shard: tuple[int, int] = (0, 1)
    max_sequence_length: int | None = None
    progress: bool = True


@dataclass
class Summary:
    done: int = 0
    skipped: int = 0  # finished by an earlier run, or the same key earlier in this file
    failed: list[tuple[int, str]] = field(default_factory=list)  # (line, reason): bad lines and failed items
    cache_hits: int = 0  # embeddings reused in this run + answered from the server's cache
    encoded: int = 0  # distinct texts requested from the encoder
    lora_switches: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def lines(self) -> list[str]:
        rate = self.done / self.seconds if self.seconds else 0.0
        out = [f"done {self.done}, skipped {self.skipped}, failed {len(self.failed)}, cache hits {self.cache_hits} "
               f"({self.encoded} texts encoded), {self.seconds:.1f}s, {rate:.2f} items/s"]
        out += [f"  failed line {line}: {reason}" for line, reason in sorted(self.failed)]
        return out


class RemoteEmbedder:
    """Embeddings from an encoder server: `encode(texts)` -> one `{name: (1, ...) tensor}` dict per text."""

    def __init__(self, encoder, model: str, max_sequence_length: int | None = None):
        self.encoder, self.model, self.max_sequence_length = encoder, model, max_sequence_length
        self.server_hits = 0
        self.server_seconds = 0.0  # the server's side of the calls (queue + encode, or cache lookups)

    def encode(self, texts: list[str]) -> list[dict]:
        tensors, info = self.encoder.encode(texts, self.model, max_sequence_length=self.max_sequence_length,
                                            with_info=True)
        self.server_hits += sum(status not in ("miss", "unknown") for status in info.cache_status)
        self.server_seconds += info.server_seconds
        return [{name: t[i:i + 1] for name, t in tensors.items()} for i in range(len(texts))]


class MemoryEmbedder:
    """Precomputed embeddings held in memory (benchmarks: the same denoising with no encoder in the loop)."""

    server_hits = 0

    def __init__(self, embeddings: dict[str, dict]):
        self.embeddings = embeddings

    def encode(self, texts: list[str]) -> list[dict]:
        return [self.embeddings[t] for t in texts]


class EmbeddingPrefetcher:
    """Requests embeddings on a background thread; each distinct text once, freed when no item needs it."""

    def __init__(self, embedder, uses: Counter):
        self.embedder = embedder
        self.uses = uses  # text -> items still to denoise
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="promptcast-prefetch")
        self._entries: dict[str, tuple[Future, int]] = {}
        self.reused = 0
        self.encoded = 0

    def request(self, texts: list[str]) -> None:
        new = [t for t in dict.fromkeys(texts) if t not in self._entries]
        self.reused += len(texts) - len(new)
        if new:
            future = self._executor.submit(self.embedder.encode, new)
            self._entries.update({t: (future, i) for i, t in enumerate(new)})
            self.encoded += len(new)

    def get(self, text: str) -> dict:
        future, index = self._entries[text]
        return future.result()[index]

    def release(self, text: str) -> None:
        self.uses[text] -= 1
        if self.uses[text] <= 0:
            self._entries.pop(text, None)  # the call's other texts keep the future alive while they are needed

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class ResultsFile:
    """DIR/results.jsonl: finished keys in, one fsynced line per finished item out."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / RESULTS
        self.done: set[str] = set()
        if self.path.exists():
            self._recover()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _recover(self) -> None:
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) != len(data):  # a line torn by a crash: its item is redone, so cut it off
            logger.warning("%s: ignoring a torn last line (%d bytes)", self.path, len(data) - len(complete))
            with open(self.path, "r+b") as f:
                f.truncate(len(complete))
                os.fsync(f.fileno())
        for number, line in enumerate(complete.splitlines(), start=1):
            try:
                self.done.add(json.loads(line)["key"])
            except (ValueError, KeyError, TypeError):
                logger.warning("%s:%d is not a result line; ignored", self.path, number)

    def append(self, record: dict) -> None:
        os.write(self._fd, (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        os.fsync(self._fd)
        self.done.add(record["key"])

    def close(self) -> None:
        os.close(self._fd)


def _lock(out_dir: Path):
    fd = os.open(out_dir / ".promptcast.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise InvalidArgument(f"another `promptcast batch` is writing to {out_dir}; give each node (each --shard) "
                              "its own --out-dir and concatenate their results.jsonl files") from None
    return fd


def _remove_stale_temps(images: Path) -> None:
    for tmp in images.glob(".*.tmp"):  # left by a killed run (we hold the lock: nobody else writes here)
        tmp.unlink(missing_ok=True)


class _CallBuilder:
    """Pipeline call arguments from items; defaults resolved from the pipeline so results record real values."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.family = PIPELINE_FAMILIES[type(pipe).__name__]
        self.params = inspect.signature(pipe.__call__).parameters
        self.size = getattr(pipe, "default_sample_size", 128) * getattr(pipe, "vae_scale_factor", 8)

    def default(self, name):
        p = self.params.get(name)
        return None if p is None else p.default

    def used(self, item: JobItem) -> dict:
        used = item.params()
        used["steps"] = item.steps or self.default("num_inference_steps")
        used["guidance"] = item.guidance if item.guidance is not None else self.default("guidance_scale")
        used["width"], used["height"] = item.width or self.size, item.height or self.size
        return used

    def problem(self, item: JobItem) -> str | None:
        """Why this pipeline cannot run the item (checked before any denoising), or None; sets its negative text."""
        name = type(self.pipe).__name__
        if item.true_cfg_scale is not None and "true_cfg_scale" not in self.params:
            return f"{name} takes no true_cfg_scale"
        try:
            item.negative_text = negative_prompt_for(self.pipe, self.family, item.negative_prompt,
                                                     guidance=item.guidance, true_cfg_scale=item.true_cfg_scale)
            if item.input_images:
                load_reference_images(list(item.input_images), self.family)
        except InvalidArgument as e:
            return str(e)
        return None

    def kwargs(self, items: list[JobItem], embeddings: list[dict], negatives: list[dict] | None) -> dict:
        first = items[0]
        # diffusers does not move given embeddings: put them where (and in the dtype) the transformer computes.
        device, dtype = self.pipe._execution_device, self.pipe.vae.dtype
        kwargs = {name: torch.cat([e[name] for e in embeddings]).to(device, dtype) for name in embeddings[0]}
        if negatives is not None:
            kwargs.update({f"negative_{n}": torch.cat([e[n] for e in negatives]).to(device, dtype)
                           for n in negatives[0]})
        kwargs.update(generator=[torch.Generator("cpu").manual_seed(item.seed) for item in items],
                      num_inference_steps=first.steps, guidance_scale=first.guidance, width=first.width,
                      height=first.height, true_cfg_scale=first.true_cfg_scale)
        if first.input_images:
            kwargs["image"] = load_reference_images(list(first.input_images), self.family)
        return {k: v for k, v in kwargs.items() if v is not None and k in self.params}


def _image_name(item: JobItem) -> str:
    if item.id is None:
        return f"{item.key[:16]}.png"
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(item.id))[:64]
    return f"{safe}-{item.key[:8]}.png"


def _batches(items: list[JobItem], size: int) -> list[list[JobItem]]:
    """Consecutive runs of the same LoRA set and call parameters, cut at `size` items."""
    groups: dict[tuple, list[JobItem]] = {}
    for item in items:  # items arrive grouped by LoRA set; group by parameters within it, in file order
        groups.setdefault((item.loras, item.batch_group()), []).append(item)
    return [group[i:i + size] for group in groups.values() for i in range(0, len(group), size)]


def run_batch(job_file: str | os.PathLike, out_dir: str | os.PathLike, *, pipe, embedder,
              defaults: JobDefaults = JobDefaults(), options: BatchOptions = BatchOptions()) -> Summary:
    r"""
    Run a job file on a loaded denoiser pipeline.

    Args:
        job_file (`str` or `os.PathLike`): JSON lines (DataFlow `conversations` or plain `prompt` objects).
        out_dir (`str` or `os.PathLike`): images go to `out_dir/images/`, result lines to `out_dir/results.jsonl`.
        pipe ([`~diffusers.DiffusionPipeline`]): from `load_denoiser` (text encoders not loaded).
        embedder ([`RemoteEmbedder`] or [`MemoryEmbedder`]): where embeddings come from.
        defaults ([`JobDefaults`]): the command line's values; a line's own fields win.
        options ([`BatchOptions`]): batch size, prefetch depth, shard, strictness.

    Returns:
        [`Summary`]: done, skipped, failed (line, reason) and cache hits.
    """
    started = time.perf_counter()
    if not 1 <= options.batch_size <= 32:
        raise InvalidArgument(f"--batch-size {options.batch_size} must be between 1 and 32")
    items, bad = read_job_file(job_file, defaults, shard=options.shard, strict=options.strict)
    summary = Summary(failed=[(b.line, b.reason) for b in bad])
    out_dir = Path(out_dir)
    images = out_dir / IMAGES
    images.mkdir(parents=True, exist_ok=True)
    lock = _lock(out_dir)
    results = None
    try:
        _remove_stale_temps(images)
        results = ResultsFile(out_dir)
        pending, seen = [], {}
        for item in items:
            if item.key in results.done or item.key in seen:
                summary.skipped += 1
                continue
            seen[item.key] = item
            pending.append(item)
        builder = _CallBuilder(pipe)
        adapters = LoraAdapters(pipe)
        all_loras = [ref for item in pending for ref in item.loras]
        if all_loras:
            adapters.load(all_loras)  # checks every file first: a bad LoRA fails before any denoising
        runnable = []
        for item in pending:
            reason = builder.problem(item)
            if reason:
                summary.failed.append((item.line, reason))
            else:
                runnable.append(item)
        batches = _batches(order_for_few_switches(runnable), options.batch_size)
        try:
            _run_batches(batches, pipe, builder, adapters, embedder, results, images, summary, options)
        finally:
            summary.lora_switches = adapters.switches
            adapters.unload()  # the next job (or `generate`) starts from the base model
    finally:
        if results is not None:
            results.close()
        os.close(lock)
    summary.seconds = time.perf_counter() - started
    return summary


def _texts(batch: list[JobItem]) -> list[str]:
    return [i.prompt for i in batch] + [i.negative_text for i in batch if i.negative_text is not None]


def _run_batches(batches, pipe, builder, adapters, embedder, results, images, summary, options) -> None:
    from tqdm import tqdm

    uses = Counter(t for batch in batches for t in _texts(batch))
    prefetcher = EmbeddingPrefetcher(embedder, uses)
    total = sum(len(b) for b in batches)
    bar = tqdm(total=total, unit="img", file=sys.stderr, disable=not options.progress, dynamic_ncols=True,
               mininterval=0.5)
    requested = 0  # batches whose embeddings have been requested
    try:
        for index, batch in enumerate(batches):
            # Keep the encoder `prefetch` items ahead of the denoiser: this batch plus the next ones.
            while requested < len(batches) and (
                    requested <= index or sum(len(b) for b in batches[index + 1:requested]) < options.prefetch):
                prefetcher.request(_texts(batches[requested]))
                requested += 1
            _run_one(batch, pipe, builder, adapters, prefetcher, results, images, summary)
            bar.update(len(batch))
    finally:
        bar.close()
        prefetcher.close()
        summary.encoded = prefetcher.encoded
        summary.cache_hits = prefetcher.reused + getattr(embedder, "server_hits", 0)


def _run_one(batch, pipe, builder, adapters, prefetcher, results, images, summary) -> None:
    texts = _texts(batch)
    try:
        embeddings = [prefetcher.get(i.prompt) for i in batch]
        negatives = [prefetcher.get(i.negative_text) for i in batch] if batch[0].negative_text is not None else None
    except PromptcastError as e:
        reason = f"no embeddings ({e}); rerun the same command to complete it"
        summary.failed += [(item.line, reason) for item in batch]
        for text in texts:
            prefetcher.release(text)
        return
    for text in texts:
        prefetcher.release(text)
    try:
        adapters.activate(batch[0].loras)
        with torch.inference_mode():
            out = pipe(**builder.kwargs(batch, embeddings, negatives)).images
    except Exception as e:  # noqa: BLE001 - one failed call (out of memory, a bad input image) fails its items only
        logger.exception("denoising lines %s failed", [i.line for i in batch])
        summary.failed += [(item.line, f"denoising failed: {type(e).__name__}: {e}") for item in batch]
        return
    for item, image in zip(batch, out):
        name = _image_name(item)
        save_atomically(image, images / name)  # renamed and the folder fsynced before the line that points at it
        record = {**item.source, "images": [f"{IMAGES}/{name}"], "key": item.key, "line": item.line,
                  "params": builder.used(item)}
        results.append(record)
        summary.done += 1


def run_batch_command(encoder, job_file, out_dir, source: str, *, defaults: JobDefaults, options: BatchOptions,
                      device: str, dtype, vram=None) -> Summary:
    """`promptcast batch`: check the job file, pick the server model, load the denoiser, run."""
    from denoiser_client.generate import pick_encoder_model
    from denoiser_client.pipeline import handshake, load_denoiser

    if options.strict:  # a bad line fails the job before minutes of loading (otherwise it is a failed item)
        read_job_file(job_file, defaults, shard=options.shard, strict=True)
    info = pick_encoder_model(encoder, source, defaults.encoder_model)  # also: the server is reachable
    pipe, family = load_denoiser(source, device=device, dtype=dtype, vram=vram)
    handshake(pipe, family, info)
    pipe.set_progress_bar_config(disable=True)  # one progress bar: the job's
    embedder = RemoteEmbedder(encoder, info.name, options.max_sequence_length)
    return run_batch(job_file, out_dir, pipe=pipe, embedder=embedder, defaults=defaults, options=options)
