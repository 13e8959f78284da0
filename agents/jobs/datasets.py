"""Examples for optimizer jobs: inline JSON, or a topic of examples; the train/validation split.

An example is a JSON object holding the signature's input fields (all of them)
and at least one labelled output field; it becomes a ``dspy.Example`` whose
inputs are the signature's inputs. A topic of examples holds JSON objects, or
``io.dspex.Execution`` records (the audit log: a successful execution's inputs
and outputs are an example), read from the beginning to the end seen at start.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Sequence
from typing import Any

import dspy

from dspex.streams import kafka
from dspex.streams.errors import DSPexError, InvalidRequest
from dspex.streams.reader import scan_to_end
from dspex.streams.serde import Serde
from dspex.streams.settings import Settings


def examples_from_json(dataset_json: str, signature: type[dspy.Signature]) -> list[dspy.Example]:
    """Inline examples: a JSON array of objects with the inputs and at least one label."""
    rows = _json_list("dataset_json", dataset_json)
    return [example_from(row, signature, f"dataset_json[{i}]") for i, row in enumerate(rows)]


def _json_list(where: str, text: str) -> list[Any]:
    try:
        rows = json.loads(text, parse_constant=_refuse)
    except ValueError as exc:
        raise InvalidRequest(where, f"invalid JSON: {exc}") from exc
    if not isinstance(rows, list) or not rows:
        raise InvalidRequest(where, "must be a non-empty JSON array of example objects")
    return rows


def example_from(row: Any, signature: type[dspy.Signature], where: str) -> dspy.Example:
    """One example: the signature's inputs (all required) and its labelled output fields."""
    if not isinstance(row, dict):
        raise InvalidRequest(where, "an example must be a JSON object")
    inputs = list(signature.input_fields)
    missing = [name for name in inputs if name not in row]
    if missing:
        raise InvalidRequest(f"{where}.{missing[0]}", "missing input field")
    labels = [name for name in signature.output_fields if name in row]
    if not labels:
        outputs = ", ".join(signature.output_fields)
        raise InvalidRequest(where, f"no labelled output field (one of: {outputs})")
    return dspy.Example({name: row[name] for name in [*inputs, *labels]}).with_inputs(*inputs)


def split(
    examples: Sequence[dspy.Example], val_fraction: float, seed: str
) -> tuple[list[dspy.Example], list[dspy.Example]]:
    """``(train, val)``: a deterministic shuffle (seeded by the job id), ``val_fraction`` held out.

    With no fraction or fewer than two examples, both are every example.
    """
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)  # noqa: S311 - a reproducible split, not security
    held = min(len(shuffled) - 1, max(1, round(len(shuffled) * val_fraction)))
    if val_fraction == 0 or held < 1:
        return shuffled, shuffled
    return shuffled[held:], shuffled[:held]


def examples_from_topic(
    settings: Settings, serde: Serde, topic: str, signature: type[dspy.Signature]
) -> list[dspy.Example]:
    """Examples from a topic: JSON objects, or Execution records (inputs + outputs)."""
    examples = []
    for index, value in enumerate(_topic_values(settings, topic)):
        row = _row(serde, topic, value)
        if row is not None:
            examples.append(example_from(row, signature, f"dataset_topic[{index}]"))
    if not examples:
        raise InvalidRequest("dataset_topic", f"no examples on topic {topic}")
    return examples


def _topic_values(settings: Settings, topic: str) -> list[bytes]:
    consumer = kafka.consumer(settings, f"dspex-jobs-dataset-{uuid.uuid4().hex}")
    try:
        return [value for m in scan_to_end(consumer, topic, 60.0) if (value := m.value())]
    finally:
        consumer.close()


def _row(serde: Serde, topic: str, value: bytes) -> dict[str, Any] | None:
    try:
        row = json.loads(value)
        return row if isinstance(row, dict) else None
    except ValueError:
        pass
    try:
        execution = serde.decode(value, topic=topic, expect="Execution").record
    except DSPexError:
        return None
    if execution.get("error") is not None:
        return None
    fields = {**execution["inputs"], **execution["outputs"]}
    return {name: json.loads(raw) for name, raw in fields.items()}


def _refuse(token: str) -> Any:
    raise ValueError(f"{token} is not allowed")
