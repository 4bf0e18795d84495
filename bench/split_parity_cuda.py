"""Where a CUDA split image parts from the plain pipeline's: the server's embeddings against `encode_prompt` (one
prompt, and a prompt batched with its negative), and the node's denoising given the plain pipeline's own embeddings.

    python bench/split_parity_cuda.py --out bench/results/split_parity_cuda.json    # CUDA, about a minute
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

PROMPT = "a fox on a gpu"


def run(family: str, root: pathlib.Path, device: str) -> dict:
    import diffusers

    from denoiser_client import RemoteTextEncoder
    from denoiser_client.pipeline import load_denoiser, run_pipeline
    from encoder_server.server import BackgroundServer, ModelSpec, ServerConfig
    from promptcast.tiny_models import make_tiny_model
    from shared.families import FAMILIES

    model = make_tiny_model(root / family, family)
    length = 32 if family in ("flux1", "sd3", "qwen-image") else 64
    cls = getattr(diffusers, FAMILIES[family].pipeline)
    plain = cls.from_pretrained(model, dtype=torch.bfloat16).to(device)
    plain.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=2, width=64, height=64, max_sequence_length=length, output_type="np")
    out = {}
    with torch.no_grad():
        mine = plain.encode_prompt(PROMPT, device=device, max_sequence_length=length) if family == "flux1" else None
    config = ServerConfig([ModelSpec(str(model), name="tiny")], port=0, device=device, cache_dir=None)
    with BackgroundServer(config) as server, RemoteTextEncoder(server.address, timeout=60) as enc:
        one = enc.encode([PROMPT], max_sequence_length=length)
        two = enc.encode([PROMPT + " again", ""], max_sequence_length=length)  # batched with a negative
        alone = enc.encode([PROMPT + " again"], max_sequence_length=length)
    if mine is not None:
        out["server_equals_encode_prompt"] = {"prompt_embeds": torch.equal(one["prompt_embeds"].cpu(), mine[0].cpu()),
                                              "pooled": torch.equal(one["pooled_prompt_embeds"].cpu(), mine[1].cpu())}
    first = lambda e: e[0] if isinstance(e, list) else e[:1]  # noqa: E731
    out["batched_with_negative_equals_alone"] = {k: torch.equal(first(two[k]).cpu(), first(alone[k]).cpu())
                                                 for k in alone if not k.endswith("mask")}
    expected = plain(PROMPT, generator=torch.Generator("cpu").manual_seed(3), **call).images
    node, _ = load_denoiser(str(model), device=device, dtype=torch.bfloat16)
    node.set_progress_bar_config(disable=True)
    if mine is not None:
        given = run_pipeline(node, {"prompt_embeds": mine[0], "pooled_prompt_embeds": mine[1]},
                             generator=torch.Generator("cpu").manual_seed(3), guidance_scale=3.5, **call)
        out["node_with_plain_embeddings_equals_plain"] = bool(np.array_equal(given, expected))
        with_plain_pipe = plain(prompt_embeds=mine[0], pooled_prompt_embeds=mine[1],
                                generator=torch.Generator("cpu").manual_seed(3), **call).images
        out["plain_with_its_embeddings_equals_plain"] = bool(np.array_equal(with_plain_pipe, expected))
        server_image = run_pipeline(node, {k: v for k, v in one.items()},
                                    generator=torch.Generator("cpu").manual_seed(3), guidance_scale=3.5, **call)
        out["node_with_server_embeddings_equals_plain"] = bool(np.array_equal(server_image, expected))
        out["max_abs_pixel_diff"] = float(np.abs(server_image - expected).max())
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench/results/split_parity_cuda.json"))
    parser.add_argument("--families", nargs="+", default=["flux1", "sd3", "z-image"])
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "families": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            report["families"][family] = run(family, pathlib.Path(tmp), device)
            print(family, json.dumps(report["families"][family]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
