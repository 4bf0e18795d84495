"""Job files: one JSON object a line, DataFlow's chat format or a plain object, validated with line numbers.

A line is either DataFlow's `{"conversations": [{"role": "user", "content": "..."}]}` (the text is the last user
turn) or a plain `{"prompt": ..., "id", "seed", "steps", "guidance", "width", "height", "negative_prompt",
"true_cfg_scale", "loras": [{"path", "weight"}], "reference_images": [...]}`, plus `"num_frames"` and `"fps"` for a
video family. Command-line options are defaults; a
line's fields win. Other fields are the line's own data, echoed into its result line. `images` is what
`results.jsonl` lines carry (a result fed back as a job): an earlier output, never read as an input.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from denoiser_client.errors import InvalidArgument
from denoiser_client.lora import LoraRef, absolute_path, parse_lora
from denoiser_client.node import RenderItem
from denoiser_client.options import GenerateOptions, line_field, option_problems
from shared.cache_keys import canonical_json
from shared.prompts import prompt_text


@dataclass
class JobDefaults(GenerateOptions):
    """The command line's values (`generate`'s options plus the job-wide ones); `None` means the pipeline's own
    default."""

    loras: tuple[LoraRef, ...] = ()
    model: str = ""  # the model source and encoder model name go into every key: another model, another image
    encoder_model: str | None = None


@dataclass
class JobItem(RenderItem):
    """One good line: what is encoded, how it is denoised, and the object it came from."""

    line: int = 0  # 1-based line number in the job file
    source: dict = field(default_factory=dict)  # the line's object, echoed into results.jsonl
    id: str | None = None
    key: str = ""  # of the image: lines with the same key share one image, made once
    record: str = ""  # of the line's result: every input line gets its own result line, once

    def params(self) -> dict:
        """The effective parameters (hashed into the key, written to the result line)."""
        params = {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "seed": self.seed,
                  "steps": self.steps, "guidance": self.guidance, "width": self.width, "height": self.height,
                  "true_cfg_scale": self.true_cfg_scale, "reference_images": list(self.reference_images),
                  "loras": [{"path": lora.path, "weight": lora.weight} for lora in self.loras]}
        # Only when given: an image job's keys stay what they were before videos existed.
        params.update({name: getattr(self, name) for name in ("num_frames", "fps") if getattr(self, name) is not None})
        return params

    def batch_group(self) -> tuple:
        """Items whose group is equal can be denoised in one pipeline call."""
        return (self.loras, self.steps, self.guidance, self.width, self.height, self.true_cfg_scale,
                self.negative_text is not None, self.reference_images, self.num_frames)


@dataclass(frozen=True)
class BadLine:
    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


# field -> accepted JSON types (bool is excluded from numbers below: json's true is not a seed)
_FIELD_TYPES = {"id": (str, int), "seed": (int,), "steps": (int,), "guidance": (int, float), "width": (int,),
                "height": (int,), "negative_prompt": (str,), "true_cfg_scale": (int, float), "loras": (list,),
                "reference_images": (list,), "prompt": (str, dict, list), "num_frames": (int,), "fps": (int,)}
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "an object"}


def item_key(defaults: JobDefaults, params: dict, item_id) -> str:
    """SHA-256 of everything that decides the image: same key, same image, done once."""
    return hashlib.sha256(canonical_json({"model": defaults.model, "encoder_model": defaults.encoder_model,
                                          "id": item_id, "max_sequence_length": defaults.max_sequence_length,
                                          **params})).hexdigest()


def parse_shard(text: str | None) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N; None -> (0, 1)."""
    if text is None:
        return 0, 1
    index, sep, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i, n = -1, 0
    if not sep or n < 1 or not 0 <= i < n:
        raise InvalidArgument(f"--shard {text!r} must be I/N with 0 <= I < N, e.g. 0/4 for the first of 4 nodes")
    return i, n


def prompt_of(obj: dict) -> str:
    """The prompt of a job line: `prompt` (an object is sent as its compact JSON text), else the last user turn of
    DataFlow `conversations`. Raises ValueError saying what is missing."""
    if "conversations" in obj and "prompt" not in obj:
        turns = obj["conversations"]
        if not isinstance(turns, list):
            raise ValueError("'conversations' must be a list of {role, content} turns")
        users = [t for t in turns if isinstance(t, dict) and t.get("role") in ("user", "human")]
        if not users:
            raise ValueError("'conversations' has no user turn: the prompt is the last user turn's content")
        content = users[-1].get("content")
        if isinstance(content, list):  # OpenAI-style parts: keep the text parts
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            raise ValueError("the last user turn's 'content' must be a string")
        return content
    if "prompt" not in obj:
        raise ValueError("no 'prompt' (and no DataFlow 'conversations'): every line needs one")
    return prompt_text(obj["prompt"])  # FLUX.2 structured prompting: an object is sent as its compact JSON text


