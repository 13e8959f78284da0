"""The record constructors of ``dspex.schemas.records`` against the ``.avsc`` contract.

Each constructor's parameters are its schema's fields with the schema's defaults
(adding a field to a schema fails here until the constructor learns it); a
record built from the required arguments alone round-trips through the serde;
and no dict literal elsewhere in the source writes a contract record by hand.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Any

import fastavro
import pytest

from dspex import schemas
from dspex.schemas import records
from dspex.streams.serde import make_serde
from dspex.streams.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
TOPIC = "dspex.test"
Definition = dict[str, Any]


def _nested(avro_type: Any) -> Iterator[Definition]:
    """Record definitions inlined anywhere in ``avro_type``, outermost first."""
    if isinstance(avro_type, list):
        for branch in avro_type:
            yield from _nested(branch)
    elif isinstance(avro_type, dict):
        if avro_type.get("type") == "record":
            yield avro_type
            for field in avro_type["fields"]:
                yield from _nested(field["type"])
        else:
            yield from _nested(avro_type.get("items") or avro_type.get("values"))


def definitions() -> dict[str, Definition]:
    """Every record of the contract by short name: top-level and nested."""
    found: dict[str, Definition] = {}
    for name in schemas.names():
        for definition in _nested(schemas.current(name).definition):
            found.setdefault(definition["name"], definition)
    return found


DEFINITIONS = definitions()
TOP_LEVEL = schemas.names()
NESTED = sorted(set(DEFINITIONS) - set(TOP_LEVEL))


def snake(name: str) -> str:
    """The constructor's name for a record: ``ErrorInfo`` -> ``error_info``."""
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


def constructor(name: str) -> Callable[..., dict[str, Any]]:
    """``records.<snake(name)>``."""
    build: Callable[..., dict[str, Any]] = getattr(records, snake(name))
    return build


def _sample(avro_type: Any) -> Any:
    """A value of ``avro_type``; a timestamp keeps its microseconds, to prove the rounding."""
    if isinstance(avro_type, list):
        return _sample(next(branch for branch in avro_type if branch != "null"))
    if isinstance(avro_type, str):
        if avro_type in DEFINITIONS:
            return required_only(avro_type)
        return {"string": "x", "int": 7, "long": 7, "double": 0.5, "boolean": True, "bytes": b"x"}[
            avro_type
        ]
    if avro_type.get("logicalType") == "timestamp-millis":
        return datetime(2026, 1, 2, 3, 4, 5, 678_901, tzinfo=UTC)
    if avro_type["type"] == "record":
        return required_only(avro_type["name"])
    if avro_type["type"] == "array":
        return [_sample(avro_type["items"])]
    if avro_type["type"] == "map":
        return {"k": _sample(avro_type["values"])}
    return _sample(avro_type["type"])


def required_only(name: str) -> dict[str, Any]:
    """A ``name`` record built from sample values of its required fields alone."""
    fields = DEFINITIONS[name]["fields"]
    return constructor(name)(
        **{f["name"]: _sample(f["type"]) for f in fields if "default" not in f}
    )


# -- (a) the signatures are the schemas --------------------------------------------------------


def test_every_record_of_the_contract_has_a_constructor() -> None:
    missing = [name for name in DEFINITIONS if not callable(getattr(records, snake(name), None))]
    assert missing == []
    assert len(TOP_LEVEL) == 11
    assert {"ErrorInfo", "Route", "Health", "Usage", "Timings"} <= set(NESTED)


@pytest.mark.parametrize("name", sorted(DEFINITIONS))
def test_the_parameters_are_the_schema_fields_in_order(name: str) -> None:
    parameters = inspect.signature(constructor(name)).parameters
    assert list(parameters) == [f["name"] for f in DEFINITIONS[name]["fields"]]
    assert {p.kind for p in parameters.values()} == {inspect.Parameter.KEYWORD_ONLY}


@pytest.mark.parametrize("name", sorted(DEFINITIONS))
def test_required_fields_have_no_default_and_null_unions_default_to_none(name: str) -> None:
    parameters = inspect.signature(constructor(name)).parameters
    for field in DEFINITIONS[name]["fields"]:
        default = parameters[field["name"]].default
        if "default" not in field:
            assert default is inspect.Parameter.empty, field["name"]
        elif field["default"] is None:
            assert default is None, field["name"]
        else:
            assert default is not inspect.Parameter.empty, field["name"]


@pytest.mark.parametrize("name", sorted(DEFINITIONS))
def test_a_field_left_out_takes_the_schema_default(name: str) -> None:
    record = required_only(name)
    defaults = {f["name"]: f["default"] for f in DEFINITIONS[name]["fields"] if "default" in f}
    assert {k: record[k] for k in defaults} == defaults


# -- (b) what they build is what the serde encodes ---------------------------------------------


@pytest.mark.parametrize("name", TOP_LEVEL)
def test_a_record_of_required_fields_round_trips_through_the_serde(name: str) -> None:
    serde = make_serde(Settings())
    record = required_only(name)
    decoded = serde.decode(serde.encode(name, record, topic=TOPIC), topic=TOPIC, expect=name)
    assert decoded.record == record


@pytest.mark.parametrize("name", NESTED)
def test_a_nested_record_round_trips_through_its_schema(name: str) -> None:
    parsed = fastavro.parse_schema({**DEFINITIONS[name], "namespace": schemas.NAMESPACE})
    record = required_only(name)
    out = BytesIO()
    fastavro.schemaless_writer(out, parsed, record)
    assert fastavro.schemaless_reader(BytesIO(out.getvalue()), parsed) == record


def test_timestamps_are_truncated_to_the_millisecond_and_epoch_ms_kept() -> None:
    moment = datetime(2026, 1, 2, 3, 4, 5, 678_901, tzinfo=UTC)
    record = records.job_control(job_id="j", action="cancel", requested_at=moment)
    assert record["requested_at"] == moment.replace(microsecond=678_000)
    assert records.job_control(job_id="j", action="cancel", requested_at=5)["requested_at"] == 5


def test_maps_and_arrays_are_copied_not_shared() -> None:
    tools, metadata = ("search",), {"tenant": "acme"}
    record = records.request(request_id="r", created_at=0, tools=tools, metadata=metadata)
    assert record["tools"] == ["search"]
    assert record["metadata"] == metadata
    assert record["metadata"] is not metadata
    assert records.request(request_id="r", created_at=0)["inputs"] == {}
