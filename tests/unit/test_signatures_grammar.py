"""The DSPy-free signature grammar (``dspex.streams.signatures``) and DSPy's own Signature."""

from __future__ import annotations

import dspy
import pytest

from dspex.streams.errors import InvalidRequest
from dspex.streams.signatures import (
    RESERVED_NAMES,
    parse_field_list,
    parse_signature_fields,
)


def test_every_public_attribute_of_dspy_signature_is_reserved() -> None:
    public = {name for name in dir(dspy.Signature) if not name.startswith("_")}
    assert public <= RESERVED_NAMES, sorted(public - RESERVED_NAMES)


def test_fields_keep_their_order_and_types() -> None:
    parsed = parse_signature_fields("question, k: int -> answers: list[str], ok: bool")
    assert parsed.inputs == (("question", str), ("k", int))
    assert parsed.outputs == (("answers", list[str]), ("ok", bool))
    assert parsed.output("answers") == list[str] and parsed.input("nope") is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("question -> -> answer", "exactly one '->'"),
        ("question -> schema", "reserved"),
        ("q, q -> a", "duplicate"),
        ("q: list[Foo] -> a", "unsupported type"),
        ("-> a", "no input fields"),
    ],
)
def test_malformed_signatures_are_refused_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(InvalidRequest, match=reason) as info:
        parse_signature_fields(text)
    assert info.value.field == "signature"


def test_a_field_list_names_where_it_came_from() -> None:
    assert parse_field_list("question, topics: list[str]") == (
        ("question", str),
        ("topics", list[str]),
    )
    with pytest.raises(InvalidRequest) as info:
        parse_field_list("a, a", field="inputs")
    assert info.value.field == "inputs"


def test_a_stream_carries_the_last_text_output_else_the_last_output_as_json() -> None:
    from dspex.streams.signatures import stream_delta, stream_field

    text = parse_signature_fields("q -> answer, reasoning, confidence: float")
    assert stream_field(text) == ("answer", True)
    assert stream_delta(text, {"answer": '"Paris"', "confidence": "0.9"}) == "Paris"
    listed = parse_signature_fields("topic -> ideas: list[str], n: int")
    assert stream_field(listed) == ("n", False)
    assert stream_delta(listed, {"ideas": '["a"]', "n": "3"}) == "3"
