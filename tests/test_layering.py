"""The package's layers look only down: the loops (avatar.pipeline) import neither the export
nor the batch above them, and the batch package has no import cycle. Read from the sources
with ast (every import statement, also those inside functions), so nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BELOW_THE_BATCH = ("avatar.pipeline", "avatar.export", "avatar.guidance", "avatar.render", "avatar.fields",
                   "avatar.ops", "avatar.prior")


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Every module an import statement of ``path`` names (``from a import b`` gives ``a`` and
    ``a.b``: b may be a submodule), relative imports resolved."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def modules_of(package: str, root: Path = ROOT) -> dict[str, Path]:
    folder = root / package.replace(".", "/")
    return {module_name(p, root): p for p in sorted(folder.rglob("*.py"))}


def is_under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def import_graph(package: str, root: Path = ROOT) -> dict[str, set[str]]:
    """``module -> the modules of the same package it imports`` (the package's own
    ``__init__``, which only re-exports lazily, left out)."""
    modules = modules_of(package, root)
    return {name: {m for m in imported_modules(path, root) if m in modules and m not in (name, package)}
            for name, path in modules.items() if name != package}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as ``[a, b, ..., a]``), or None (depth-first search for a back edge)."""
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*trail[trail.index(nxt):], nxt] if nxt in trail else [*trail, nxt]
            if nxt not in state and (cycle := visit(nxt, [*trail, nxt])):
                return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [node])):
            return cycle
    return None


def test_the_pipeline_imports_neither_the_export_nor_the_batch():
    modules = modules_of("avatar.pipeline")
    assert "avatar.pipeline.generate" in modules
    upward = {name: sorted(m for m in imported_modules(path)
                           if is_under(m, "avatar.export") or is_under(m, "avatar.batch"))
              for name, path in modules.items()}
    assert {name: found for name, found in upward.items() if found} == {}


def test_nothing_below_the_batch_imports_it():
    for package in BELOW_THE_BATCH:
        for name, path in modules_of(package).items():
            assert not any(is_under(m, "avatar.batch") for m in imported_modules(path)), name


def test_the_batch_modules_have_no_import_cycle():
    graph = import_graph("avatar.batch")
    assert {"avatar.batch.task", "avatar.batch.journal", "avatar.batch.local", "avatar.batch.ray_runner"} <= set(graph)
    assert {"avatar.batch.task", "avatar.batch.journal"} <= graph["avatar.batch.ray_runner"]
    assert find_cycle(graph) is None, find_cycle(graph)


def test_the_checks_see_imports_inside_functions_relative_imports_and_cycles(tmp_path):
    pkg = tmp_path / "avatar" / "batch"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from avatar.batch import b\n")
    (pkg / "b.py").write_text("def f():\n    from .c import x\n")
    (pkg / "c.py").write_text("import avatar.batch.a\n")
    (tmp_path / "avatar" / "pipeline").mkdir()
    (tmp_path / "avatar" / "pipeline" / "loop.py").write_text("def g():\n    from ..export import run\n")
    graph = import_graph("avatar.batch", tmp_path)
    assert graph == {"avatar.batch.a": {"avatar.batch.b"}, "avatar.batch.b": {"avatar.batch.c"},
                     "avatar.batch.c": {"avatar.batch.a"}}
    assert find_cycle(graph) == ["avatar.batch.a", "avatar.batch.b", "avatar.batch.c", "avatar.batch.a"]
    assert find_cycle({"x": {"y"}, "y": set()}) is None
    loop = modules_of("avatar.pipeline", tmp_path)["avatar.pipeline.loop"]
    assert "avatar.export" in imported_modules(loop, tmp_path)
