"""The shape of the code, checked from its source: imports form no circle, modules stay small, the
environment is read in one place, the library knows nothing of the service, and the command line is
a package no library module imports.

Every import counts, also those inside functions (they hide a circle from Python, not from a reader).
"""
from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

MAX_LINES = 500
# the modules that may read the environment: the service's settings, and the command line's defaults
ENV_READERS = {"backend/settings.py", "backend/cli/common.py"}
# entry points at stable paths (`python -m backend.serve`, `python -m backend.worker`, RQ job names);
# they may import anything, nothing imports them
ENTRY_POINTS = {"backend.serve", "backend.worker", "backend.jobs", "backend.training_jobs"}


def _modules(package: str) -> dict[str, Path]:
    root = REPO / package
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that `path` imports, at any depth of its code."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


def _graph(package: str) -> dict[str, set[str]]:
    mods = _modules(package)
    known = set(mods)
    graph = {}
    for name, path in mods.items():
        # a package's __init__ is not an edge to its modules' users: drop imports of a module's own parents
        parents = {name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)}
        graph[name] = _imports(path, known) - {name} - parents
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph`, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_cycle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle_in_backend_or_explainers():
    for package in ("backend", "explainers"):
        graph = _graph(package)
        assert len(graph) > 10
        assert _cycle(graph) is None, f"import circle: {' -> '.join(_cycle(graph))}"


def test_no_module_over_500_lines():
    long = {str(p.relative_to(REPO)): n for pkg in ("backend", "explainers") for p in _modules(pkg).values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_library_never_imports_the_service():
    for name, path in _modules("explainers").items():
        assert "backend" not in {m.split(".")[0] for m in _imports(path, set(_modules("backend")) | {"backend"})}, name


def test_only_entry_points_import_the_command_line():
    graph = _graph("backend")
    users = {n for n, deps in graph.items() if any(d == "backend.cli" or d.startswith("backend.cli.") for d in deps)}
    outside = {n for n in users if not n.startswith("backend.cli")} - ENTRY_POINTS
    assert not outside, f"library modules importing backend.cli: {sorted(outside)}"
    importers_of_entry_points = {n for n, deps in graph.items() if deps & (ENTRY_POINTS - {"backend.jobs"})}
    assert importers_of_entry_points <= {"backend.jobs"}, sorted(importers_of_entry_points)


def _env_uses(path: Path) -> list[int]:
    """Lines of `path` that touch the process environment (os.environ, os.getenv, os.putenv)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os" \
                and node.attr in ("environ", "getenv", "putenv", "unsetenv", "environb"):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "os" \
                and any(a.name in ("environ", "getenv", "putenv") for a in node.names):
            lines.append(node.lineno)
    return lines


def test_the_environment_is_read_in_settings_and_the_command_lines_defaults_only():
    readers = {str(p.relative_to(REPO)): lines for p in _modules("backend").values() if (lines := _env_uses(p))}
    assert set(readers) <= ENV_READERS, {k: v for k, v in readers.items() if k not in ENV_READERS}
    assert "backend/settings.py" in readers


def test_the_environment_is_never_written_by_the_service():
    for path in _modules("backend").values():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
                if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            for t in targets:
                assert not (isinstance(t, ast.Subscript) and isinstance(t.value, ast.Attribute)
                            and t.value.attr == "environ"), f"{path.relative_to(REPO)}:{node.lineno} writes os.environ"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                    "setdefault", "update", "pop") and isinstance(node.func.value, ast.Attribute) \
                    and node.func.value.attr == "environ":
                raise AssertionError(f"{path.relative_to(REPO)}:{node.lineno} writes os.environ")
