"""The DSPy adapter a program's LM calls use, chosen per program (and per LM backend).

A program names one of :data:`dspex.streams.programs.ADAPTERS`; the worker runs it
under ``dspy.context(adapter=...)`` (:func:`dspex.agents.runtime.runner.run`).
``auto`` (and no name) picks ``JSONAdapter`` when the signature has a typed
(non-``str``) output and the backend supports structured output, else ``ChatAdapter``.
``JSONAdapter`` itself asks a backend for its structured-output mode
(``response_format``) where the backend declares one — DSPy reads that from LiteLLM's
model catalog, or from a custom engine's ``supports_response_schema``. ``TwoStepAdapter``
extracts the fields from the first, free-form answer with a second call to the same LM.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import dspy

from dspex.streams.errors import InvalidRequest
from dspex.streams.programs import AUTO, check_adapter

__all__ = ["adapter_name", "make_adapter", "supports_structured_output"]

VARIABLE = "adapter"
"""The shared variable that overrides a program's adapter (a ``choice`` variable)."""


def adapter_name(program_adapter: str | None, variables: Mapping[str, str]) -> str:
    """The adapter a run uses: the ``adapter`` variable, else the program's, else ``auto``."""
    if VARIABLE in variables:
        try:
            value = json.loads(variables[VARIABLE])
        except ValueError as exc:
            raise InvalidRequest(f"variables.{VARIABLE}", f"invalid JSON: {exc}") from exc
        if not isinstance(value, str):
            raise InvalidRequest(f"variables.{VARIABLE}", "must be a JSON string")
        return check_adapter(value, field=f"variables.{VARIABLE}")
    return check_adapter(program_adapter)


def supports_structured_output(lm: Any) -> bool:
    """Whether the backend declares a structured-output mode (DSPy's own capability check)."""
    try:
        return bool(lm.supports_response_schema) or "response_format" in lm.supported_params
    except Exception:  # an unknown model in LiteLLM's catalog: assume none
        return False


def make_adapter(name: str, lm: Any, signature: type[dspy.Signature]) -> dspy.Adapter:
    """The adapter ``name`` (checked) for a run of ``signature`` on ``lm``."""
    name = check_adapter(name)
    if name == AUTO:
        typed = any(info.annotation is not str for info in signature.output_fields.values())
        name = "JSONAdapter" if typed and supports_structured_output(lm) else "ChatAdapter"
    if name == "JSONAdapter":
        return dspy.JSONAdapter()
    if name == "XMLAdapter":
        return dspy.XMLAdapter()
    if name == "TwoStepAdapter":
        return dspy.TwoStepAdapter(extraction_model=lm)
    return dspy.ChatAdapter()
