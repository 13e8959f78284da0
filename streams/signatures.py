"""The signature grammar, without DSPy: fields, types and JSON values checked against them.

A signature arrives as text (``"question, context -> answer, confidence: float"``).
It is parsed here with a small grammar — never by ``eval`` or DSPy's own string
parser, which resolves type names through Python's namespace. The client checks
programs and pipelines with it before producing; the runtime
(``dspex.agents.runtime.signatures``) builds DSPy signatures from the same parse,
so both refuse the same texts with the same messages.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dspex.streams._vartypes import decode_json
from dspex.streams.errors import InvalidRequest

__all__ = [
    "HISTORY",
    "MAX_SIGNATURE_BYTES",
    "RESERVED_NAMES",
    "Field",
    "SignatureFields",
    "decode_value",
    "history_inputs",
    "matches",
    "parse_field_list",
    "parse_signature_fields",
    "parse_type",
    "stream_delta",
    "stream_field",
    "type_name",
]

MAX_SIGNATURE_BYTES = 4096

RESERVED_NAMES = frozenset(
    {
        "append", "append_instructions", "construct", "copy", "delete", "dict", "dump_state",
        "equals", "fields", "from_orm", "input_fields", "insert", "instructions", "json",
        "load_state", "model_computed_fields", "model_config", "model_construct", "model_copy",
        "model_dump", "model_dump_json", "model_extra", "model_fields", "model_fields_set",
        "model_json_schema", "model_parametrized_name", "model_post_init", "model_rebuild",
        "model_validate", "model_validate_json", "model_validate_strings", "output_fields",
        "parse_file", "parse_obj", "parse_raw", "prepend", "schema", "schema_json",
        "signature", "update_forward_refs", "validate", "with_instructions",
        "with_updated_fields",
    }
)  # fmt: skip
"""Attribute names of ``dspy.Signature`` a field must not shadow (a unit test keeps it current)."""

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


class HistoryType:
    """The annotation of a ``history: History`` input (DSPy's ``dspy.History`` at run time).

    A caller never sends it: the worker fills it from the session's earlier turns
    (docs/sessions.md). Only an input may have it, and at most one.
    """

    def __repr__(self) -> str:
        return "History"


HISTORY = HistoryType()
"""The one :class:`HistoryType` annotation."""

Field = tuple[str, Any]
"""A signature field: its name and Python annotation (``str``, ``list[int]``, ...)."""


@dataclass(frozen=True)
class SignatureFields:
    """A parsed signature: input and output fields in the order written."""

    inputs: tuple[Field, ...]
    outputs: tuple[Field, ...]

    def input(self, name: str) -> Any | None:
        """The annotation of input ``name``; ``None`` when there is no such input."""
        return dict(self.inputs).get(name)

    def output(self, name: str) -> Any | None:
        """The annotation of output ``name``; ``None`` when there is no such output."""
        return dict(self.outputs).get(name)


def parse_type(text: str, *, field: str = _FIELD) -> Any:
    """The Python annotation for a type name in a signature (scalars, list[...], dict[str, ...])."""
    text = text.strip()
    if text in _SCALARS:
        return _SCALARS[text]
    if text == "dict":
        return dict[str, Any]
    if text == "History":
        return HISTORY
    if (match := _LIST.match(text)) and match.group(1) in _SCALARS:
        return _LISTS[match.group(1)]
    if (match := _DICT.match(text)) and match.group(1) in _DICTS:
        return _DICTS[match.group(1)]
    raise InvalidRequest(
        field, f"unsupported type {text!r} (use str, int, float, bool, list[T], dict, History)"
    )


@functools.lru_cache(maxsize=512)
def parse_signature_fields(text: str) -> SignatureFields:
    """The fields of ``text``; ``InvalidRequest(field="signature")`` when malformed."""
    if len(text.encode("utf-8")) > MAX_SIGNATURE_BYTES:
        raise InvalidRequest(_FIELD, f"signature longer than {MAX_SIGNATURE_BYTES} bytes")
    if text.count("->") != 1:
        raise InvalidRequest(_FIELD, "expected exactly one '->' between inputs and outputs")
    left, right = text.split("->")
    inputs = parse_field_list(left, side="input")
    outputs = parse_field_list(right, side="output")
    _check_unique([name for name, _ in inputs + outputs], _FIELD)
    if any(kind is HISTORY for _, kind in outputs):
        raise InvalidRequest(_FIELD, "History is an input type: an output cannot be History")
    if sum(kind is HISTORY for _, kind in inputs) > 1:
        raise InvalidRequest(_FIELD, "at most one History input")
    return SignatureFields(inputs, outputs)


def history_inputs(fields: SignatureFields) -> tuple[str, ...]:
    """The names of ``fields``' History inputs (none or one)."""
    return tuple(name for name, kind in fields.inputs if kind is HISTORY)


def parse_field_list(text: str, *, side: str = "input", field: str = _FIELD) -> tuple[Field, ...]:
    """A comma-separated field list (one side of a signature); errors name ``field``."""
    parts = [part.strip() for part in _split_top_level(text, field)]
    if not any(parts):
        raise InvalidRequest(field, f"no {side} fields")
    fields = tuple(_parse_field(part, side, field) for part in parts)
    _check_unique([name for name, _ in fields], field)
    return fields


def _split_top_level(text: str, field: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth < 0:
            raise InvalidRequest(field, "unbalanced ']'")
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth:
        raise InvalidRequest(field, "unbalanced '['")
    return [*parts, "".join(current)]


def _parse_field(text: str, side: str, field: str) -> Field:
    if not text:
        raise InvalidRequest(field, f"empty {side} field name")
    name, sep, type_text = text.partition(":")
    name = name.strip()
    _check_name(name, field)
    return name, parse_type(type_text, field=field) if sep else str


def _check_name(name: str, field: str) -> None:
    if not name.isidentifier() or not name.isascii():
        raise InvalidRequest(field, f"field name {name!r} is not an identifier")
    if name.startswith("_"):
        raise InvalidRequest(field, f"field name {name!r} must not start with '_'")
    if name in RESERVED_NAMES:
        raise InvalidRequest(field, f"field name {name!r} is reserved")


def _check_unique(names: list[str], field: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise InvalidRequest(field, f"duplicate field name {name!r}")
        seen.add(name)


def decode_value(field: str, raw: Any, annotation: Any) -> Any:
    """Decode one JSON-encoded value and check it against ``annotation``; errors name ``field``."""
    if not isinstance(raw, str):
        raise InvalidRequest(field, "value must be a JSON-encoded string")
    value = decode_json(field, raw)
    if not matches(value, annotation):
        raise InvalidRequest(field, f"expected {type_name(annotation)}, got {type(value).__name__}")
    return float(value) if annotation is float else value


def matches(value: Any, annotation: Any) -> bool:
    """Whether a decoded JSON value fits a signature annotation."""
    if annotation is Any:
        return True
    if annotation is HISTORY:
        messages = value.get("messages") if isinstance(value, dict) else None
        return isinstance(messages, list) and all(isinstance(m, dict) for m in messages)
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
    if annotation is HISTORY:
        return "History"
    if annotation in _SCALARS.values():
        return str(annotation.__name__)
    return str(annotation).replace("typing.", "")


def stream_field(fields: SignatureFields) -> tuple[str, bool] | None:
    """The output a streamed answer carries, and whether it is text.

    The last ``str`` output (not ``reasoning``), token by token; without one, the last
    output, sent whole as its JSON (the same text as its value in the final outputs).
    """
    outputs = [(name, kind) for name, kind in fields.outputs if name != "reasoning"]
    texts = [name for name, kind in outputs if kind is str]
    if texts:
        return texts[-1], True
    return (outputs[-1][0], False) if outputs else None


def stream_delta(fields: SignatureFields, outputs: Mapping[str, str]) -> str:
    """What a stream of the answer with these (JSON-encoded) ``outputs`` concatenates to."""
    chosen = stream_field(fields)
    if chosen is None or chosen[0] not in outputs:
        return ""
    name, text = chosen
    if not text:
        return outputs[name]
    value = json.loads(outputs[name])
    return value if isinstance(value, str) else outputs[name]
