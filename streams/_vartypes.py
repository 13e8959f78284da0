"""The value types of shared variables: constraint checks, value checks, JSON spelling.

Private to :mod:`dspex.streams.variables`, which documents the types; every check
raises :class:`~dspex.streams.errors.InvalidRequest` naming the record field
(``value_json``, ``value_json.<member>`` or ``constraints_json``) and the reason.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from dspex.streams.errors import InvalidRequest

VAR_TYPES = (
    "float",
    "int",
    "bool",
    "choice",
    "module",
    "string",
    "probability",
    "embedding",
    "tensor",
    "composite",
)
# The DSPy module types a program can run as; tests keep it equal to
# dspex.agents.runtime.modules.MODULE_TYPES
# (streams never imports agents).
MODULE_TYPES = ("Predict", "ChainOfThought", "ReAct", "BestOfN", "Refine")
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,127}$")

_MAX_PATTERN = 500
_MAX_DEPTH = 8
_COMMON = frozenset({"when"})
_ALLOWED: dict[str, frozenset[str]] = {
    "float": frozenset({"min", "max"}),
    "int": frozenset({"min", "max"}),
    "probability": frozenset({"min", "max"}),
    "bool": frozenset(),
    "choice": frozenset({"choices"}),
    "module": frozenset({"choices"}),
    "string": frozenset({"max_length", "pattern"}),
    "embedding": frozenset({"dims"}),
    "tensor": frozenset({"shape"}),
    "composite": frozenset({"fields"}),
}


def check_type(var_type: Any) -> None:
    """``var_type`` is one of :data:`VAR_TYPES`."""
    if var_type not in VAR_TYPES:
        known = ", ".join(VAR_TYPES)
        raise InvalidRequest("var_type", f"unknown type {var_type!r} (known: {known})")


def decode_json(field: str, text: Any) -> Any:
    """JSON text decoded; NaN, Infinity and numbers that overflow to infinity are refused."""
    if not isinstance(text, str):
        raise InvalidRequest(field, "must be a JSON string")
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest(field, f"invalid JSON: {exc}") from exc


def decode_json_object(field: str, text: Any) -> dict[str, Any]:
    """Like :func:`decode_json`, and the value must be a JSON object."""
    value = decode_json(field, text)
    if not isinstance(value, dict):
        raise InvalidRequest(field, "must be a JSON object")
    return value


def encode_json(field: str, value: Any) -> str:
    """``value`` as compact JSON; a value JSON cannot carry (NaN, objects) names ``field``."""
    try:
        return json.dumps(value, allow_nan=False, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(field, f"not JSON-serializable: {exc}") from exc


def canonical(value: Any) -> str:
    """A JSON value in one spelling (sorted keys, 1.0 as 1), for equality between values."""
    return json.dumps(_normal(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_text(text: str) -> str:
    """:func:`canonical` of JSON text; undecodable text stays as it is."""
    try:
        return canonical(json.loads(text))
    except (ValueError, RecursionError):
        return text


def _normal(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_normal(v) for v in value]
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    return value


def _refuse_constant(token: str) -> Any:
    raise ValueError(f"{token} is not allowed")


def _finite_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):
        raise ValueError(f"{token} overflows to infinity")
    return value


# --- constraints -------------------------------------------------------------------------

_C = "constraints_json"


def check_constraints(var_type: str, constraints: Mapping[str, Any], depth: int = 0) -> None:
    """The constraints object is well formed for ``var_type`` (known keys, sane bounds)."""
    if not isinstance(constraints, Mapping):
        raise InvalidRequest(_C, "must be a JSON object")
    allowed = _ALLOWED[var_type] | _COMMON
    unknown = sorted(set(constraints) - allowed)
    if unknown:
        names = ", ".join(sorted(allowed))
        raise InvalidRequest(
            _C, f"unknown key {unknown[0]!r} for type {var_type} (allowed: {names})"
        )
    _check_when(constraints.get("when"))
    if var_type in ("float", "int", "probability"):
        _check_bounds(var_type, constraints)
    elif var_type in ("choice", "module"):
        _check_choices(var_type, constraints)
    elif var_type == "string":
        _check_string_constraints(constraints)
    elif var_type == "embedding" and "dims" in constraints:
        _positive_int("dims", constraints["dims"])
    elif var_type == "tensor" and "shape" in constraints:
        shape = constraints["shape"]
        if not isinstance(shape, list) or len(shape) > _MAX_DEPTH:
            raise InvalidRequest(_C, f"shape must be a list of at most {_MAX_DEPTH} sizes")
        for size in shape:
            _positive_int("shape", size)
    elif var_type == "composite":
        _check_fields(constraints.get("fields", {}), depth)


def _check_when(when: Any) -> None:
    if when is None:
        return
    if not isinstance(when, dict) or not when:
        raise InvalidRequest(_C, 'when must be an object {"<variable>": [allowed values]}')
    for name, values in when.items():
        if not NAME.match(name):
            raise InvalidRequest(_C, f"when names {name!r}, not a variable name")
        if not isinstance(values, list) or not values:
            raise InvalidRequest(_C, f"when.{name} must be a non-empty list of allowed values")


def _check_bounds(var_type: str, constraints: Mapping[str, Any]) -> None:
    low, high = constraints.get("min"), constraints.get("max")
    for key, bound in (("min", low), ("max", high)):
        if bound is not None and not _is_number(bound):
            raise InvalidRequest(_C, f"{key} must be a finite number, got {bound!r}")
    if low is not None and high is not None and low > high:
        raise InvalidRequest(_C, f"min {low} is greater than max {high}")
    if var_type == "probability" and any(b is not None and not 0 <= b <= 1 for b in (low, high)):
        raise InvalidRequest(_C, "min and max of a probability must lie in [0, 1]")


def _check_choices(var_type: str, constraints: Mapping[str, Any]) -> None:
    choices = constraints.get("choices")
    if choices is None:
        if var_type == "choice":
            raise InvalidRequest(_C, "a choice variable needs choices: [...]")
        return
    if not isinstance(choices, list) or not choices:
        raise InvalidRequest(_C, "choices must be a non-empty list")
    if var_type == "module":
        bad = [c for c in choices if c not in MODULE_TYPES]
        if bad:
            raise InvalidRequest(
                _C, f"choices {bad} are not module types (known: {', '.join(MODULE_TYPES)})"
            )


def _check_string_constraints(constraints: Mapping[str, Any]) -> None:
    if "max_length" in constraints:
        _positive_int("max_length", constraints["max_length"], minimum=0)
    pattern = constraints.get("pattern")
    if pattern is None:
        return
    if not isinstance(pattern, str) or len(pattern) > _MAX_PATTERN:
        raise InvalidRequest(
            _C, f"pattern must be a regular expression of at most {_MAX_PATTERN} characters"
        )
    try:
        re.compile(pattern)
    except re.error as exc:
        raise InvalidRequest(_C, f"pattern is not a regular expression: {exc}") from exc


def _check_fields(fields: Any, depth: int) -> None:
    if not isinstance(fields, dict):
        raise InvalidRequest(_C, 'fields must be an object {"<member>": {"type": ..., ...}}')
    if depth >= _MAX_DEPTH:
        raise InvalidRequest(_C, f"composite fields nest deeper than {_MAX_DEPTH}")
    for member, spec in fields.items():
        if not isinstance(spec, dict) or spec.get("type") not in VAR_TYPES:
            raise InvalidRequest(
                _C, f"fields.{member} needs a type (one of {', '.join(VAR_TYPES)})"
            )
        member_constraints = {k: v for k, v in spec.items() if k != "type"}
        if "when" in member_constraints:
            raise InvalidRequest(_C, f"fields.{member}: when applies to whole variables only")
        check_constraints(spec["type"], member_constraints, depth + 1)


def _positive_int(key: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidRequest(_C, f"{key} must be an integer >= {minimum}, got {value!r}")


# --- values ------------------------------------------------------------------------------


def check_value(
    field: str, var_type: str, value: Any, constraints: Mapping[str, Any], depth: int = 0
) -> None:
    """``value`` has type ``var_type`` and meets ``constraints`` (already checked)."""
    if var_type in ("float", "int", "probability"):
        _check_number(field, var_type, value, constraints)
    elif var_type == "bool":
        if not isinstance(value, bool):
            raise InvalidRequest(field, f"must be true or false, got {_show(value)}")
    elif var_type in ("choice", "module"):
        _check_choice(field, var_type, value, constraints)
    elif var_type == "string":
        _check_string(field, value, constraints)
    elif var_type == "embedding":
        _check_embedding(field, value, constraints)
    elif var_type == "tensor":
        _check_tensor(field, value, constraints)
    else:
        _check_composite(field, value, constraints, depth)


def _check_number(field: str, var_type: str, value: Any, constraints: Mapping[str, Any]) -> None:
    if var_type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        raise InvalidRequest(field, f"must be an integer, got {_show(value)}")
    if not _is_number(value):
        raise InvalidRequest(field, f"must be a finite number, got {_show(value)}")
    if var_type == "probability" and not 0 <= value <= 1:
        raise InvalidRequest(field, f"a probability must lie in [0, 1], got {value}")
    low, high = constraints.get("min"), constraints.get("max")
    if low is not None and value < low:
        raise InvalidRequest(field, f"{value} is below the minimum {low}")
    if high is not None and value > high:
        raise InvalidRequest(field, f"{value} is above the maximum {high}")


def _check_choice(field: str, var_type: str, value: Any, constraints: Mapping[str, Any]) -> None:
    if var_type == "module" and value not in MODULE_TYPES:
        raise InvalidRequest(
            field, f"{_show(value)} is not a module type (known: {', '.join(MODULE_TYPES)})"
        )
    choices = constraints.get("choices")
    if choices is not None and canonical(value) not in {canonical(c) for c in choices}:
        raise InvalidRequest(field, f"{_show(value)} is not one of the choices {choices}")


def _check_string(field: str, value: Any, constraints: Mapping[str, Any]) -> None:
    if not isinstance(value, str):
        raise InvalidRequest(field, f"must be a string, got {_show(value)}")
    limit = constraints.get("max_length")
    if limit is not None and len(value) > limit:
        raise InvalidRequest(field, f"is {len(value)} characters, over max_length {limit}")
    pattern = constraints.get("pattern")
    if pattern is not None and re.fullmatch(pattern, value) is None:
        raise InvalidRequest(field, f"{_show(value)} does not match the pattern {pattern!r}")


def _check_embedding(field: str, value: Any, constraints: Mapping[str, Any]) -> None:
    if not isinstance(value, list) or not value or not all(_is_number(v) for v in value):
        raise InvalidRequest(field, "an embedding must be a non-empty list of finite numbers")
    dims = constraints.get("dims")
    if dims is not None and len(value) != dims:
        raise InvalidRequest(field, f"has {len(value)} dimensions, expected dims {dims}")


def _check_tensor(field: str, value: Any, constraints: Mapping[str, Any]) -> None:
    shape = _shape(field, value, 0)
    wanted = constraints.get("shape")
    if wanted is not None and shape != list(wanted):
        raise InvalidRequest(field, f"has shape {shape}, expected {wanted}")


def _shape(field: str, value: Any, depth: int) -> list[int]:
    """The shape of nested lists of finite numbers; refuses ragged or non-numeric ones."""
    if _is_number(value):
        return []
    if not isinstance(value, list) or not value or depth >= _MAX_DEPTH:
        raise InvalidRequest(
            field,
            f"a tensor must be a number or non-empty nested lists of numbers, "
            f"at most {_MAX_DEPTH} deep",
        )
    shapes = [_shape(field, item, depth + 1) for item in value]
    if any(shape != shapes[0] for shape in shapes):
        raise InvalidRequest(field, "a tensor must not be ragged: every row needs the same shape")
    return [len(value), *shapes[0]]


def _check_composite(field: str, value: Any, constraints: Mapping[str, Any], depth: int) -> None:
    if not isinstance(value, dict):
        raise InvalidRequest(field, f"a composite must be a JSON object, got {_show(value)}")
    for member, spec in (constraints.get("fields") or {}).items():
        where = f"{field}.{member}"
        if member not in value:
            raise InvalidRequest(where, "is missing (declared in fields)")
        member_constraints = {k: v for k, v in spec.items() if k != "type"}
        check_value(where, spec["type"], value[member], member_constraints, depth + 1)


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    # math.isfinite would overflow on a huge JSON integer; integers are finite anyway
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def _show(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else f"{text[:57]}..."
