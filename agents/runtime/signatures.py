"""Signature strings to DSPy signatures, and JSON input values checked against them.

The grammar lives in :mod:`dspex.streams.signatures` (no DSPy, so the client checks
with it too); here its fields become a DSPy signature through ``dspy.make_signature``
with explicit ``(type, Field)`` pairs — never DSPy's own string parser, which
resolves type names through Python's namespace. A ``History`` input becomes a
``dspy.History`` field; its value is never taken from a request but from
``runtime.history.session_history``, which the worker sets to the session's
earlier turns (``dspex.agents.worker.sessions``) around each run.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import dspy

from dspex.agents.runtime.history import session_history
from dspex.streams.errors import InvalidRequest
from dspex.streams.signatures import (
    HISTORY,
    MAX_SIGNATURE_BYTES,
    decode_value,
    matches,
    parse_signature_fields,
    parse_type,
    type_name,
)

__all__ = [
    "MAX_SIGNATURE_BYTES",
    "decode_inputs",
    "matches",
    "parse_signature",
    "parse_type",
    "session_history",
    "type_name",
]


@functools.lru_cache(maxsize=512)
def parse_signature(text: str) -> type[dspy.Signature]:
    """A DSPy signature class for ``text``; ``InvalidRequest(field="signature")`` when malformed."""
    parsed = parse_signature_fields(text)
    fields: dict[str, Any] = {
        name: (dspy.History if kind is HISTORY else kind, dspy.InputField())
        for name, kind in parsed.inputs
    }
    fields.update({name: (kind, dspy.OutputField()) for name, kind in parsed.outputs})
    try:
        signature: type[dspy.Signature] = dspy.make_signature(fields)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest("signature", f"cannot build signature: {exc}") from exc
    return signature


def decode_inputs(
    signature: type[dspy.Signature], inputs_json: dict[str, str] | Any
) -> dict[str, Any]:
    """Decode each JSON input and check it against the signature's input fields."""
    expected = signature.input_fields
    unknown = sorted(set(inputs_json) - set(expected))
    if unknown:
        raise InvalidRequest(
            f"inputs.{unknown[0]}", f"not an input of the signature ({', '.join(expected)})"
        )
    decoded: dict[str, Any] = {}
    for name, info in expected.items():
        if info.annotation is dspy.History:
            decoded[name] = _history(name, inputs_json)
            continue
        if name not in inputs_json:
            raise InvalidRequest(f"inputs.{name}", "missing input")
        decoded[name] = decode_value(f"inputs.{name}", inputs_json[name], info.annotation)
    return decoded


def _history(name: str, inputs_json: Mapping[str, Any]) -> dspy.History:
    if name in inputs_json:
        raise InvalidRequest(
            f"inputs.{name}",
            "a History input is filled in by the worker from the session's earlier turns;"
            " a request must not send it (send session_id instead)",
        )
    return dspy.History(messages=[dict(message) for message in session_history.get()])
