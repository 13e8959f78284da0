"""The shape of the source tree: no import loops, no private reach-ins, rooms that stay apart.

Reads every module under ``streams/``, ``agents/`` and ``schemas/`` (installed as
``dspex.streams``, ``dspex.agents``, ``dspex.schemas``) with :mod:`ast` and
collects *every* import: module-level, function-level and ``TYPE_CHECKING`` ones.
An import of a package's attribute (``from dspex.agents.plumbing import messages``)
counts as an import of that submodule when one exists. Edges to a module's own
ancestor packages are not followed: Python runs a package's ``__init__`` before its
submodules anyway.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("streams", "agents", "schemas")
# The agent processes, one subpackage each; they share only the layers below them.
PROCESSES = {"router", "worker", "learner", "metrics", "jobs", "pipeline", "sessions"}
LAYERS = {"runtime", "plumbing"}


@cache
def modules() -> dict[str, Path]:
    """``dspex.<folder>.<...>`` module name -> source file."""
    found: dict[str, Path] = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = ["dspex", *path.relative_to(ROOT).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _resolve(name: str) -> str | None:
    known = modules()
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _imported(module: str, path: Path) -> Iterator[str]:
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield full if full in modules() else base


@cache
def graph() -> dict[str, frozenset[str]]:
    """Module -> the DSPex modules it imports (ancestors of itself left out)."""
    edges: dict[str, frozenset[str]] = {}
    for module, path in modules().items():
        targets = {_resolve(name) for name in _imported(module, path)}
        edges[module] = frozenset(
            t for t in targets if t and t != module and not module.startswith(t + ".")
        )
    return edges


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def _edges() -> Iterator[tuple[str, str]]:
    for source, targets in sorted(graph().items()):
        for target in sorted(targets):
            yield source, target


def _room(module: str) -> str | None:
    """``router`` for ``dspex.agents.router.cache``; None outside an agent subpackage."""
    parts = module.split(".")
    if len(parts) > 3 and parts[:2] == ["dspex", "agents"]:
        return parts[2]
    return None


def test_the_scan_sees_the_tree() -> None:
    assert "dspex.agents.router.router" in modules()
    assert "dspex.streams.client.client" in modules()
    assert "dspex.agents.plumbing.publisher" in graph()["dspex.agents.worker.worker"]


def test_no_import_cycles_including_function_level_and_type_checking_imports() -> None:
    assert _cycles() == []


def test_no_module_imports_a_private_module_of_another_package() -> None:
    reach_ins = []
    for source, target in _edges():
        leaf = target.rpartition(".")[2]
        package = target.rpartition(".")[0]
        if leaf.startswith("_") and not leaf.startswith("__"):
            if not (source == package or source.startswith(package + ".")):
                reach_ins.append(f"{source} -> {target}")
    assert reach_ins == []


def test_streams_never_imports_agents_and_schemas_imports_neither() -> None:
    wrong = [
        f"{source} -> {target}"
        for source, target in _edges()
        if (source.startswith("dspex.streams") and target.startswith("dspex.agents"))
        or (source.startswith("dspex.schemas") and not target.startswith("dspex.schemas"))
    ]
    assert wrong == []


def test_no_agent_subpackage_imports_another_process_and_layers_import_no_process() -> None:
    wrong = []
    for source, target in _edges():
        mine, theirs = _room(source), _room(target)
        if mine is None or theirs is None or mine == theirs:
            continue
        if theirs in PROCESSES:
            wrong.append(f"{source} -> {target}")
    assert wrong == []


def test_agents_top_level_holds_only_entry_points() -> None:
    top = sorted(p.name for p in (ROOT / "agents").glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "cli.py"]
    rooms = {p.name for p in (ROOT / "agents").iterdir() if (p / "__init__.py").exists()}
    assert rooms == PROCESSES | LAYERS


def test_the_public_api_loads_lazily_and_completely() -> None:
    import subprocess
    import sys

    code = (
        "import sys, dspex\n"
        "assert 'confluent_kafka' not in sys.modules, 'import dspex must stay light'\n"
        "missing = [n for n in dspex.__all__ if getattr(dspex, n, None) is None]\n"
        "assert not missing, missing\n"
        "assert len(set(dspex.__all__)) == len(dspex.__all__)\n"
        "assert dspex.Client is dspex.streams.Client\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
