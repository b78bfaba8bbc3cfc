"""The shape of the `qwen` package: its modules import each other in one direction only.

A cycle (also through an import inside a function) means two modules each need the other: neither can be read, tested
or changed alone, and the loser of the import race sees a half-initialized module. Imports inside functions are for
optional packages (peft, gptqmodel, the hub client), never for a sibling module, which would only hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "qwen"


def sibling_imports(path: Path) -> tuple[set[str], list[str]]:
    """The sibling modules `path` imports anywhere, and a description of each one imported inside a function."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    siblings = {module.stem for module in PACKAGE.glob("*.py")}
    imported: set[str] = set()
    local: list[str] = []

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            names: list[str] = []
            if isinstance(child, ast.ImportFrom):
                if child.level == 1 and child.module:  # from .x import y
                    names = [child.module.split(".")[0]]
                elif child.level == 1:  # from . import x
                    names = [alias.name for alias in child.names]
                elif child.level == 0 and child.module and child.module.split(".")[0] == "qwen":
                    parts = child.module.split(".")
                    names = [parts[1]] if len(parts) > 1 else [alias.name for alias in child.names]
            elif isinstance(child, ast.Import):
                names = [alias.name.split(".")[1] for alias in child.names
                         if alias.name.startswith("qwen.") and alias.name.count(".") >= 1]
            for name in names:
                if name in siblings and name != path.stem:
                    imported.add(name)
                    if function is not None:
                        local.append(f"{path.name}: {function}() imports {name}")
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            visit(child, inner)

    visit(tree, None)
    return imported, local


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    graph, local = {}, []
    for path in sorted(PACKAGE.glob("*.py")):
        graph[path.stem], found = sibling_imports(path)
        local += found
    return graph, local


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return groups


def test_the_package_has_no_import_cycle() -> None:
    graph, _ = import_graph()
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    # The check itself, on a graph with the cycle this package once had.
    assert cycles({"gptq": {"loading"}, "loading": {"gptq"}, "lora": {"loading", "gptq"}}) == [["gptq", "loading"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_sibling_module_is_imported_inside_a_function() -> None:
    _, local = import_graph()
    assert local == []


def test_checkpoint_folders_are_read_below_the_modules_that_use_them() -> None:
    graph, _ = import_graph()
    assert not graph["checkpoint_folder"] & {"loading", "gptq", "lora", "convert", "device_map", "server", "engine"}
    for user in ("loading", "gptq", "lora", "convert"):
        assert "checkpoint_folder" in graph[user], user


def test_the_engine_uses_only_the_models_declared_interface() -> None:
    # The engine asks for logits through `logits_at` and reads the config; reaching into `model.transformer` or the
    # LM head would tie it to the model's insides (and to what it writes onto caches).
    tree = ast.parse((PACKAGE / "engine.py").read_text(encoding="utf-8"))
    used = {
        node.attr for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, (ast.Attribute, ast.Name))
        and (node.value.attr if isinstance(node.value, ast.Attribute) else node.value.id) == "model"
    }
    assert used <= {"config", "eval", "parameters", "logits_at"}, used
