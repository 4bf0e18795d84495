"""What the console tests share: tiny LoRA files with their styles file, and the image `promptcast generate` makes."""

from __future__ import annotations

import json
from pathlib import Path

from denoiser_client.generate import generate
from denoiser_client.lora import LoraRef
from denoiser_client.options import GenerateOptions
from test_lora import make_lora_files

PROMPT = "a red fox in the snow"
CALL = dict(steps=2, width=32, height=32, guidance=3.5)  # what every console test asks for


def make_styles(tiny_flux1, folder: Path) -> dict:
    """Two LoRAs of the tiny FLUX.1 transformer, one made for another transformer, and a styles file using them:
    "ink" (one LoRA, weight 0.8, a prompt template), "mix" (both, 0.5 and 0.7) and "broken" (the wrong one)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = make_lora_files(tiny_flux1, folder)
    ink, film, wrong = files["ink"], files["film"], files["wrong"]
    styles = folder / "styles.json"
    styles.write_text(json.dumps({"styles": [
        {"name": "ink", "loras": [{"path": "ink.safetensors", "weight": 0.8}], "prompt": "{prompt}, ink wash"},
        {"name": "mix", "loras": [{"path": "ink.safetensors", "weight": 0.5}, {"path": "film.safetensors",
                                                                                 "weight": 0.7}]},
        {"name": "broken", "loras": [{"path": "other-model.safetensors", "weight": 1.0}]},
    ]}))
    loras = {"ink": (LoraRef(ink, 0.8),), "mix": (LoraRef(ink, 0.5), LoraRef(film, 0.7)), "base": ()}
    prompts = {"ink": "{prompt}, ink wash"}
    return {"file": styles, "loras": loras, "prompts": prompts, "wrong": wrong}


def generated(encoder, node, styles: dict, style: str, seed: int, out: Path, prompt: str = PROMPT, **call) -> bytes:
    """The PNG bytes `promptcast generate` writes for `style` (its LoRAs as `--lora PATH:WEIGHT`, its template
    filled in by hand), on a node of its own."""
    text = styles["prompts"].get(style, "{prompt}").replace("{prompt}", prompt)
    options = GenerateOptions(seed=seed, **{**CALL, **call})
    path, _ = generate(encoder, str(node.source), text, out, options=options, pipe=node, progress=False,
                       loras=styles["loras"][style])
    return Path(path).read_bytes()
