"""The CLI's split image on CUDA against the plain pipeline's, the plain one made before and after the CLI ran in
this process, and in a process of its own: does running the node change what the plain pipeline computes?

    python bench/split_parity_cli_cuda.py --out bench/results/split_parity_cli_cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

DEVICE = os.environ.get("PROMPTCAST_PARITY_DEVICE", "cuda")
PLAIN = """
import sys, numpy as np, torch, diffusers
pipe = getattr(diffusers, sys.argv[1]).from_pretrained(sys.argv[2], dtype=torch.bfloat16).to(sys.argv[5])
pipe.set_progress_bar_config(disable=True)
image = pipe(prompt="a fox on a gpu", num_inference_steps=2, width=64, height=64, max_sequence_length=int(sys.argv[3]),
             generator=torch.Generator("cpu").manual_seed(3)).images[0]
np.save(sys.argv[4], np.asarray(image))
"""


def plain(cls, model, length):
    import diffusers

    pipe = getattr(diffusers, cls).from_pretrained(model, dtype=torch.bfloat16).to(DEVICE)
    pipe.set_progress_bar_config(disable=True)
    return np.asarray(pipe(prompt="a fox on a gpu", num_inference_steps=2, width=64, height=64,
                           max_sequence_length=length, generator=torch.Generator("cpu").manual_seed(3)).images[0])


def run(family, root):
    from encoder_server.server import BackgroundServer, ModelSpec, ServerConfig
    from promptcast.cli import main
    from promptcast.tiny_models import make_tiny_model
    from shared.families import FAMILIES

    model = make_tiny_model(root / family, family)
    cls, length = FAMILIES[family].pipeline, 32
    before = plain(cls, model, length)
    fresh = root / f"{family}-fresh.npy"
    subprocess.run([sys.executable, "-c", PLAIN, cls, str(model), str(length), str(fresh), DEVICE], check=True)
    config = ServerConfig([ModelSpec(str(model), name="tiny")], port=0, device=DEVICE, dtype="bf16", cache_dir=None)
    out = root / f"{family}.png"
    with BackgroundServer(config) as server:
        try:
            main(["generate", "--encoder", server.address, "--model", str(model), "--out", str(out), "--device",
                  DEVICE, "--dtype", "bf16", "--max-sequence-length", str(length), "--steps", "2", "--width", "64", "--height", "64",
                  "--seed", "3", "--prompt", "a fox on a gpu"])
        except SystemExit:
            pass
        during = plain(cls, model, length)
    after = plain(cls, model, length)
    node = np.asarray(Image.open(out))
    other = np.load(fresh)
    eq = lambda a, b: bool(np.array_equal(a, b))  # noqa: E731
    return {"node_eq_plain_before": eq(node, before), "node_eq_plain_during_server": eq(node, during),
            "node_eq_plain_after": eq(node, after), "node_eq_plain_own_process": eq(node, other),
            "plain_before_eq_after": eq(before, after), "plain_before_eq_own_process": eq(before, other),
            "max_diff_node_before": int(np.abs(node.astype(int) - before.astype(int)).max())}


def main_():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--families", nargs="+", default=["flux1", "sd3"])
    args = parser.parse_args()
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            report[family] = run(family, pathlib.Path(tmp))
            print(family, json.dumps(report[family]), flush=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main_()
