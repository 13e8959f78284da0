"""The reply formats DSPy's adapters ask for, read and written by DSPex's SIMULATED LMs.

A simulation (``echo``, ``simulations``) must answer in the format the program's
adapter asks for, or DSPy cannot parse it — as a real model would. :func:`read_prompt`
tells which adapter built a prompt (from the instructions each one writes) and
returns its input values and output fields; :func:`render` writes the reply in that
format from one text value per output field (the values a ChatAdapter reply would
carry: plain text, ``0.5``, ``["a"]``):

* ``chat`` — ``[[ ## field ## ]]`` blocks, then ``[[ ## completed ## ]]`` (ChatAdapter);
* ``json`` — one JSON object (JSONAdapter);
* ``xml`` — ``<field>...</field>`` elements, lists as ``<item>`` elements (XMLAdapter);
* ``text`` — ``field: value`` lines (TwoStepAdapter's first, free-form call);
* ``extract`` — TwoStepAdapter's second call (a ChatAdapter prompt over the first
  reply's ``text``): the values are read back from that text, verbatim.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from dspex.agents.runtime.lms.base import prompt_inputs, prompt_output_fields

CHAT, JSON, XML, TEXT, EXTRACT = "chat", "json", "xml", "text", "extract"

_JSON_ASK = "Respond with a JSON object"
_XML_ASK = "wrapped in XML tags"
_TWO_STEP = "You are a helpful assistant that can solve tasks based on user input."
_EXTRACT = "Your job is to extract the fields from the text verbatim."
_XML_INPUT = re.compile(r"<(\w+)>\n?(.*?)\n?</\1>", re.DOTALL)
_TEXT_LINE = re.compile(r"^(\w+): ?(.*)$")
_FIELD_LINE = re.compile(r"^\d+\. `(\w+)` \((.*?)\):", re.MULTILINE)


@dataclass(frozen=True)
class Prompt:
    """What one prompt asks: its format, input values (in order) and output fields."""

    format: str
    inputs: dict[str, str]
    outputs: list[tuple[str, str]]
    """(name, type text such as ``str`` or ``list[str]``) per output field, in order."""


def read_prompt(system: str, user: str) -> Prompt:
    """The format, inputs and outputs of a prompt built by one of DSPy's adapters."""
    if system.startswith(_TWO_STEP):
        _, _, section = system.partition("Your outputs must contain:")
        return Prompt(TEXT, _text_values(user), _FIELD_LINE.findall(section))
    outputs = prompt_output_fields(system)
    if _EXTRACT in system:
        return Prompt(EXTRACT, _text_values(prompt_inputs(user).get("text", "")), outputs)
    if _XML_ASK in user:
        head, _, _ = user.partition("\n\nRespond with the corresponding output fields")
        values = {name: body.strip() for name, body in _XML_INPUT.findall(head)}
        return Prompt(XML, values, outputs)
    if _JSON_ASK in user:
        head, _, _ = user.partition(f"\n\n{_JSON_ASK}")
        return Prompt(JSON, prompt_inputs(head), outputs)
    return Prompt(CHAT, prompt_inputs(user), outputs)


def _text_values(text: str) -> dict[str, str]:
    """``name: value`` lines (TwoStepAdapter's inputs, and the first reply of its answers)."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        match = _TEXT_LINE.match(line)
        if match:
            values[match.group(1)] = match.group(2).strip()
    return values


def render(fmt: str, fields: list[tuple[str, str, str]]) -> str:
    """The reply in ``fmt`` for (name, type text, value text) per output field."""
    if fmt == JSON:
        return json.dumps({name: _json_value(kind, value) for name, kind, value in fields})
    if fmt == XML:
        return "\n".join(
            f"<{name}>{_xml_value(kind, value)}</{name}>" for name, kind, value in fields
        )
    if fmt == TEXT:
        return "\n\n".join(f"{name}: {value}" for name, _, value in fields)
    blocks = [f"[[ ## {name} ## ]]\n{value}" for name, _, value in fields]
    return "\n\n".join([*blocks, "[[ ## completed ## ]]"])


def _json_value(kind: str, value: str) -> Any:
    if kind == "str" or kind.startswith("Literal["):
        return value
    try:
        return json.loads(value if kind != "bool" else value.lower())
    except ValueError:
        return value


def _xml_value(kind: str, value: str) -> str:
    if kind.startswith("list["):
        try:
            items = json.loads(value)
        except ValueError:
            return value
        if isinstance(items, list):
            return "".join(f"<item>{item}</item>" for item in items)
    return value
