"""The stage graph: which stages cannot be ordered, and the cycle that stops them.

A graph maps each stage name to the stages it reads, each with the path of the
reference that reads it (``("retrieve", "stages.answer.inputs.passages")``).
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["Deps", "cycle_from", "unordered"]

Deps = list[tuple[str, str]]
"""The stages one stage reads, each with the path of the reference."""


def unordered(graph: Mapping[str, Deps]) -> set[str]:
    """Stages on or downstream of a cycle: what Kahn's algorithm cannot order."""
    remaining = set(graph)
    progress = True
    while progress:
        ready = {name for name in remaining if all(d not in remaining for d, _ in graph[name])}
        remaining -= ready
        progress = bool(ready)
    return remaining


def cycle_from(start: str, graph: Mapping[str, Deps], remaining: set[str]) -> tuple[list[str], str]:
    """Follow reads among ``remaining`` (from :func:`unordered`) from ``start`` to the
    first repeat: the cycle, in order, and the path of the reference by which its first
    stage reads the next."""
    order: list[str] = []
    taken: dict[str, str] = {}
    node = start
    while node not in taken:
        order.append(node)
        nxt, taken[node] = next((d, p) for d, p in graph[node] if d in remaining)
        node = nxt
    cycle = order[order.index(node) :]
    return cycle, taken[cycle[0]]
