"""The import graph of the package: no module of kroncompress imports itself through others (no import
circle), and private names (`_x`) stay in the file that defines them, but for the few listed with a reason.

Edges are read with `ast` from every module of kroncompress/, so nothing is imported to check them:

- every `import` / `from ... import` counts, at module level AND inside functions (a lazy import is still a
  dependency: it only moves the moment it is paid);
- exempt, and only these: imports under `if TYPE_CHECKING:` (never executed; annotations only);
- `from package import name` is an edge to the submodule `package.name` when that is a module, else to the
  package (its `__init__.py`); the implicit run of a parent package's `__init__.py` when a submodule loads
  is not an edge (it is Python's loading order, not a dependency a module chooses; a face that re-exports its
  submodules would otherwise close a circle with each of them).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kroncompress"

# (importing module, defining module, name): why the name is shared across files while staying private
# (importer, source, private name) -> why it may cross files. Empty: every name used across files is public.
PRIVATE_IMPORTS_ALLOWED: dict[tuple[str, str, str], str] = {}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(inner) for statement in node.body for inner in ast.walk(statement))
    return skipped


def _imports(modules: dict[str, Path]):
    """(importer, imported module, name or None, under TYPE_CHECKING) for every import inside kroncompress."""
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skipped = _type_checking_nodes(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [(alias.name, None) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets = [(f"{base}.{a.name}", None) if f"{base}.{a.name}" in modules else (base, a.name)
                           for a in node.names]
            else:
                continue
            for target, imported in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    yield name, target, imported, id(node) in skipped


def _circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def test_the_graph_reader_finds_a_circle(tmp_path):
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_inside_kroncompress():
    modules = _modules()
    edges: dict[str, set[str]] = {}
    for importer, target, _, type_only in _imports(modules):
        if not type_only:
            edges.setdefault(importer, set()).add(target)
    assert len(edges) > 50  # the reader sees the package
    circles = _circles(edges)
    assert not circles, "import circles (each a set of modules that import each other): " + "; ".join(
        " <-> ".join(c) for c in circles)


def test_private_names_stay_in_their_file():
    found = {(importer, target, name) for importer, target, name, _ in _imports(_modules())
             if name and name.startswith("_") and not name.startswith("__")}
    unlisted = sorted(found - set(PRIVATE_IMPORTS_ALLOWED))
    assert not unlisted, ("private names imported from another file (make them public, move them, or list them "
                          f"with a reason): {unlisted}")
