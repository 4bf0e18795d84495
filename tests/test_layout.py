"""The house's structure, measured: which package may import which, no import cycles (function-level imports
included), no product file over 400 lines, and a `promptcast --help` that loads neither torch nor grpc (nor Gradio)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("promptcast", "shared", "encoder_server", "denoiser_client")
# Who may import whom. The front door stands above both sides; `shared` is the floor both sides stand on.
ALLOWED = {
    "promptcast": {"promptcast", "shared", "encoder_server", "denoiser_client"},
    "encoder_server": {"encoder_server", "shared"},
    "denoiser_client": {"denoiser_client", "shared"},
    "shared": {"shared"},
}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Project modules `path` imports anywhere in its body (module level, functions, TYPE_CHECKING blocks).
    `from pkg import sub` counts as importing the submodule `pkg.sub` when there is one, else `pkg`."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a module-less attribute: its owner
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def test_each_package_imports_only_what_it_stands_on():
    wrong = sorted(f"{module} imports {target}" for module, targets in _graph().items() for target in targets
                   if target.split(".")[0] not in ALLOWED[module.split(".")[0]])
    assert wrong == []


def test_the_import_graph_has_no_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_no_product_file_is_over_400_lines():
    long = sorted(f"{path.relative_to(ROOT)}: {n}" for path in _modules().values()
                  if "_pb2" not in path.name and (n := len(path.read_text().splitlines())) > MAX_LINES)
    assert long == []


def test_help_loads_neither_torch_nor_grpc():
    probe = ("import sys\nfrom promptcast.cli import app\n"
             "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
             "heavy = sorted(m for m in ('torch', 'grpc', 'diffusers', 'transformers', 'gradio') if m in sys.modules)\n"
             "print('HEAVY', heavy)\n")
    for args in ([], ["generate"], ["serve"], ["ui"], ["cache", "stats"]):
        code = probe.replace("['--help']", repr([*args, "--help"]))
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert "HEAVY []" in result.stdout, (args, result.stdout[-500:], result.stderr[-2000:])


def test_code_states_behaviour_instead_of_citing_documents_outside_the_repository():
    hits = sorted(f"{path.relative_to(ROOT)}:{number}" for path in _modules().values()
                  for number, line in enumerate(path.read_text().splitlines(), 1)
                  if "RELIABILITY" in line or "../shared" in line or "DESIGN.md" in line)
    assert hits == []
