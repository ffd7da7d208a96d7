"""Imports run one way, checked on the source (no import is executed).

Between the three parts: build -> backend, and client -> nothing but itself,
except kvtriton.client.cli, the `kvtriton` command that dispatches to all
three. Inside backend the layers run downward only (BACKEND_LAYERS), so a
reader knows from a file's folder what it may touch.

Every `import` and `from ... import` counts, at module level or inside a
function (a lazy import is still a dependency). Imports through
importlib with a computed name are not seen.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("backend", "build", "client")  # folder X is the package kvtriton.X

# Backend layers, top first. A layer imports its own modules and those of the layers below it. The
# layers of one tier do not import each other: the Triton adapter and the entrypoints both sit on the
# engine, and launching tritonserver needs nothing of the adapter that runs inside it.
# distributed: the tensor-parallel process group and its collectives, which the models' parallel layers call.
BACKEND_LAYERS = (("entrypoints", "triton"), ("engine",), ("runners",), ("models",), ("attention",), ("kernels",),
                  ("distributed",))
# Backend-wide modules every layer may import; they import no layer. config: the engine's config, which
# the runners (and the Triton adapter and entrypoints) receive, as vllm/config.py is vLLM's.
BACKEND_SHARED = ("kvtriton.backend", "kvtriton.backend.config")
CLIENT_DISPATCHER = "kvtriton.client.cli"


def module_name(path: Path) -> str:
    """backend/engine/scheduler.py -> kvtriton.backend.engine.scheduler; a package's __init__ -> the package."""
    name = ".".join(("kvtriton", *path.relative_to(ROOT).with_suffix("").parts))
    return name.removesuffix(".__init__")


def source_files() -> list[Path]:
    return sorted(p for part in PARTS for p in (ROOT / part).rglob("*.py") if "__pycache__" not in p.parts)


def imports(path: Path, modules: set[str]) -> list[tuple[int, str]]:
    """(line, imported module) of every import in the file; relative imports resolved.

    `from pkg import name` imports pkg.name where that is a module of the tree, else pkg.
    """
    importer = module_name(path)
    package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if sub in modules else base))
    return found


def _backend_layer(module: str) -> str:
    """The layer (folder) of a backend module; 'shared' for BACKEND_SHARED."""
    if module in BACKEND_SHARED:
        return "shared"
    layer = module.split(".")[2]
    if not any(layer in tier for tier in BACKEND_LAYERS):
        raise ValueError(f"{module} is in no backend layer; add its folder to BACKEND_LAYERS")
    return layer


def _tier(layer: str) -> int:
    return next(i for i, tier in enumerate(BACKEND_LAYERS) if layer in tier)


def violation(importer: str, imported: str) -> str | None:
    """Why `importer` may not import `imported`, or None where the edge runs the right way."""
    if not imported.startswith("kvtriton."):
        return None
    src, dst = importer.split(".")[1], imported.split(".")[1]
    if src == dst == "backend":
        src_layer, dst_layer = _backend_layer(importer), _backend_layer(imported)
        if dst_layer == "shared" or src_layer == dst_layer:
            return None
        if src_layer == "shared":
            return "backend-wide modules import no layer (every layer imports them)"
        if _tier(dst_layer) > _tier(src_layer):
            return None
        below = [layer for tier in BACKEND_LAYERS[_tier(src_layer) + 1 :] for layer in tier]
        return f"backend layer {src_layer} may import only its own modules, {', '.join(below + ['backend.config'])}"
    if src == "client" and dst != "client" and importer != CLIENT_DISPATCHER:
        return f"the client talks to servers; only {CLIENT_DISPATCHER} reaches into backend and build"
    if src == "backend" and dst != "backend":
        return "backend is imported by build and the client, never the other way"
    if src == "build" and dst == "client":
        return "build sits on backend, not on the client"
    return None


def test_imports_run_one_way():
    files = source_files()
    modules = {module_name(p) for p in files}
    found = []
    for path in files:
        for line, imported in imports(path, modules):
            why = violation(module_name(path), imported)
            if why:
                found.append(f"{path.relative_to(ROOT)}:{line}: imports {imported}: {why}")
    assert not found, "imports against the layering:\n" + "\n".join(found)


def test_backend_tree_shows_the_layers():
    """backend/ holds the layer folders and nothing else but __init__.py and the backend-wide config.py."""
    backend = ROOT / "backend"
    loose = sorted(p.name for p in backend.glob("*.py") if p.name not in ("__init__.py", "config.py"))
    assert not loose, f"modules at backend/'s top level: {loose}; put each in its layer's folder"
    folders = {p.name for p in backend.iterdir() if p.is_dir() and p.name != "__pycache__"}
    layers = {layer for tier in BACKEND_LAYERS for layer in tier}
    assert folders == layers, f"folders not in BACKEND_LAYERS: {sorted(folders - layers)}; " \
                              f"layers without a folder: {sorted(layers - folders)}"


@pytest.mark.parametrize("importer, imported, allowed", [
    ("kvtriton.backend.engine.llm_engine", "kvtriton.backend.runners.factory", True),
    ("kvtriton.backend.runners.torch_runner", "kvtriton.backend.kernels.pdl", True),
    ("kvtriton.backend.runners.torch_runner", "kvtriton.backend.config", True),
    ("kvtriton.backend.runners.step_input", "kvtriton.backend.engine.sequence", False),
    ("kvtriton.backend.attention.paged", "kvtriton.backend.models.llama", False),
    ("kvtriton.backend.entrypoints.tritonserver", "kvtriton.backend.triton.model", False),
    ("kvtriton.backend.triton.model", "kvtriton.backend.entrypoints.serve", False),
    ("kvtriton.backend.config", "kvtriton.backend.models.dtypes", False),
    ("kvtriton.backend.models.loader", "kvtriton.build.repository", False),
    ("kvtriton.build.model_builder", "kvtriton.backend.runners.manifest", True),
    ("kvtriton.build.cli", "kvtriton.client.errors", False),
    ("kvtriton.client.bench_cmd", "kvtriton.backend.config", False),
    ("kvtriton.client.cli", "kvtriton.backend.entrypoints.serve", True),
    ("kvtriton.client.api", "torch", True),
])
def test_layer_rules(importer, imported, allowed):
    assert (violation(importer, imported) is None) == allowed


def test_relative_and_lazy_imports_are_seen(tmp_path, monkeypatch):
    monkeypatch.setitem(globals(), "ROOT", tmp_path)  # module_name() maps paths under ROOT
    runners = tmp_path / "backend" / "runners"
    runners.mkdir(parents=True)
    src = runners / "x.py"
    src.write_text("from . import y\nfrom ..engine import sequence\n\ndef f():\n    import kvtriton.backend.triton\n")
    modules = {"kvtriton.backend.runners.y", "kvtriton.backend.engine.sequence"}
    assert sorted(imports(src, modules)) == [(1, "kvtriton.backend.runners.y"), (2, "kvtriton.backend.engine.sequence"),
                                     (5, "kvtriton.backend.triton")]
