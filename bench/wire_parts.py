"""The CPU parts of one FLUX.1 embedding's trip (4 MiB of bf16), each timed alone on this host: the CRC32 that
packing and the client's check each run (zlib's, and the
one the wire uses: zlib-ng's where installed), the one copy of each, packing (`pack_tensors`) and the client's
reassembly (`EmbeddingAssembler`), beside a plain memcpy of the same bytes.

    python bench/wire_parts.py --out bench/results/wire_parts.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import sys
import time
import zlib

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared import parallel_copy, tensor_codec  # noqa: E402
from shared.tensor_codec import EmbeddingAssembler, decode_response, pack_embedding, pack_tensors, tensor_bytes  # noqa: E402


def timed(fn, iters: int = 60) -> float:
    for _ in range(5):
        fn()
    seconds = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return round(1000 * statistics.median(seconds), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "bench/results/wire_parts.json")
    args = parser.parse_args()
    tensors = {"prompt_embeds": torch.randn(512, 4096).to(torch.bfloat16),
               "pooled_prompt_embeds": torch.randn(768).to(torch.bfloat16)}
    view = tensor_bytes(tensors["prompt_embeds"])
    target = bytearray(view.nbytes)
    messages = pack_embedding(0, "key", 1, tensors)

    def reassemble():
        assembler = EmbeddingAssembler(1)
        for message in messages:
            assembler.feed(decode_response(message))
        return assembler.result()

    def copy():
        target[:] = view

    parts = {"memcpy_4mib": timed(copy), "crc32_zlib_4mib": timed(lambda: zlib.crc32(view)),
             "crc32_wire_4mib": timed(lambda: tensor_codec.crc32(view)),
             "torch_clone_4mib": timed(lambda: tensors["prompt_embeds"].clone()),
             "pack_tensors": timed(lambda: pack_tensors(tensors)), "client_reassemble": timed(reassemble)}
    report = {"benchmark": "wire_parts", "python": platform.python_version(), "zlib": zlib.ZLIB_RUNTIME_VERSION,
              "wire_crc32": parallel_copy._crc32.__module__,
              "processor": platform.processor() or platform.machine(), "bytes": view.nbytes, "median_ms": parts,
              "crc32_zlib_gb_per_s": round(view.nbytes / parts["crc32_zlib_4mib"] / 1e6, 2),
              "crc32_wire_gb_per_s": round(view.nbytes / parts["crc32_wire_4mib"] / 1e6, 2),
              "memcpy_gb_per_s": round(view.nbytes / parts["memcpy_4mib"] / 1e6, 2)}
    print(json.dumps(report, indent=2), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
