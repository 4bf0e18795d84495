"""The web console's engine: one loaded node, one encoder client, the styles, and every session's renders.

Renders go through `render_one`, the path `promptcast generate` takes, one at a time: the node has one pipeline and
one set of active LoRAs, so each render activates its own style right before it runs, under one lock, and two
browser sessions never see each other's style. A video family's renders are saved as MP4 when imageio-ffmpeg can
write H.264 (what browsers play), else as an animated GIF, which a browser shows with no extra package. Nothing here
imports Gradio: the page (`page.py`) only turns form values into a `ConsoleRequest` and a `Rendered` (or an error)
back into what it shows.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from denoiser_client import media
from denoiser_client.errors import InvalidArgument, ServerUnavailable
from denoiser_client.generate import render_one
from denoiser_client.lora import LoraError
from denoiser_client.node import DenoiserNode, RenderItem
from denoiser_client.options import GenerateOptions, media_problems, option_problems
from denoiser_client.pipeline import Timings
from denoiser_client.remote import RemoteTextEncoder
from denoiser_client.ui.styles import BASE, Style
from shared.families import FAMILIES

logger = logging.getLogger(__name__)

RANDOM_SEED = -1
MAX_PAGE_SEED = 2**53 - 1  # a browser holds numbers as doubles: larger seeds would not come back as typed
LABELS = {"seed": "Seed", "steps": "Steps", "width": "Width", "height": "Height", "guidance": "Guidance",
          "true_cfg_scale": "True CFG scale", "negative_prompt": "Negative", "reference_images": "Reference images",
          "num_frames": "Frames", "fps": "FPS"}
_HEALTH_WORDS = {"SERVING": "serving", "NOT_SERVING": "not serving (loading, draining or stuck)",
                 "UNREACHABLE": "unreachable"}


def page_label(field: str) -> str:
    """How the page names a `GenerateOptions` field in a message (the validator's `name=`)."""
    return LABELS.get(field, field)


@dataclass
class ConsoleRequest:
    """What one press of Generate asks for; `None` means the pipeline's own default, seed -1 a random seed."""

    prompt: str
    style: str = BASE
    seed: int = RANDOM_SEED
    steps: int | None = None
    width: int | None = None
    height: int | None = None
    guidance: float | None = None
    negative_prompt: str | None = None
    true_cfg_scale: float | None = None
    reference_images: tuple[str, ...] = ()
    num_frames: int | None = None  # video families
    fps: int | None = None  # video families: frames a second of the file saved


@dataclass
class Rendered:
    """One finished image (or video): its file, the request as rendered (the seed drawn, the defaults filled in),
    its timings."""

    path: Path
    request: ConsoleRequest
    style: Style
    timings: Timings
    notes: tuple[str, ...] = ()

    def info(self) -> str:
        """The page's "Info": seed, style, the prompt embedding's cache status and where the time went."""
        status = self.timings.cache_status
        cache = "encoded (cache miss)" if not status or status[0] == "miss" else f"hit ({status[0]})"
        t = self.timings
        r = self.request
        frames = "" if r.num_frames is None else f", {r.num_frames} frames at {r.fps} fps"
        lines = [f"seed {r.seed}", f"style {self.style.describe()}", f"embedding {cache}",
                 f"encode {t.encode:.3f}s / transfer {t.transfer:.3f}s / denoise {t.denoise:.3f}s / "
                 f"decode {t.decode:.3f}s",
                 f"{r.steps} steps, {r.width}x{r.height}{frames}"
                 + ("" if r.guidance is None else f", guidance {r.guidance:g}")]
        return "\n".join(lines + list(self.notes))


@dataclass(frozen=True)
class FormFacts:
    """What the page offers for this node's model: its defaults and which optional fields it takes."""

    family: str
    steps: int
    width: int
    height: int
    guidance: float | None  # None: the pipeline takes no guidance
    true_cfg_scale: float | None  # None: the pipeline has no true CFG
    negative_prompt: bool
    max_reference_images: int
    media: str = "image"  # "image" or "video"
    num_frames: int | None = None  # video: the pipeline's default frame count
    fps: int | None = None  # video: the default frames a second of the file saved

    @property
    def structured_prompts(self) -> bool:
        return self.family.startswith("flux2")

    @property
    def video(self) -> bool:
        return self.media == "video"


def form_facts(node: DenoiserNode) -> FormFacts:
    builder = node.builder
    used = builder.used(RenderItem(prompt=""))
    has = lambda name: name in builder.params  # noqa: E731
    record = FAMILIES[node.family]
    try:  # the family's own rule, asked with guidance and true CFG on: does a negative prompt ever count?
        negative = record.negative_prompt(node.pipe.config, "?", 4.0, 4.0) is not None
    except ValueError:
        negative = False
    return FormFacts(node.family, used["steps"], used["width"], used["height"],
                     used["guidance"] if has("guidance_scale") else None,
                     builder.default("true_cfg_scale") if has("true_cfg_scale") else None,
                     negative, record.max_reference_images, node.media, used.get("num_frames"), used.get("fps"))


def video_suffix() -> str:
    """What the console saves a video as: ".mp4" when imageio-ffmpeg writes it (H.264, which browsers play), else
    ".gif" (browsers animate a GIF; OpenCV's MP4 is MPEG-4 Part 2, which they do not play)."""
    return ".mp4" if media.mp4_encoder() == "imageio" else ".gif"


def is_structured(prompt: str) -> bool:
    """A prompt that is a JSON object (FLUX.2 structured prompting), sent as its compact JSON text."""
    text = prompt.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return False
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


class Console:
    r"""
    The console behind every browser session of one node.

    Args:
        node ([`DenoiserNode`]): the loaded node (transformer + VAE), already paired with the server's model.
        encoder ([`RemoteTextEncoder`]): the encoder server's client.
        styles (`list[Style]`): "base" first; `load_styles` loads their LoRAs.
        out_dir (`str` or `os.PathLike`): where each image is saved as PNG, each video as MP4 or GIF (`suffix`); the
            page shows these files.
        connect (`callable`, *optional*): returns a new client for the same server. Once the server was found
            unavailable, the next render and health probe dial with a fresh client: gRPC would otherwise wait out its
            reconnect backoff (growing to two minutes) before trying a server that is back.
    """

    def __init__(self, node: DenoiserNode, encoder: RemoteTextEncoder, styles: list[Style], out_dir: str | Path, *,
                 connect: Callable[[], RemoteTextEncoder] | None = None):
        self.node, self.encoder, self._connect = node, encoder, connect
        self._stale = False  # the server was unavailable: dial afresh next time
        self.styles = {style.name: style for style in styles}
        self.problems: list[str] = []
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.facts = form_facts(node)
        self.suffix = video_suffix() if self.facts.video else ".png"
        self.renders = 0
        self._lock = threading.Lock()  # one pipeline, one set of active LoRAs: one render at a time
        self._numbers = itertools.count(1)
        node.pipe.set_progress_bar_config(disable=True)

    def load_styles(self) -> list[str]:
        """Check and load every style's LoRAs once. A style whose LoRA fails its check is taken off the choices,
        reported (returned, kept in `problems`, logged); the others stay."""
        for style in [s for s in self.styles.values() if s.loras]:
            try:
                self.node.adapters.load(style.loras)
            except (LoraError, ValueError) as e:
                del self.styles[style.name]
                self.problems.append(f"style {style.name!r} is off: {e}")
                logger.error("style %r is off: %s", style.name, e)
        if not self.facts.negative_prompt:
            for style in [s for s in self.styles.values() if s.negative_prompt]:
                self.styles[style.name] = replace(style, negative_prompt=None)
                logger.warning("style %r: its negative prompt is not used, %s takes none", style.name,
                               self.facts.family)
        self.node.adapters.activate(())
        return self.problems

    @property
    def style_names(self) -> list[str]:
        return list(self.styles)

    def style(self, name: str) -> Style:
        if name not in self.styles:
            raise InvalidArgument(f"Style {name!r} is not one of this console's: {', '.join(self.styles)}")
        return self.styles[name]

    def options_for(self, request: ConsoleRequest, style: Style) -> GenerateOptions:
        """The request as `GenerateOptions`, checked (messages name the page's fields); a random seed drawn."""
        seed = request.seed
        if isinstance(seed, float) and seed.is_integer():
            seed = int(seed)
        if not isinstance(seed, int) or not (seed == RANDOM_SEED or 0 <= seed <= MAX_PAGE_SEED):
            raise InvalidArgument(f"Seed={seed} must be -1 (a random seed) or a whole number from 0 to {MAX_PAGE_SEED}")
        if seed == RANDOM_SEED:
            seed = random.randrange(2**32)
        if request.negative_prompt and not self.facts.negative_prompt:
            raise InvalidArgument(f"{self.facts.family} takes no negative prompt: clear the Negative box")
        negative = style.negative_for(request.negative_prompt) if self.facts.negative_prompt else None
        refs = tuple(request.reference_images)
        if refs and len(refs) > self.facts.max_reference_images:
            limit = self.facts.max_reference_images
            raise InvalidArgument(f"{len(refs)} reference images: {self.facts.family} takes "
                                  + (f"at most {limit}" if limit else "none"))
        options = GenerateOptions(seed=seed, steps=request.steps, guidance=request.guidance, width=request.width,
                                  height=request.height, negative_prompt=negative,
                                  true_cfg_scale=request.true_cfg_scale, reference_images=refs,
                                  num_frames=request.num_frames, fps=request.fps)
        problems = (media_problems(options, self.facts.family, self.facts.media, name=page_label)
                    or option_problems(options, name=page_label))
        if problems:
            raise InvalidArgument("; ".join(problems))
        return options

    def render(self, request: ConsoleRequest, progress: Callable[[int, int], None] | None = None) -> Rendered:
        r"""
        One image (or video), as `promptcast generate` makes it with the same prompt, seed, size, steps, frames, fps
        and LoRAs.

        Args:
            request ([`ConsoleRequest`]): the form's values.
            progress (`callable`, *optional*): `progress(step, steps)` after each denoising step.

        Returns:
            [`Rendered`]. Raises `InvalidArgument` (a bad value, named as the page names it), `ServerUnavailable`,
            `OutOfGpuMemory` and the other `PromptcastError`s; the console stays usable after any of them.
        """
        if not request.prompt or not request.prompt.strip():
            raise InvalidArgument(f"Prompt is empty: describe the {self.facts.media} to make")
        style = self.style(request.style)
        options = self.options_for(request, style)
        notes = ()
        if is_structured(request.prompt):
            prompt = request.prompt  # sent as compact JSON; a text template would break the object
            if style.prompt is not None:
                notes = (f"style {style.name!r}: its prompt template is not applied to a structured (JSON) prompt",)
        else:
            prompt = style.prompt_for(request.prompt)
        with self._lock:
            if self._stale and self._connect is not None:  # under the lock: no render is using the old client
                old, self.encoder, self._stale = self.encoder, self._connect(), False
                old.close()
            try:
                result, timings, item = render_one(self.node, self.encoder, prompt, options, loras=style.loras,
                                                   progress=progress)
            except ServerUnavailable:
                self._stale = True
                raise
            used = self.node.builder.used(item)
            out = self.out_dir / f"{next(self._numbers):05d}-seed{options.seed}{self.suffix}"
            path, note = media.save_output(result, out, self.node.media, fps=used.get("fps"))
            self.renders += 1
        done = replace(request, seed=options.seed, steps=used["steps"], width=used["width"], height=used["height"],
                       guidance=used["guidance"] if self.facts.guidance is not None else None,
                       num_frames=used.get("num_frames"), fps=used.get("fps"))
        return Rendered(path, done, style, timings, notes + ((note,) if note else ()))

    def encoder_line(self) -> str:
        """The encoder server's address, health and models, and the model this node renders with."""
        fresh = self._stale and self._connect is not None
        encoder = self._connect() if fresh else self.encoder  # a probe of its own: renders may use self.encoder
        try:
            return self._describe(encoder)
        finally:
            if fresh:
                encoder.close()

    def _describe(self, encoder: RemoteTextEncoder) -> str:
        try:
            states = encoder.health()
        except Exception as e:  # noqa: BLE001 - a client replaced under us, or closed: say so, never fail the page
            return f"Encoder server {encoder.target}: no answer ({e})"
        if "UNREACHABLE" in states.values():
            self._stale = True
        health = "; ".join(f"{target} {_HEALTH_WORDS.get(state, state)}" for target, state in states.items())
        models = ""
        if "SERVING" in states.values():
            try:
                models = " · models: " + ", ".join(f"{m.name} ({m.family})" for m in encoder.models())
            except Exception as e:  # noqa: BLE001 - it went away between the two calls
                models = f" · models: no answer ({e})"
        info = self.node.info
        return f"Encoder server {health}{models} · this node: {info.name} ({info.family}), plan {self.node.plan.name}"
