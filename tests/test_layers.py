"""The package's folders are its layers: a module imports only from layers below its own (or from
its own folder), and no import cycle exists, imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import vqkit

PACKAGE = Path(vqkit.__file__).parent
# Each layer may import the ones with a lower rank. Within a folder, any order without cycles.
RANKS = {
    "errors": 0,
    "files": 1,
    "config": 1,
    "limits": 1,
    "audio": 2,
    "nn": 2,
    "data": 3,
    "checkpoint": 3,
    "run": 4,
    "codec": 5,
    "train": 5,
    "eval": 6,
    "tools": 7,
    "": 8,  # vqkit/__init__.py: the public names
    "parser": 9,
    "cli": 10,
    "__main__": 11,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    """``vqkit.data.cache`` -> ``data``; ``vqkit.cli`` -> ``cli``; ``vqkit`` -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports() -> dict[str, set[str]]:
    """Every vqkit module and the vqkit modules it imports, anywhere in its body."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_every_folder_is_a_known_layer() -> None:
    assert {layer(m) for m in imports()} == set(RANKS)


def test_modules_import_only_lower_layers() -> None:
    problems = [
        f"{module} ({layer(module)}) imports {target} ({layer(target)})"
        for module, targets in imports().items()
        for target in targets
        if layer(target) != layer(module) and RANKS[layer(target)] >= RANKS[layer(module)]
    ]
    assert not problems, "\n".join(sorted(problems))


def test_there_is_no_import_cycle() -> None:
    graph = imports()
    state: dict[str, int] = {}  # 1 on the path, 2 done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target] if target in path else [node, target]
            if target not in state and (cycle := visit(target, [*path, target])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            assert cycle is None, " -> ".join(cycle)
