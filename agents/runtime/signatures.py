"""Signature strings to DSPy signatures, and JSON input values checked against them.

A signature arrives as text (``"question, context -> answer, confidence: float"``).
It is parsed here with a small grammar — never by ``eval`` or DSPy's own string
parser, which resolves type names through Python's namespace — and built with
``dspy.make_signature`` from explicit ``(type, Field)`` pairs.
"""

from __future__ import annotations

import functools
import json
import math
import re
from typing import Any

import dspy

from dspex.streams.errors import InvalidRequest

MAX_SIGNATURE_BYTES = 4096

_SCALARS: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool}
_LISTS: dict[str, Any] = {
    "str": list[str],
    "int": list[int],
    "float": list[float],
    "bool": list[bool],
}
_DICTS: dict[str, Any] = {
    "Any": dict[str, Any],
    "str": dict[str, str],
    "int": dict[str, int],
    "float": dict[str, float],
    "bool": dict[str, bool],
}
_LIST = re.compile(r"^list\[\s*(\w+)\s*\]$")
_DICT = re.compile(r"^dict\[\s*str\s*,\s*(\w+)\s*\]$")
_FIELD = "signature"


def parse_type(text: str) -> Any:
    """The Python annotation for a type name in a signature (scalars, list[...], dict[str, ...])."""
    text = text.strip()
    if text in _SCALARS:
        return _SCALARS[text]
    if text == "dict":
        return dict[str, Any]
    if (match := _LIST.match(text)) and match.group(1) in _SCALARS:
        return _LISTS[match.group(1)]
    if (match := _DICT.match(text)) and match.group(1) in _DICTS:
        return _DICTS[match.group(1)]
    raise InvalidRequest(
        _FIELD, f"unsupported type {text!r} (use str, int, float, bool, list[T], dict)"
    )


@functools.lru_cache(maxsize=512)
def parse_signature(text: str) -> type[dspy.Signature]:
    """A DSPy signature class for ``text``; ``InvalidRequest(field="signature")`` when malformed."""
    if len(text.encode("utf-8")) > MAX_SIGNATURE_BYTES:
        raise InvalidRequest(_FIELD, f"signature longer than {MAX_SIGNATURE_BYTES} bytes")
    if text.count("->") != 1:
        raise InvalidRequest(_FIELD, "expected exactly one '->' between inputs and outputs")
    left, right = text.split("->")
    inputs, outputs = _parse_fields(left, "input"), _parse_fields(right, "output")
    _check_unique([name for name, _ in inputs + outputs])
    fields: dict[str, Any] = {name: (kind, dspy.InputField()) for name, kind in inputs}
    fields.update({name: (kind, dspy.OutputField()) for name, kind in outputs})
    try:
        signature: type[dspy.Signature] = dspy.make_signature(fields)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(_FIELD, f"cannot build signature: {exc}") from exc
    return signature


def _parse_fields(text: str, side: str) -> list[tuple[str, Any]]:
    parts = [part.strip() for part in _split_top_level(text)]
    if not any(parts):
        raise InvalidRequest(_FIELD, f"no {side} fields")
    return [_parse_field(part, side) for part in parts]


def _split_top_level(text: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth < 0:
            raise InvalidRequest(_FIELD, "unbalanced ']'")
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth:
        raise InvalidRequest(_FIELD, "unbalanced '['")
    return [*parts, "".join(current)]


def _parse_field(text: str, side: str) -> tuple[str, Any]:
    if not text:
        raise InvalidRequest(_FIELD, f"empty {side} field name")
    name, sep, type_text = text.partition(":")
    name = name.strip()
    _check_name(name)
    return name, parse_type(type_text) if sep else str


def _check_name(name: str) -> None:
    if not name.isidentifier() or not name.isascii():
        raise InvalidRequest(_FIELD, f"field name {name!r} is not an identifier")
    if name.startswith("_"):
        raise InvalidRequest(_FIELD, f"field name {name!r} must not start with '_'")
    if hasattr(dspy.Signature, name):
        raise InvalidRequest(_FIELD, f"field name {name!r} is reserved")


def _check_unique(names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise InvalidRequest(_FIELD, f"duplicate field name {name!r}")
        seen.add(name)


def decode_inputs(
    signature: type[dspy.Signature], inputs_json: dict[str, str] | Any
) -> dict[str, Any]:
    """Decode each JSON input and check it against the signature's input fields."""
    expected = signature.input_fields
    unknown = sorted(set(inputs_json) - set(expected))
    if unknown:
        raise InvalidRequest(
            f"inputs.{unknown[0]}", f"not an input of the signature ({_names(expected)})"
        )
    decoded = {}
    for name, info in expected.items():
        if name not in inputs_json:
            raise InvalidRequest(f"inputs.{name}", "missing input")
        decoded[name] = _decode(name, inputs_json[name], info.annotation)
    return decoded


def _names(fields: dict[str, Any]) -> str:
    return ", ".join(fields)


def _refuse_constant(token: str) -> Any:
    raise ValueError(f"{token} is not allowed")


def _decode(name: str, raw: Any, annotation: Any) -> Any:
    field = f"inputs.{name}"
    if not isinstance(raw, str):
        raise InvalidRequest(field, "value must be a JSON-encoded string")
    try:
        value = json.loads(raw, parse_constant=_refuse_constant)
    except ValueError as exc:
        raise InvalidRequest(field, f"invalid JSON: {exc}") from exc
    if not matches(value, annotation):
        raise InvalidRequest(field, f"expected {type_name(annotation)}, got {type(value).__name__}")
    return float(value) if annotation is float else value


def matches(value: Any, annotation: Any) -> bool:
    """Whether a decoded JSON value fits a signature annotation."""
    if annotation is Any:
        return True
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return (
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        )
    if annotation is str:
        return isinstance(value, str)
    origin = getattr(annotation, "__origin__", None)
    args: tuple[Any, ...] = getattr(annotation, "__args__", ())
    if origin is list:
        return isinstance(value, list) and all(matches(item, args[0]) for item in value)
    if origin is dict:
        return isinstance(value, dict) and all(matches(item, args[1]) for item in value.values())
    return False


def type_name(annotation: Any) -> str:
    """How a signature annotation is written (``list[str]``)."""
    if annotation in _SCALARS.values():
        return str(annotation.__name__)
    return str(annotation).replace("typing.", "")
