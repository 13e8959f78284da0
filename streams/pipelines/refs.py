"""The reference grammar of pipelines: where a stage input, a map or a condition reads from.

A reference is one of::

    $input.<field>          the run's input field
    $stage.<name>.<field>   an earlier stage's output field (a map stage: the list of
                            its items' values, in input order)
    $item                   inside a map stage: the current item
    $item.<field>           inside a map stage: a field of the current item (an object)

Nothing is evaluated: a reference is parsed into a :class:`Ref` and looked up.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from dspex.streams.errors import InvalidRequest

__all__ = ["FIELD_NAME", "STAGE_NAME", "Ref", "parse_ref", "resolve"]

FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
"""A signature field name."""
STAGE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
"""A stage name: letters, digits, ``_`` and ``-`` (not leading ``-``)."""

_F, _S = FIELD_NAME.pattern, STAGE_NAME.pattern
_REF = re.compile(
    rf"\$(?:input\.(?P<input>{_F})|stage\.(?P<stage>{_S})\.(?P<sfield>{_F})"
    rf"|item(?:\.(?P<ifield>{_F}))?)"
)

Kind = Literal["input", "stage", "item"]


@dataclass(frozen=True)
class Ref:
    """One parsed reference; ``text`` is how it was written."""

    kind: Kind
    field: str | None
    stage: str | None = None
    text: str = ""

    def __str__(self) -> str:
        return self.text


def parse_ref(text: str, *, where: str = "reference") -> Ref:
    """Parse ``text``, or raise :class:`InvalidRequest` naming ``where``.

    ``where`` is the path of the reference in the pipeline, e.g. ``stages.answer.inputs.q``.
    """
    match = _REF.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise InvalidRequest(
            where,
            f"{text!r} is not a reference: use $input.<field>, $stage.<name>.<field>, "
            "$item or $item.<field>",
        )
    if match["input"] is not None:
        return Ref("input", match["input"], text=text)
    if match["stage"] is not None:
        return Ref("stage", match["sfield"], stage=match["stage"], text=text)
    return Ref("item", match["ifield"], text=text)


def resolve(
    ref: Ref,
    inputs: Mapping[str, Any],
    stages: Mapping[str, Mapping[str, Any]],
    item: Any = None,
) -> Any:
    """The value ``ref`` names, given decoded run inputs, stage outputs and the map item.

    Raises :class:`KeyError` naming the reference when the value is not there (a
    validated pipeline only asks for what is ready, so this signals a bug or bad input).
    """
    field = ref.field or ""
    if ref.kind == "input":
        if field not in inputs:
            raise KeyError(ref.text)
        return inputs[field]
    if ref.kind == "stage":
        outputs = stages.get(ref.stage or "")
        if outputs is None or field not in outputs:
            raise KeyError(ref.text)
        return outputs[field]
    if ref.field is None:
        return item
    if not isinstance(item, Mapping) or field not in item:
        raise KeyError(ref.text)
    return item[field]
