"""Styles of the web console: a name, LoRAs with their weights, an optional prompt template and negative prompt.

A styles file is `{"styles": [{"name": "ink", "loras": [{"path": "ink.safetensors", "weight": 0.8}],
"prompt": "{prompt}, ink wash painting", "negative_prompt": "blurry"}]}`; LoRA paths are relative to the file's
folder. `--lora-dir DIR` adds one style per `.safetensors` file in DIR (named by its stem, weight 1.0). "base" (no
LoRA, no template) always comes first. Everything here is checked before any model loads and imports no torch.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from denoiser_client.lora import LoraRef, absolute_path

logger = logging.getLogger(__name__)

BASE = "base"
PROMPT_SLOT = "{prompt}"
_STYLE_KEYS = {"name", "loras", "prompt", "negative_prompt"}
_LORA_KEYS = {"path", "weight"}


@dataclass(frozen=True)
class Style:
    r"""
    One choice of the console's "Style".

    Args:
        name (`str`): what the page shows.
        loras (`tuple[LoraRef, ...]`): LoRA files (absolute paths) and weights, active together; `()` for none.
        prompt (`str`, *optional*): a template holding `{prompt}`, which the user's prompt replaces.
        negative_prompt (`str`, *optional*): added after the user's negative prompt, where the model takes one.
    """

    name: str
    loras: tuple[LoraRef, ...] = ()
    prompt: str | None = None
    negative_prompt: str | None = None

    def prompt_for(self, prompt: str) -> str:
        """The prompt to encode: the template with `prompt` in its slot (plain replacement: braces in the prompt
        stay as they are), or `prompt` itself."""
        return prompt if self.prompt is None else self.prompt.replace(PROMPT_SLOT, prompt)

    def negative_for(self, negative_prompt: str | None) -> str | None:
        """The user's negative prompt, then the style's, joined by a comma; None when neither has one."""
        parts = [text for text in (negative_prompt, self.negative_prompt) if text]
        return ", ".join(parts) or None

    def describe(self) -> str:
        if not self.loras:
            return self.name
        mix = " + ".join(f"{Path(ref.path).stem} {ref.weight:g}" for ref in self.loras)
        return f"{self.name} ({mix})"


BASE_STYLE = Style(BASE)


class StylesError(ValueError):
    """A styles file or LoRA folder that cannot be used; the message names the file, the entry and the fix."""


def load_styles(styles_file: str | Path | None = None, lora_dir: str | Path | None = None) -> list[Style]:
    """"base", then the styles of `styles_file`, then one per `.safetensors` file of `lora_dir` (a name the styles
    file already uses is kept from the file). Every LoRA path must exist and be `.safetensors`. Raises
    `StylesError`."""
    styles = [BASE_STYLE]
    if styles_file is not None:
        styles += read_styles_file(styles_file)
    if lora_dir is not None:
        taken = {style.name for style in styles}
        for style in lora_dir_styles(lora_dir):
            if style.name in taken:
                logger.info("style %r of --lora-dir is the styles file's own style of that name", style.name)
                continue
            styles.append(style)
    return styles


def read_styles_file(path: str | Path) -> list[Style]:
    """The styles a styles file defines, each checked (see the module doc for the format)."""
    path = Path(path)
    where = f"--styles {str(path)!r}"
    if not path.is_file():
        raise StylesError(f"{where} does not exist (or is not a file)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StylesError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("styles"), list):
        raise StylesError(f'{where} must hold a JSON object {{"styles": [...]}} with a list of styles')
    styles, names = [], {BASE}
    for index, entry in enumerate(data["styles"]):
        style = parse_style(entry, f"{where}: styles[{index}]", path.parent)
        if style.name in names:
            reason = "is always the model without LoRAs" if style.name == BASE else "is used twice"
            raise StylesError(f"{where}: styles[{index}]: the name {style.name!r} {reason}: rename it")
        names.add(style.name)
        styles.append(style)
    return styles


def parse_style(entry, where: str, folder: Path) -> Style:
    """One styles-file entry -> `Style`; `StylesError` naming the entry, the field and the fix."""
    if not isinstance(entry, dict):
        raise StylesError(f'{where} must be an object like {{"name": "ink", "loras": [...]}}')
    unknown = sorted(set(entry) - _STYLE_KEYS)
    if unknown:
        raise StylesError(f"{where}: unknown field {unknown[0]!r}; a style has {', '.join(sorted(_STYLE_KEYS))}")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise StylesError(f"{where}: \"name\" must be a non-empty string")
    where = f"{where} ({name!r})"
    loras = entry.get("loras", [])
    if not isinstance(loras, list):
        raise StylesError(f'{where}: "loras" must be a list of {{"path": ..., "weight": ...}}')
    refs = tuple(parse_lora_entry(lora, f"{where}: loras[{i}]", folder) for i, lora in enumerate(loras))
    if len({ref.path for ref in refs}) != len(refs):
        raise StylesError(f"{where}: a LoRA file is listed twice: give it once, with the weight it should have")
    template = entry.get("prompt")
    if template is not None and (not isinstance(template, str) or PROMPT_SLOT not in template):
        raise StylesError(f'{where}: "prompt" must be a template holding {PROMPT_SLOT}, e.g. '
                          f'"{PROMPT_SLOT}, ink wash painting"')
    negative = entry.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise StylesError(f'{where}: "negative_prompt" must be a string')
    return Style(name.strip(), refs, template, negative or None)


def parse_lora_entry(entry, where: str, folder: Path) -> LoraRef:
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        raise StylesError(f'{where} must be an object like {{"path": "ink.safetensors", "weight": 0.8}}')
    unknown = sorted(set(entry) - _LORA_KEYS)
    if unknown:
        raise StylesError(f"{where}: unknown field {unknown[0]!r}; a LoRA has path and weight")
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not -10 <= weight <= 10:
        raise StylesError(f'{where}: "weight" {weight!r} must be a number from -10 to 10 (1.0: full strength)')
    ref = LoraRef(absolute_path(entry["path"], folder), float(weight))
    check_lora_path(ref.path, f"{where}: path {entry['path']!r}")
    return ref


def check_lora_path(path: str, where: str) -> None:
    if not Path(path).is_file():
        raise StylesError(f"{where} does not exist (looked for {path}); paths are relative to the styles file")
    if Path(path).suffix != ".safetensors":
        raise StylesError(f"{where} is not a .safetensors file; pickle formats are refused")


def lora_dir_styles(folder: str | Path) -> list[Style]:
    """One style per `.safetensors` file of `folder` (not its subfolders), by file name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StylesError(f"--lora-dir {str(folder)!r} is not a folder: pass the folder holding .safetensors LoRAs")
    files = sorted(p for p in folder.iterdir() if p.suffix == ".safetensors" and p.is_file())
    if not files:
        logger.warning("--lora-dir %s holds no .safetensors file: no style added", folder)
    return [Style(p.stem, (LoraRef(str(p.absolute()), 1.0),)) for p in files]
