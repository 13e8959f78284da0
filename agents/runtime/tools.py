"""Tools programs may call (ReAct), registered by name in the worker process.

Tools are never code sent on a topic: a request or program version names tools, and
only names registered here resolve. The default tools are safe to expose: pure
functions of their arguments, bounded in size and time. An operator adds tools of
their own by allowlisting them in settings (``tools``: name -> ``package.module:func``);
:func:`deployed_tools` imports exactly those paths at worker start (docs/modules.md).
"""

from __future__ import annotations

import ast
import inspect
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import dspy

from dspex.streams.errors import ConfigError

_MAX_EXPRESSION = 200
_MAX_POWERLESS_ABS = 1e12

_BINARY: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}
_UNARY: dict[type[ast.unaryop], Callable[[float], float]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}


@dataclass(frozen=True)
class RegisteredTool:
    """One tool: its name, what it does (shown to the LM) and the function."""

    name: str
    description: str
    func: Callable[..., Any]


class ToolRegistry:
    """Tools by name; the only tools a program can reach."""

    def __init__(self, tools: Iterable[RegisteredTool] = ()) -> None:
        self._tools: dict[str, RegisteredTool] = {}
        for tool in tools:
            self.register(tool.func, name=tool.name, description=tool.description)

    def register(self, func: Callable[..., Any], *, name: str, description: str) -> None:
        """Add a tool; names are identifiers and unique (``finish`` is ReAct's own)."""
        if not name.isidentifier() or name == "finish":
            raise ValueError(f"invalid tool name: {name!r}")
        if name in self._tools:
            raise ValueError(f"tool already registered: {name!r}")
        self._tools[name] = RegisteredTool(name, description, func)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def names(self) -> frozenset[str]:
        """The registered tool names."""
        return frozenset(self._tools)

    def get(self, name: str) -> RegisteredTool:
        """The tool called ``name``; ``KeyError`` when it is not registered."""
        return self._tools[name]

    def dspy_tools(self, names: Iterable[str]) -> list[dspy.Tool]:
        """``dspy.Tool`` objects for ``names``, in order; ``KeyError`` for an unknown name."""
        return [_to_dspy(self._tools[name]) for name in names]


def _to_dspy(tool: RegisteredTool) -> dspy.Tool:
    return dspy.Tool(tool.func, name=tool.name, desc=tool.description)


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression with + - * / and parentheses."""
    if len(expression) > _MAX_EXPRESSION:
        return f"error: expression longer than {_MAX_EXPRESSION} characters"
    try:
        value = _evaluate(ast.parse(expression, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError) as exc:
        return f"error: {exc}"
    return _format_number(value)


def _evaluate(node: ast.expr) -> float:
    # A whitelist of AST nodes: numbers and the four operators. Never eval().
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        if isinstance(node.value, bool):
            raise ValueError("unsupported constant")
        return float(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        result = _BINARY[type(node.op)](_evaluate(node.left), _evaluate(node.right))
        if abs(result) > _MAX_POWERLESS_ABS:
            raise OverflowError("result too large")
        return result
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    raise ValueError(f"unsupported syntax: {type(node).__name__}")


def _format_number(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


def word_count(text: str) -> int:
    """Count the whitespace-separated words in a text."""
    return len(text.split())


def default_tools() -> ToolRegistry:
    """The tools every DSPex worker offers."""
    return ToolRegistry(
        [
            RegisteredTool(
                "calculator",
                "Evaluate an arithmetic expression with + - * / and parentheses.",
                calculator,
            ),
            RegisteredTool("word_count", "Count the words in a text.", word_count),
        ]
    )


def deployed_tools(allowlist: Mapping[str, str]) -> ToolRegistry:
    """The default tools plus the allowlisted ones, imported now (``ConfigError`` if one fails).

    A tool's description, shown to the LM, is the first paragraph of its docstring.
    """
    from dspex.agents.runtime.modules import import_allowlisted

    registry = default_tools()
    for name, path in allowlist.items():
        where = f"settings tools.{name}"
        func = import_allowlisted(where, path)
        if not callable(func):
            raise ConfigError(f"{where}: {path!r} is not callable")
        description = (inspect.getdoc(func) or name).split("\n\n")[0].replace("\n", " ")
        try:
            registry.register(func, name=name, description=description)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
    return registry
