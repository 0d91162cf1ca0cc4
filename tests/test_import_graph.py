"""No import circle inside `peft_glider/`: every import counts, at module level or inside a function, but those under
`if TYPE_CHECKING:` (never run). Importing `a.b.c` also runs the package `a.b`'s `__init__` (unless the importer lives
in `a.b`, which then runs already); the root package is left out (it imports everything, to register the method and
export the public names)."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import peft_glider

PACKAGE = Path(peft_glider.__file__).parent
ROOT = "peft_glider"


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file, for every module and package of the package at `root`."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = [ROOT, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node that runs (not under `if TYPE_CHECKING:`)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules its imports run (with the packages above them, but the root)."""
    modules = module_names(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [source] + [f"{source}.{alias.name}" for alias in node.names]
            for target in targets:
                parts = target.split(".")
                for end in range(2, len(parts) + 1):  # the packages on the way, then the module itself
                    prefix = ".".join(parts[:end])
                    # a module's own packages are running already when it runs: no edge to them
                    if prefix in modules and prefix != name and not name.startswith(prefix + "."):
                        graph[name].add(prefix)
    return graph


def import_circles(root: Path) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    graph = import_graph(root)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_the_package_has_no_import_circle():
    assert import_circles(PACKAGE) == []


def test_a_function_level_import_that_closes_a_circle_is_found(tmp_path):
    copy = tmp_path / ROOT
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.so", "csrc"))
    assert import_circles(copy) == []
    routing = copy / "routing.py"  # the layer imports the routing maths; the maths now import the layer back
    routing.write_text(routing.read_text() + "\n\ndef _late():\n    from .layer import GliderLinear\n")
    circles = import_circles(copy)
    assert any({f"{ROOT}.routing", f"{ROOT}.layer"} <= set(circle) for circle in circles), circles


def test_an_import_under_type_checking_is_no_circle(tmp_path):
    copy = tmp_path / ROOT
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.so", "csrc"))
    routing = copy / "routing.py"
    routing.write_text(
        routing.read_text() + "\n\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .layer import GliderLinear\n"
    )
    assert import_circles(copy) == []


def test_the_layer_never_reaches_the_library_or_the_residency():
    """A layer receives what it holds (its slots); it imports neither the library nor the residency, not even for
    type hints, and nothing it imports does."""
    graph = import_graph(PACKAGE)
    reached, todo = set(), [f"{ROOT}.layer"]
    while todo:
        for successor in graph[todo.pop()] - reached:
            reached.add(successor)
            todo.append(successor)
    assert not reached & {f"{ROOT}.library", f"{ROOT}.residency", f"{ROOT}.model"}, sorted(reached)
    tree = ast.parse((PACKAGE / "layer.py").read_text(encoding="utf-8"))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"library", "residency", "model"}, imported
