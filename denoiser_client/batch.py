"""`promptcast batch`: a job file through one denoiser node, resumable after any crash.

Every input line gets its own result line; lines asking for the same image (same parameters) share one file, made
once. A video family's lines make MP4 files (with no MP4 encoder installed, a folder of PNG frames each). Crash
safety: each image goes to a temp file (a video's frames to a temp folder), is fsynced and renamed to its final path,
and only then are its lines appended (one `write` each, then fsync) to DIR/results.jsonl. A rerun reads the finished
lines (a torn last line is cut off) and does the rest, so `kill -9` at any moment loses at most the items in progress,
never leaves a partial image at a final path and never writes a line's result twice.

The node never waits for the encoder: a background thread requests the embeddings of the next `prefetch` items
while the current ones denoise, and a prompt that appears several times is encoded once. When the encoder server
stays unreachable after the client's retries, the job stops and says how to resume; when a call runs out of GPU
memory, the node moves to the next memory plan down and retries that call once.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from denoiser_client.embeddings import EmbeddingPrefetcher
from denoiser_client.errors import (DeadlineExceeded, InvalidArgument, OutOfGpuMemory, PromptcastError,
                                    ServerOverloaded, ServerUnavailable)
from denoiser_client.jobs import JobDefaults, JobItem, check_job_file, read_job_file
from denoiser_client.lora import order_for_few_switches
from denoiser_client.media import no_mp4_note, save_output

logger = logging.getLogger(__name__)

RESULTS = "results.jsonl"
IMAGES = "images"
_TRANSIENT = (ServerOverloaded,)  # worth a rerun; an unreachable server stops the job instead


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
    skipped: int = 0  # finished by an earlier run
    failed: list[tuple[int, str]] = field(default_factory=list)  # (line, reason): bad lines and failed items
    cache_hits: int = 0  # embeddings reused in this run + answered from the server's cache
    encoded: int = 0  # distinct texts requested from the encoder
    lora_switches: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # memory plans changed, why the job stopped
    stopped: bool = False  # the job ended early (encoder server unreachable): items are left to do

    @property
    def ok(self) -> bool:
        return not self.failed and not self.stopped

    def lines(self) -> list[str]:
        rate = self.done / self.seconds if self.seconds else 0.0
        out = [f"done {self.done}, skipped {self.skipped}, failed {len(self.failed)}, cache hits {self.cache_hits} "
               f"({self.encoded} texts encoded), {self.seconds:.1f}s, {rate:.2f} items/s"]
        out += [f"  failed line {line}: {reason}" for line, reason in sorted(self.failed)]
        out += [f"  {note}" for note in self.notes]
        return out


class ResultsFile:
    """DIR/results.jsonl: finished lines and their images in, one fsynced line per finished item out."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / RESULTS
        self.done: set[str] = set()  # records (one per input line)
        self.images: dict[str, list[str]] = {}  # image key -> image paths, for lines that share an image
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
                row = json.loads(line)
                self.done.add(row.get("record") or row["key"])
                self.images[row["key"]] = row["images"]
            except (ValueError, KeyError, TypeError, AttributeError):
                logger.warning("%s:%d is not a result line; ignored", self.path, number)

    def append(self, record: dict) -> None:
        os.write(self._fd, (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        os.fsync(self._fd)
        self.done.add(record["record"])
        self.images[record["key"]] = record["images"]

    def close(self) -> None:
        os.close(self._fd)


class BatchJob:
    """A job file against an output folder, opened before any model loads: the file read, the folder checked and
    locked, finished lines known. `pending` is what is left; `render` the first line of each image left to make."""

    def __init__(self, job_file, out_dir, defaults: JobDefaults, options: BatchOptions):
        if not 1 <= options.batch_size <= 32:
            raise InvalidArgument(f"--batch-size {options.batch_size} must be between 1 and 32")
        check_job_file(job_file)
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise InvalidArgument(f"--out-dir {str(self.out_dir)!r} is a file: pass a folder (it is created if "
                                  "missing)")
        self.items, bad = read_job_file(job_file, defaults, shard=options.shard, strict=options.strict)
        self.summary = Summary(failed=[(b.line, b.reason) for b in bad])
        self.images = self.out_dir / IMAGES
        self.images.mkdir(parents=True, exist_ok=True)
        self._lock = _lock(self.out_dir)
        try:
            for tmp in self.images.glob(".*.tmp*"):  # left by a killed run (we hold the lock: nobody else writes)
                shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
            self.results = ResultsFile(self.out_dir)
        except BaseException:
            os.close(self._lock)
            raise
        self.pending = [item for item in self.items if item.record not in self.results.done]
        self.summary.skipped = len(self.items) - len(self.pending)
        self.render = list({item.key: item for item in reversed(self.pending)}.values())[::-1]

    def close(self) -> None:
        self.results.close()
        os.close(self._lock)

    def finish(self, item: JobItem, paths: list[str], builder) -> None:
        """Write the result line of every pending line that asked for `item`'s image."""
        for line in [i for i in self.pending if i.key == item.key and i.record not in self.results.done]:
            record = {**line.source, "images": paths, "key": line.key, "record": line.record, "line": line.line,
                      "params": {**line.params(), **builder.used(line)}}
            if line.reference_images:  # absolute, so the result line can be run again from any folder
                record["reference_images"] = list(line.reference_images)
            self.results.append(record)
            self.summary.done += 1

    def run(self, node, embedder, options: BatchOptions) -> Summary:
        """Render what is left on `node` (a `DenoiserNode`), with embeddings from `embedder`."""
        started = time.perf_counter()
        todo = []
        for item in self.render:
            if item.key in self.results.images and all((self.out_dir / p).exists()
                                                       for p in self.results.images[item.key]):
                self.finish(item, self.results.images[item.key], node.builder)  # the image exists: share it
            else:
                todo.append(item)
        all_loras = [ref for item in todo for ref in item.loras]
        if all_loras:
            node.adapters.load(all_loras)  # checks every file first: a bad LoRA fails before any denoising
        runnable = []
        for item in todo:
            reason = node.check(item)
            if reason:
                self.summary.failed += [(i.line, reason) for i in self.pending if i.key == item.key]
            else:
                runnable.append(item)
        batches = _batches(order_for_few_switches(runnable), options.batch_size)
        try:
            _Runner(self, node, embedder, options).run(batches)
        finally:
            self.summary.lora_switches = node.adapters.switches
            node.adapters.unload()  # the next job (or `generate`) starts from the base model
        self.summary.seconds = time.perf_counter() - started
        return self.summary


class _Runner:
    def __init__(self, job: BatchJob, node, embedder, options: BatchOptions):
        self.job, self.node, self.embedder, self.options = job, node, embedder, options

    def run(self, batches: list[list[JobItem]]) -> None:
        from tqdm import tqdm

        uses = Counter(t for batch in batches for t in _texts(batch))
        prefetcher = EmbeddingPrefetcher(self.embedder, uses)
        bar = tqdm(total=sum(len(b) for b in batches), unit="img", file=sys.stderr, disable=not self.options.progress,
                   dynamic_ncols=True, mininterval=0.5)
        requested = 0  # batches whose embeddings have been requested
        try:
            for index, batch in enumerate(batches):
                # Keep the encoder `prefetch` items ahead of the denoiser: this batch plus the next ones.
                while requested < len(batches) and (
                        requested <= index or sum(len(b) for b in batches[index + 1:requested]) < self.options.prefetch):
                    prefetcher.request(_texts(batches[requested]))
                    requested += 1
                if not self.one(batch, prefetcher):
                    left = [i for b in batches[index:] for i in b]
                    self.job.summary.stopped = True
                    self.job.summary.notes.append(
                        f"stopped with {len(left)} image(s) not made: rerun the same command to resume (finished "
                        "lines are kept)")
                    break
                bar.update(len(batch))
        finally:
            bar.close()
            prefetcher.close()
            self.job.summary.encoded = prefetcher.encoded
            self.job.summary.cache_hits = prefetcher.reused + getattr(self.embedder, "server_hits", 0)

    def fail(self, batch: list[JobItem], reason: str) -> None:
        keys = {item.key for item in batch}
        self.job.summary.failed += [(i.line, reason) for i in self.job.pending if i.key in keys]

    def one(self, batch: list[JobItem], prefetcher: EmbeddingPrefetcher) -> bool:
        """Render one batch; False when the job must stop (the encoder server is unreachable)."""
        texts = _texts(batch)
        try:
            embeddings = [prefetcher.get(i.prompt) for i in batch]
            negatives = [prefetcher.get(i.negative_text) for i in batch] if batch[0].negative_text is not None \
                else None
        except (ServerUnavailable, DeadlineExceeded) as e:
            self.job.summary.notes.append(f"the encoder server did not answer: {e}")
            return False
        except PromptcastError as e:
            hint = "; rerun the same command to complete it" if isinstance(e, _TRANSIENT) else ""
            self.fail(batch, f"no embeddings ({e}){hint}")
            return True
        finally:
            for text in texts:
                prefetcher.release(text)
        node, summary = self.node, self.job.summary
        for attempt in (1, 2):
            try:
                # The embedder knows how the rows it fetched are batched (a bare pipeline's node has no server model).
                images = node.render(batch, embeddings, negatives, layouts=getattr(self.embedder, "layouts", None))
                break
            except OutOfGpuMemory as e:
                used = node.builder.used(batch[0])
                before = node.plan.name
                following = node.step_down(used["width"] * used["height"], len(batch)) if attempt == 1 else None
                if following is None:
                    self.fail(batch, str(e))
                    return True
                summary.notes.append(f"out of GPU memory at line {batch[0].line} with memory plan {before}; retried "
                                     f"and continued with {following}")
            except Exception as e:  # noqa: BLE001 - one failed call (a bad input image, a kernel error) fails its items only
                logger.exception("denoising lines %s failed", [i.line for i in batch])
                self.fail(batch, f"denoising failed: {type(e).__name__}: {e}")
                return True
        for item, image in zip(batch, images):
            name = _image_name(item, ".mp4" if node.media == "video" else ".png")
            # Renamed and fsynced before the lines that point at it.
            path, note = save_output(image, self.job.images / name, node.media, fps=item.fps)
            frames_note = no_mp4_note(f"each video's frames are PNG files in {IMAGES}/NAME_frames/")
            if note and frames_note not in summary.notes:
                summary.notes.append(frames_note)
            self.job.finish(item, [f"{IMAGES}/{path.name}"], node.builder)
        return True


def _lock(out_dir: Path):
    fd = os.open(out_dir / ".promptcast.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise InvalidArgument(f"another `promptcast batch` is writing to {out_dir}; give each node (each --shard) "
                              "its own --out-dir and concatenate their results.jsonl files") from None
    return fd


def _image_name(item: JobItem, suffix: str = ".png") -> str:
    if item.id is None:
        return f"{item.key[:16]}{suffix}"
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(item.id))[:64]
    return f"{safe}-{item.key[:8]}{suffix}"


def _batches(items: list[JobItem], size: int) -> list[list[JobItem]]:
    """Consecutive runs of the same LoRA set and call parameters, cut at `size` items."""
    groups: dict[tuple, list[JobItem]] = {}
    for item in items:  # items arrive grouped by LoRA set; group by parameters within it, in file order
        groups.setdefault((item.loras, item.batch_group()), []).append(item)
    return [group[i:i + size] for group in groups.values() for i in range(0, len(group), size)]


def _texts(batch: list[JobItem]) -> list[str]:
    return [i.prompt for i in batch] + [i.negative_text for i in batch if i.negative_text is not None]


def run_batch(job_file: str | os.PathLike, out_dir: str | os.PathLike, *, pipe, embedder,
              defaults: JobDefaults = JobDefaults(), options: BatchOptions = BatchOptions()) -> Summary:
    r"""
    Run a job file on a loaded denoiser.

    Args:
        job_file (`str` or `os.PathLike`): JSON lines (DataFlow `conversations` or plain `prompt` objects).
        out_dir (`str` or `os.PathLike`): images (a video family: MP4 files, or frame folders) go to
            `out_dir/images/`, result lines to `out_dir/results.jsonl`.
        pipe ([`DenoiserNode`] or [`~diffusers.DiffusionPipeline`]): a node, or a pipeline from `load_denoiser`.
        embedder ([`RemoteEmbedder`] or [`MemoryEmbedder`]): where embeddings come from.
        defaults ([`JobDefaults`]): the command line's values; a line's own fields win.
        options ([`BatchOptions`]): batch size, prefetch depth, shard, strictness.

    Returns:
        [`Summary`]: done, skipped, failed (line, reason), cache hits and notes.
    """
    from denoiser_client.node import DenoiserNode

    node = pipe if isinstance(pipe, DenoiserNode) else DenoiserNode(pipe)
    job = BatchJob(job_file, out_dir, defaults, options)
    try:
        return job.run(node, embedder, options)
    finally:
        job.close()


def run_batch_command(encoder, job_file, out_dir, source: str, *, defaults: JobDefaults, options: BatchOptions,
                      device: str, dtype, vram: str = "auto", vram_budget: float | None = None, explicit=None,
                      echo=None) -> Summary:
    """`promptcast batch`: open the job (file, folder and finished lines checked before any model loads), pick the
    server model, choose the memory plan for the job's largest image, load the denoiser, run."""
    from denoiser_client.embeddings import RemoteEmbedder
    from denoiser_client.node import DenoiserNode, planned_pixels
    from denoiser_client.pipeline import family_of
    from shared.families import FAMILIES

    job = BatchJob(job_file, out_dir, defaults, options)
    try:
        if not job.render:
            job.summary.notes.append(f"nothing left to do in {out_dir}: every good line has its result")
            return job.summary
        media = FAMILIES[family_of(source)].media
        pixels = max(planned_pixels(item.width, item.height, item.num_frames, media) for item in job.render)
        node = DenoiserNode.load(encoder, source, encoder_model=defaults.encoder_model, device=device, dtype=dtype,
                                 vram=vram, vram_budget=vram_budget, explicit=explicit, pixels=pixels,
                                 images=options.batch_size, max_sequence_length=options.max_sequence_length,
                                 echo=echo)
        node.pipe.set_progress_bar_config(disable=True)  # one progress bar: the job's
        embedder = RemoteEmbedder(encoder, node.info.name, options.max_sequence_length)
        return job.run(node, embedder, options)
    finally:
        job.close()
