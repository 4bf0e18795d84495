"""Prompt text as the encoder sees it.

FLUX.2 accepts *structured prompts*: a JSON object (scene, subjects, colour palette, camera...) given to
the text encoder as its JSON text. promptcast sends such a prompt as compact JSON (no spaces, keys in the
user's order, UTF-8 kept), so the same object always gives the same text, hence the same cache key.
"""

from __future__ import annotations

import json
from typing import Any


def prompt_text(prompt: Any) -> str:
    """A plain string as is; a dict/list (or a string holding a JSON object) as compact JSON text."""
    if isinstance(prompt, (dict, list)):
        return json.dumps(prompt, separators=(",", ":"), ensure_ascii=False)
    if not isinstance(prompt, str):
        raise ValueError(f"a prompt must be text or a JSON object, not {type(prompt).__name__}")
    stripped = prompt.strip()
    if stripped.startswith("{") and stripped.endswith("}"):
        try:
            return prompt_text(json.loads(stripped))
        except json.JSONDecodeError:
            pass  # braces in ordinary text: send it untouched
    return prompt
