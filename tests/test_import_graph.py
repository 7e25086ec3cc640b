"""The package's own import graph is acyclic (every import statement counts, also those inside functions)."""
from __future__ import annotations

import ast
import pathlib

import cpoc_kernels

PACKAGE_DIR = pathlib.Path(cpoc_kernels.__file__).parent


def module_names() -> dict[str, pathlib.Path]:
    names = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        parts = ("cpoc_kernels",) + path.relative_to(PACKAGE_DIR).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imports_of(name: str, path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
    """The package modules ``name`` imports (the most specific existing module of each import)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def add(target: str) -> None:
        while target and target not in modules:  # `from a.b import f`: f is no module, a.b is
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("cpoc_kernels"):
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if not module.startswith("cpoc_kernels"):
                continue
            for alias in node.names:
                add(f"{module}.{alias.name}")
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def package_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_import_graph_is_acyclic():
    cycle = find_cycle(package_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_walk_sees_imports():
    """The walk finds known edges (relative, absolute and function-level imports), and finds a planted circle."""
    graph = package_graph()
    assert "cpoc_kernels.integrations.hf.continuous.engine" in graph["cpoc_kernels.integrations.hf.continuous.poc"]
    assert "cpoc_kernels.integrations.hf.runner" in graph["cpoc_kernels.integrations.hf.continuous.engine"]
    assert "cpoc_kernels.integrations.hf.mixed_bench" in graph["cpoc_kernels.cli.mixed"]  # inside a function
    graph["cpoc_kernels.integrations.hf.runner"] = graph["cpoc_kernels.integrations.hf.runner"] | {"cpoc_kernels.cli.mixed"}
    assert find_cycle(graph) is not None
