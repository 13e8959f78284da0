"""What a program may name, checked without DSPy: module types, module configs, adapters.

The client checks a program with :func:`check_program` before it produces a
ProgramVersion (``dspex programs put``) or an inline Request; the router and the
workers run the same checks (``dspex.agents.runtime.programs.validate``), so both
refuse the same programs with the same messages. Module types are the built-in
DSPy ones plus the *deployed* modules an operator allowlisted in settings
(``modules``: name -> ``package.module:Class``, see ``docs/modules.md``); their
names are known from settings alone, nothing is imported here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from typing import Any

from dspex.streams._vartypes import MODULE_TYPES, decode_json_object
from dspex.streams.errors import InvalidRequest
from dspex.streams.signatures import parse_signature_fields

__all__ = [
    "ADAPTERS",
    "AUTO",
    "BUILTIN_MODULES",
    "IMPORT_PATH",
    "check_adapter",
    "check_import_path",
    "check_module_type",
    "check_program",
    "parse_module_config",
]

BUILTIN_MODULES: frozenset[str] = frozenset(MODULE_TYPES)
"""The DSPy module types every worker can build (``dspex.agents.runtime.modules``)."""

AUTO = "auto"
ADAPTERS: tuple[str, ...] = ("ChatAdapter", "JSONAdapter", "XMLAdapter", "TwoStepAdapter", AUTO)
"""The DSPy adapters a program may name; ``auto``: JSON for typed outputs where the
backend supports it, Chat otherwise. A program naming none runs with ``auto``."""

IMPORT_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
"""``package.module:Attribute`` — the only form an allowlisted import path may take."""

_CONFIG = "module_config_json"
_LM_KEYS: dict[str, tuple[type, float, float]] = {
    "temperature": (float, 0.0, 2.0),
    "max_tokens": (int, 1, 100_000),
}
_ALLOWED: dict[str, dict[str, tuple[type, float, float]]] = {
    "Predict": _LM_KEYS,
    "ChainOfThought": _LM_KEYS,
    "ReAct": {"max_iters": (int, 1, 50)},
    "BestOfN": {"N": (int, 1, 16), "threshold": (float, -1e9, 1e9), "fail_count": (int, 0, 16)},
    "Refine": {"N": (int, 1, 16), "threshold": (float, -1e9, 1e9), "fail_count": (int, 0, 16)},
}
_CHOICES: dict[str, set[str]] = {"module": {"Predict", "ChainOfThought"}, "reward": {"nonempty"}}


def check_program(
    signature: str,
    *,
    module_type: str,
    module_config_json: str = "{}",
    adapter: str | None = None,
    deployed: Collection[str] = (),
) -> None:
    """Refuse a program the router would refuse: ``InvalidRequest`` naming the field.

    ``deployed`` is the allowlisted module names (``settings.modules``). Tools are
    registered per worker deployment and checked by the router.
    """
    parse_signature_fields(signature)
    check_module_type(module_type, deployed)
    parse_module_config(module_type, module_config_json, deployed=deployed)
    check_adapter(adapter)


def check_module_type(module_type: str, deployed: Collection[str] = ()) -> None:
    """``module_type`` is built in or allowlisted; ``InvalidRequest(field="module_type")``."""
    if module_type in BUILTIN_MODULES or module_type in deployed:
        return
    known = ", ".join(sorted(BUILTIN_MODULES))
    extra = ", ".join(sorted(deployed)) or "none"
    raise InvalidRequest(
        "module_type",
        f"unknown module type {module_type!r} (built in: {known}; deployed: {extra})",
    )


def check_adapter(adapter: str | None, *, field: str = "adapter") -> str:
    """The adapter name (``auto`` for none); ``InvalidRequest(field)`` for an unknown one."""
    if adapter is None or adapter == "":
        return AUTO
    if adapter not in ADAPTERS:
        raise InvalidRequest(field, f"unknown adapter {adapter!r} (known: {', '.join(ADAPTERS)})")
    return adapter


def check_import_path(name: str, path: str, where: str) -> None:
    """An allowlist entry: an identifier mapped to ``package.module:Attribute``."""
    if not name.isidentifier():
        raise ValueError(f"{where}: {name!r} is not an identifier")
    if not IMPORT_PATH.match(path):
        raise ValueError(f"{where}.{name}: {path!r} is not 'package.module:Attribute'")


def parse_module_config(
    module_type: str, config_json: str, *, deployed: Collection[str] = ()
) -> dict[str, Any]:
    """The decoded, whitelisted config; ``InvalidRequest(field="module_config_json")`` otherwise.

    A deployed module's keys are its constructor's keyword parameters, which only a
    worker that imported it knows (``dspex.agents.runtime.modules``): here its config
    must be a JSON object of plain JSON values.
    """
    config = decode_json_object(_CONFIG, config_json or "{}")
    if module_type in deployed and module_type not in BUILTIN_MODULES:
        return config
    allowed = _ALLOWED.get(module_type, {})
    choices = _CHOICES if module_type in ("BestOfN", "Refine") else {}
    for key, value in config.items():
        if key in allowed:
            _check_number(key, value, *allowed[key])
        elif key in choices:
            _check_choice(key, value, choices[key])
        else:
            names = ", ".join(sorted([*allowed, *choices])) or "none"
            raise InvalidRequest(
                _CONFIG, f"unknown key {key!r} for {module_type} (allowed: {names})"
            )
    return config


def _check_number(key: str, value: Any, kind: type, low: float, high: float) -> None:
    ok_type = isinstance(value, int | float) if kind is float else isinstance(value, int)
    if isinstance(value, bool) or not ok_type or not math.isfinite(value):
        raise InvalidRequest(_CONFIG, f"{key} must be a{'n integer' if kind is int else ' number'}")
    if not low <= value <= high:
        raise InvalidRequest(_CONFIG, f"{key} must be between {low:g} and {high:g}")


def _check_choice(key: str, value: Any, options: set[str]) -> None:
    if value not in options:
        raise InvalidRequest(_CONFIG, f"{key} must be one of {sorted(options)}")
