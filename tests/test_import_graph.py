"""The packages' import graph has no cycles, no Python file edits ``sys.path``, and no package
file is over 400 lines.

The graph is built from the source (``ast``): every ``import`` and ``from ... import``, at module
level or inside a function, of ``fairseq_moe_plugin`` and ``fairseq_moe_cli``; ``from pkg import
name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``. A package's
``__init__`` that its submodules' import runs first is not an edge (every package would be a
cycle with its own modules).
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent
while not (REPO / "pyproject.toml").exists():
    REPO = REPO.parent
PACKAGES = ("fairseq_moe_plugin", "fairseq_moe_cli")
MAX_LINES = 400
SKIPPED_DIRS = {"build", "dist", "node_modules", "__pycache__"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_files() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def imported_modules(module: str, path: Path, known) -> set[str]:
    """The modules of ``known`` that ``module`` (the file ``path``) imports anywhere."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                     for a in node.names]  # fmt: skip
        else:
            continue
        for name in names:
            while name and name not in known:  # a name inside a module: the module
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = package_files()
    return {module: imported_modules(module, path, files) for module, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_module_and_function_level_imports():
    graph = import_graph()
    assert "fairseq_moe_plugin.serve.engine_base" in graph["fairseq_moe_plugin.serve.engine"]
    # load_engine imports the engines inside the function
    assert "fairseq_moe_plugin.serve.translation" in graph["fairseq_moe_plugin.serve.engine"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert found == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def _python_files():
    for path in sorted(REPO.rglob("*.py")):
        parts = path.relative_to(REPO).parts
        if any(p.startswith(".") or p in SKIPPED_DIRS for p in parts[:-1]):
            continue
        yield path


def _is_sys_path(node) -> bool:
    if isinstance(node, ast.Subscript):
        node = node.value
    return (isinstance(node, ast.Attribute) and node.attr == "path"
            and isinstance(node.value, ast.Name) and node.value.id == "sys")  # fmt: skip


def sys_path_edits(path: Path) -> list[int]:
    """Lines of ``path`` that change ``sys.path`` (a call of one of its list methods, an
    assignment to it or to an item)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in {"insert", "append", "extend", "remove", "pop", "clear"}:
                if _is_sys_path(node.func.value):
                    lines.append(node.lineno)
        elif isinstance(node, ast.Assign | ast.AugAssign | ast.Delete):
            targets = node.targets if isinstance(node, ast.Assign | ast.Delete) else [node.target]
            if any(_is_sys_path(t) for t in targets):
                lines.append(node.lineno)
    return lines


def test_no_file_edits_sys_path():
    edits = {
        str(p.relative_to(REPO)): lines for p in _python_files() if (lines := sys_path_edits(p))
    }
    assert edits == {}, f"sys.path edits (file: lines): {edits}"


def test_no_package_file_is_over_400_lines():
    long = {}
    for path in package_files().values():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_LINES:
            long[str(path.relative_to(REPO))] = n
    assert long == {}, f"files over {MAX_LINES} lines: {long}"
