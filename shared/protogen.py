"""Regenerate the gRPC stubs from `proto/`: `python -m shared.protogen [OUT_ROOT]`.

The one command that produces `shared/promptcast/v1/*_pb2*.py` (never edit them by hand). The
proto root is mapped to the virtual folder `shared/`, so the generated modules import each other
as `shared.promptcast.v1` and the installed package imports with no path tricks.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_FILES = ["promptcast/v1/encoder.proto"]


def generate(out_root: Path = ROOT) -> list[Path]:
    """Write the stubs under `out_root/shared/` and return the generated files."""
    from grpc_tools import protoc

    out_root.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-Ishared={ROOT / 'proto'}", f"--python_out={out_root}", f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}", *[f"shared/{p}" for p in PROTO_FILES]]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    package_dir = out_root / "shared" / "promptcast"
    for folder in (package_dir, package_dir / "v1"):
        (folder / "__init__.py").touch()
    return sorted(package_dir.rglob("*_pb2*.py*"))


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT):
        print(path)
