"""Apply DSPy JSON program state (demos, instructions) to a built module, safely.

DSPy 3.4's ``Predict.load_state(state, allow_unsafe_lm_state=False)`` drops
``api_base``/``base_url``/``model_list`` from a saved ``"lm"`` entry and refuses custom
LM classes — but it still builds a ``dspy.LM`` from the rest (any model name) and pins
it to the predictor, where it overrides the worker's ``dspy.context(lm=...)``; and it
``setattr``s every other key of the predictor state (``"config"`` becomes LM kwargs).
So DSPex strips ``"lm"`` entirely, accepts only the keys ``Predict.dump_state`` writes,
and loads each predictor with unsafe LM state off.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import dspy

from dspex.streams.errors import ProgramError

logger = logging.getLogger(__name__)

_PREDICTOR_KEYS = frozenset({"demos", "signature", "traces", "train", "fields", "lm"})
_TOP_LEVEL_EXTRA = frozenset({"metadata"})


def apply_state(module: dspy.Module, state_json: str | None) -> None:
    """Load ``state_json`` (``module.dump_state()`` as JSON) into ``module``'s predictors."""
    if state_json in (None, "", "{}"):
        return
    state = _decode(state_json)
    predictors = dict(module.named_predictors())
    unknown = sorted(set(state) - set(predictors) - _TOP_LEVEL_EXTRA)
    if unknown:
        raise ProgramError(
            f"state_json: no predictor named {unknown[0]!r} (the module has {sorted(predictors)})"
        )
    for name, predictor in predictors.items():
        if name in state:
            safe = _safe(name, state[name])
            safe["signature"] = safe["signature"] or predictor.signature.dump_state()
            predictor.load_state(safe, allow_unsafe_lm_state=False)


def _decode(state_json: str | None) -> dict[str, Any]:
    try:
        state = json.loads(state_json or "{}")
    except ValueError as exc:
        raise ProgramError(f"state_json: invalid JSON: {exc}") from exc
    if not isinstance(state, dict):
        raise ProgramError("state_json: must be a JSON object of predictor states")
    return state


def _safe(name: str, entry: Any) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise ProgramError(f"state_json: {name}: predictor state must be an object")
    unknown = sorted(set(entry) - _PREDICTOR_KEYS)
    if unknown:
        raise ProgramError(f"state_json: {name}: unsupported key {unknown[0]!r}")
    if entry.get("lm"):
        logger.warning("ignoring LM state in program state predictor=%s", name)
    _check_demos(name, entry.get("demos", []))
    safe = {"demos": entry.get("demos", []), "traces": [], "train": [], "lm": None}
    safe["signature"] = _signature_state(name, entry.get("signature"))
    if "fields" in entry:
        safe["fields"] = entry["fields"]
    return safe


def _check_demos(name: str, demos: Any) -> None:
    if not isinstance(demos, list) or not all(isinstance(demo, dict) for demo in demos):
        raise ProgramError(f"state_json: {name}: demos must be a list of objects")


def _signature_state(name: str, signature: Any) -> dict[str, Any] | None:
    if signature is None:
        return None
    fields = signature.get("fields", []) if isinstance(signature, dict) else None
    instructions = signature.get("instructions") if isinstance(signature, dict) else None
    if not isinstance(instructions, str) or not isinstance(fields, list):
        raise ProgramError(f"state_json: {name}: signature needs instructions and fields")
    for field in fields:
        if not isinstance(field, dict) or not all(
            isinstance(field.get(key), str) for key in ("prefix", "description")
        ):
            raise ProgramError(f"state_json: {name}: signature fields need prefix and description")
    return {"instructions": instructions, "fields": fields}
