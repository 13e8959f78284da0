"""The record constructors of ``dspex.schemas.records`` against the ``.avsc`` contract.

Each constructor's parameters are its schema's fields with the schema's defaults
(adding a field to a schema fails here until the constructor learns it); a
record built from the required arguments alone round-trips through the serde;
and no dict literal elsewhere in the source writes a contract record by hand.
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
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


# -- (c) no contract record is written by hand outside schemas/records.py -----------------------

MIN_FIELDS = 5  # a dict literal naming this many fields of a record, or all of a small one ...
SMALLEST = 3  # ... of at least this many fields (a {"key": ..., "value": ...} is anything)


def hand_written(source: str, filename: str) -> list[str]:
    """``file:line Name`` for each dict literal in ``source`` that is a contract record.

    A literal is one when its constant keys include every required field of a
    record (those without a default) and at least :data:`MIN_FIELDS` of its fields
    (all of them for a record with fewer). ``dict(a=..., b=...)`` counts too.
    """
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        keys = _literal_keys(node)
        for name, definition in DEFINITIONS.items():
            fields = {f["name"] for f in definition["fields"]}
            required = {f["name"] for f in definition["fields"] if "default" not in f}
            enough = min(MIN_FIELDS, len(fields))
            if len(fields) >= SMALLEST and required <= keys and len(keys & fields) >= enough:
                found.append(f"{filename}:{getattr(node, 'lineno', 0)} {name}")
    return found


def _literal_keys(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Dict):
        return {
            k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)
        }
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
        return {k.arg for k in node.keywords if k.arg is not None}
    return set()


def sources() -> Iterator[Path]:
    for folder in ("agents", "streams", "schemas"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path != ROOT / "schemas" / "records.py":
                yield path


def test_no_contract_record_is_written_by_hand() -> None:
    found = [
        hit
        for path in sources()
        for hit in hand_written(path.read_text(), str(path.relative_to(ROOT)))
    ]
    assert found == [], "build these with dspex.schemas.records"


# Verbatim excerpts of what the guard replaced: a full Telemetry, a full Response,
# and a Response whose required fields sat in a shared head merged into each chunk.
# (Run over the whole tree as it was before dspex.schemas.records, the guard found
# 41 hand-written records, every one of which now goes through a constructor.)
OLD_FEEDBACK = """
def feedback_record(request_id, quality, *, program_id, variant=None):
    now = datetime.now(UTC)
    return {
        "kind": "feedback",
        "request_id": request_id,
        "program_id": program_id,
        "program_version": None,
        "pool": None,
        "variant": variant,
        "worker_id": None,
        "emitted_at": now.replace(microsecond=now.microsecond // 1000 * 1000),
        "latency_ms": None,
        "queue_wait_ms": None,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "cost_usd": None,
        "success": None,
        "error_class": None,
        "cache_hit": False,
        "quality": float(quality),
        "health": None,
    }
"""
OLD_CACHED_RESPONSE = """
def cached_response(request_id, outputs, program, now_ms):
    return {
        "request_id": request_id,
        "seq": 0,
        "final": True,
        "status": "ok",
        "delta": "",
        "outputs": dict(outputs),
        "error": None,
        "cached": True,
        "program_id": program.get("program_id"),
        "program_version": program.get("program_version"),
        "pool": None,
        "produced_at": now_ms,
    }
"""
OLD_RESPONSE_HEAD = """
def _response_head(request, pool, version):
    return {
        "request_id": request["request_id"],
        "cached": False,
        "program_id": request.get("program_id"),
        "program_version": version if version is not None else request.get("program_version"),
        "pool": pool,
        "produced_at": now(),
    }
"""
KEYWORD_DICT = """
beat = dict(kind="health", pool=pool, worker_id=worker_id, emitted_at=now(), health=sample)
"""


@pytest.mark.parametrize(
    ("source", "name"),
    [
        (OLD_FEEDBACK, "Telemetry"),
        (OLD_CACHED_RESPONSE, "Response"),
        (OLD_RESPONSE_HEAD, "Response"),
        (KEYWORD_DICT, "Telemetry"),
    ],
)
def test_the_guard_catches_the_hand_written_records_it_replaced(source: str, name: str) -> None:
    assert [hit.split()[-1] for hit in hand_written(textwrap.dedent(source), "old.py")] == [name]


def test_the_guard_leaves_partial_field_sets_alone() -> None:
    source = """
    fields = {"program_id": p, "program_version": v, "signature": s, "module_type": m,
              "module_config_json": c, "state_json": j, "tools": t}
    wanted = {"stage": s, "error_class": e, "request_id": r, "component": c}
    """
    assert hand_written(textwrap.dedent(source), "partial.py") == []
