"""The import graph of events/, services/ and workers/, read from the code (every import statement): no circle; ``events`` imports nothing above it; ``services`` never imports
``workers``; the API and the CLI decide by error kind, so they import no package's errors module."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("events", "services", "workers")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)  # (installed under the modelbus prefix)
    return ".".join(["modelbus", *(parts[:-1] if parts[-1] == "__init__" else parts)])


MODULES = {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def _imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement: at module level, under ``if TYPE_CHECKING`` and inside functions alike (an
    import moved into a function to dodge a circle is still the circle)."""
    return [node for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)]


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The modules of ours that an import statement names."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
            package = package[:len(package) - node.level + 1]
            base = ".".join([*package, base] if base else package)
        # ``from a.b import c``: the module a.b.c when there is one, else the names of a.b itself
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    # (a package's own __init__, which Python also runs, is not counted: re-exports would make every
    # package a circle with its modules, as tools such as import-linter also take it)
    return {name for name in names if name in MODULES and name != module}


def import_graph() -> dict[str, set[str]]:
    return {m: set().union(*(_targets(m, n) for n in _imports(ast.parse(p.read_text()))))
            for m, p in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
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


def _is_package_of(name: str, module: str) -> bool:
    return module == name or module.startswith(name + ".")


GRAPH = import_graph()


def test_the_graph_is_read() -> None:
    assert "modelbus.services.load.cache" in GRAPH and "modelbus.events.errors" in GRAPH["modelbus.services.records.errors"]
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]  # the check can fail


def test_no_import_circle() -> None:
    assert _cycles(GRAPH) == []


def test_imports_point_down() -> None:
    up = {m: sorted(t for t in targets if not _is_package_of("modelbus.events", t))
          for m, targets in GRAPH.items() if _is_package_of("modelbus.events", m)}
    assert {m: t for m, t in up.items() if t} == {}
    into_workers = {m: sorted(t for t in targets if _is_package_of("modelbus.workers", t))
                    for m, targets in GRAPH.items() if _is_package_of("modelbus.services", m)}
    assert {m: t for m, t in into_workers.items() if t} == {}


def test_api_and_cli_import_error_kinds_not_package_errors() -> None:
    for surface in ("modelbus.services.api", "modelbus.services.cli"):
        errors = {m: sorted(t for t in targets if t.endswith(".errors") and not _is_package_of(surface, t)
                            and t != "modelbus.events.errors")
                  for m, targets in GRAPH.items() if _is_package_of(surface, m)}
        assert {m: t for m, t in errors.items() if t} == {}


def test_modules_log_through_the_deferred_logger() -> None:
    """``events.logs.get_logger`` is the one way to a logger: a module-level ``structlog.get_logger`` runs
    before the CLI's deferred set-up, so its lines would go to stdout in structlog's default format (a
    command's ``--json`` output then starts with debug lines)."""
    offenders = sorted(str(path.relative_to(ROOT)) for module, path in MODULES.items()
                       if module != "modelbus.events.logs" and "structlog.get_logger(" in path.read_text())
    assert offenders == []


def test_no_module_imports_pydantic_settings() -> None:
    """services.config reads the environment itself (pydantic-settings cost every command ~0.05 s of
    start-up); tests/cli/test_entry.py checks what the reading commands import when they run."""
    def names(node: ast.Import | ast.ImportFrom) -> list[str]:
        return [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
    offenders = sorted(m for m, path in MODULES.items() for node in _imports(ast.parse(path.read_text()))
                       if any(n.split(".")[0] == "pydantic_settings" for n in names(node)))
    assert offenders == []
