"""The package's import graph has no cycle (ARCHITECTURE §4), function-level imports included.

A lazy import inside a function that dodges a cycle at import time is still a cycle of the design:
the lower module then depends on the upper one. This test reads every module's source with `ast`
(nothing is imported), resolves relative imports, and fails naming the cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

import cpkernels

PACKAGE = "cpkernels"
ROOT = Path(cpkernels.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    """{dotted name: file} of every .py module of the package (a package is its __init__.py)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = (PACKAGE,) + path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _bound_names(path: Path) -> set[str]:
    """The names a package's __init__ binds at its top level (imports, defs, assignments)."""
    names = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that `name` imports anywhere in its source (module or function level)."""
    here = name if _is_package(path) else name.rpartition(".")[0]  # the package relative imports start from
    found = set()

    def add(target: str) -> None:
        # The nearest existing module: "cpkernels.io.atomic_write" is cpkernels.io; anything not a .py
        # module of the package (an extension such as _C, a third-party module) is no edge.
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target.split(".")[0] == PACKAGE and target != name:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[:len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            if origin.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                # `from . import task_ids` imports the submodule; `from .. import cp_layers` takes a name
                # the package's __init__ binds, an upward edge when the importer sits inside the package;
                # `from . import _C` is neither (a compiled extension): no edge.
                sub = f"{origin}.{alias.name}"
                if sub in modules:
                    add(sub)
                elif origin not in modules or not _is_package(modules[origin]) \
                        or alias.name in _bound_names(modules[origin]) or alias.name == "*":
                    add(origin)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            if node.args[0].value.split(".")[0] == PACKAGE:  # importlib.import_module("cpkernels.sparsity")
                add(node.args[0].value)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), as a closed path."""
    index, low, stack, on_stack, sccs = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                sccs.append(set(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for scc in sccs:
        # The shortest path back to the component's first module, through the component only.
        start = min(scc)
        paths, seen = {start: [start]}, {start}
        queue = [start]
        while queue:
            v = queue.pop(0)
            for w in sorted(graph[v] & scc):
                if w == start:
                    cycles.append(paths[v] + [start])
                    queue = []
                    break
                if w not in seen:
                    seen.add(w)
                    paths[w] = paths[v] + [w]
                    queue.append(w)
    return cycles


def test_the_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert "cpkernels.reference" in graph["cpkernels.ops"]            # from .reference import ...
    assert "cpkernels.task_ids" in graph["cpkernels.ops"]             # from . import task_ids
    assert "cpkernels._triton.forward" in graph["cpkernels.ops"]      # function level: from ._triton import forward
    assert "cpkernels.sparsity" in graph["cpkernels.train.loop"]      # importlib.import_module("cpkernels.sparsity")
    assert "cpkernels" in graph["cpkernels.eval.quality"]             # from .. import cp_layers (the __init__)
    assert graph["cpkernels._ext"] == set()                           # from . import _C: an extension, no edge


def test_find_cycles_names_a_cycle_hidden_in_a_function():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles (a lazy import is still one, ARCHITECTURE §4):\n" + "\n".join(
        " -> ".join(c) for c in cycles)
