"""Imports run one way through the house: no two parts of lctk import each other, lazy imports inside functions
included. farm-studio draws the same from the folders, but cannot see that kernels/ and evals/ are lctk.kernels and
lctk.evals; this walk reads every import with that mapping."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAPPED = {"lctk": ROOT / "lctk", "lctk.kernels": ROOT / "kernels", "lctk.evals": ROOT / "evals"}


def part_of(module: str) -> str | None:
    """lctk.data.store -> lctk.data; lctk.recipe -> lctk.recipe; the package root `lctk` (its public re-exports)
    and anything outside lctk -> None."""
    names = module.split(".")
    return ".".join(names[:2]) if names[0] == "lctk" and len(names) > 1 else None


def module_files():
    for package, folder in MAPPED.items():
        for path in folder.rglob("*.py"):
            relative = path.relative_to(folder).with_suffix("").parts
            if package == "lctk" and relative[0] in ("kernels", "evals"):
                continue
            yield ".".join((package, *relative)).removesuffix(".__init__"), path


def imported_modules(tree: ast.AST, module: str) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                base = ".".join(module.split(".")[: -node.level] + ([base] if base else []))
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return found


def part_graph() -> dict[str, set[str]]:
    files = dict(module_files())
    parts = {part_of(module) for module in files} - {None}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        source = part_of(module)
        if source is None:
            continue
        targets = {part_of(name) for name in imported_modules(ast.parse(path.read_text()), module)}
        graph.setdefault(source, set()).update(t for t in targets & parts if t != source)  # `from lctk import X`: no part
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one part (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_walk_sees_the_mapped_packages():
    graph = part_graph()
    assert {"lctk.kernels", "lctk.evals", "lctk.models", "lctk.data", "lctk.tasks"} <= set(graph)
    assert "lctk.kernels" in graph["lctk.models"] and "lctk.tasks" in graph["lctk.evals"]


def test_no_two_parts_import_each_other():
    graph = part_graph()
    assert cycles(graph) == []
    assert "lctk.evals" not in graph["lctk.data"] and "lctk.data" not in graph["lctk.evals"]


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