def _check_types(obj: dict) -> None:
    for name, types in _FIELD_TYPES.items():
        if name not in obj or obj[name] is None and name not in ("prompt",):
            continue
        value = obj[name]
        if isinstance(value, bool) or not isinstance(value, types):
            want = " or ".join(_TYPE_NAMES[t] for t in types)
            raise ValueError(f"field {name!r} is {type(value).__name__} {json.dumps(value)[:40]}, it must be {want}")


def _loras(value, base: Path) -> tuple[LoraRef, ...]:
    refs = []
    for entry in value:
        if isinstance(entry, str):
            refs.append(parse_lora(entry, base))
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise ValueError("each entry of 'loras' must be {\"path\": str, \"weight\": number} or \"PATH[:WEIGHT]\"")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ValueError(f"a LoRA weight must be a number, not {json.dumps(weight)}")
        refs.append(LoraRef(absolute_path(entry["path"], base), float(weight)))
    return tuple(refs)


def parse_line(text: str, line: int, defaults: JobDefaults, base: Path) -> JobItem:
    """One line -> JobItem; raises ValueError with the reason (the caller adds the line number)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"a line must be a JSON object, not {type(obj).__name__}")
    _check_types(obj)
    prompt = prompt_of(obj)
    pick = lambda name, default: default if obj.get(name) is None else obj[name]  # noqa: E731
    guidance, true_cfg = pick("guidance", defaults.guidance), pick("true_cfg_scale", defaults.true_cfg_scale)
    options = GenerateOptions(seed=pick("seed", defaults.seed), steps=pick("steps", defaults.steps),
                              guidance=None if guidance is None else float(guidance),
                              width=pick("width", defaults.width), height=pick("height", defaults.height),
                              negative_prompt=pick("negative_prompt", defaults.negative_prompt),
                              true_cfg_scale=None if true_cfg is None else float(true_cfg),
                              num_frames=pick("num_frames", defaults.num_frames), fps=pick("fps", defaults.fps))
    problems = option_problems(options, line_field)
    if problems:
        raise ValueError("; ".join(problems))
    references = obj.get("reference_images") or []
    if not all(isinstance(p, str) for p in references):
        raise ValueError("'reference_images' must be a list of image file paths (FLUX.2 reference images)")
    loras = _loras(obj["loras"], base) if obj.get("loras") is not None else defaults.loras
    options.reference_images = tuple(absolute_path(p, base) for p in references)
    item = JobItem.of(prompt, options, loras=loras, line=line, source=obj, id=obj.get("id"))
    item.key = item_key(defaults, item.params(), item.id)
    return item


def read_job_file(path: str | os.PathLike, defaults: JobDefaults, *, shard: tuple[int, int] = (0, 1),
                  strict: bool = False) -> tuple[list[JobItem], list[BadLine]]:
    """Parse a job file: (good items, bad lines), both in file order, restricted to this node's shard.

    Sharding counts non-blank lines, good or bad, so N shards cover the file exactly once and each bad line is
    reported by exactly one node. A line that is not UTF-8 is a bad line like any other. With `strict`, the first
    bad line raises `InvalidArgument`.
    """
    path = check_job_file(path)
    index, count = shard
    base = path.parent.absolute()
    items, bad = [], []
    position = -1
    seen: Counter = Counter()
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            position += 1
            if position % count != index:
                continue
            try:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"not UTF-8 text (byte {e.start} of the line)") from None
                item = parse_line(text, number, defaults, base)
            except ValueError as e:
                if strict:
                    raise InvalidArgument(f"{path}:{number}: {e} (--strict stops at the first bad line)") from None
                bad.append(BadLine(number, str(e)))
                continue
            # Identical lines are each their own result; the occurrence tells them apart.
            identity = (item.key, canonical_json(item.source))
            item.record = hashlib.sha256(canonical_json([item.key, item.source, seen[identity]])).hexdigest()
            seen[identity] += 1
            items.append(item)
    return items, bad


def check_job_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        raise InvalidArgument(f"job file {str(path)!r} is a folder: pass a JSON-lines file")
    if not path.is_file():
        raise InvalidArgument(f"job file {str(path)!r} does not exist")
    return path
