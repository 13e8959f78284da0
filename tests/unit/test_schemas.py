"""The Avro contract in schemas/: files parse everywhere, are documented, fingerprint per spec."""

from __future__ import annotations

import ast
import io
import json
from pathlib import Path
from typing import Any

import avro.schema
import fastavro
import pytest
from fastavro.validation import validate

from dspex import schemas
from dspex.schemas.evolution import records
from dspex.schemas.registry import PACKAGE_DIR, SchemaStore, rabin_fingerprint
from dspex.schemas.samples import sample

EXPECTED = [
    "DeadLetter",
    "Execution",
    "JobCheckpoint",
    "JobControl",
    "MetricSnapshot",
    "OptimizationJob",
    "PipelineRun",
    "PipelineVersion",
    "ProgramVersion",
    "Request",
    "Response",
    "RoutingTable",
    "SessionState",
    "Telemetry",
    "VariableUpdate",
]
AVSC_FILES = sorted(PACKAGE_DIR.glob("*.avsc")) + sorted(PACKAGE_DIR.glob("history/*.avsc"))

EMPTY64 = 0xC15D213AA4D7A795


def spec_fingerprint64(data: bytes) -> int:
    """The Avro specification's reference CRC-64-AVRO (Rabin) algorithm, transcribed."""
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (EMPTY64 & -(fp & 1))
        table.append(fp)
    fp = EMPTY64
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def test_names_are_the_records_sorted() -> None:
    assert schemas.names() == EXPECTED


@pytest.mark.parametrize("path", AVSC_FILES, ids=lambda p: p.name)
def test_every_avsc_parses_standalone_with_fastavro_and_apache_avro(path: Path) -> None:
    definition = load(path)
    fastavro.parse_schema(definition)
    parsed = avro.schema.parse(path.read_text(encoding="utf-8"))
    assert isinstance(parsed, avro.schema.RecordSchema)
    assert parsed.fullname == f"io.dspex.{path.name.split('.')[0]}"


@pytest.mark.parametrize("path", AVSC_FILES, ids=lambda p: p.name)
def test_every_record_and_field_has_a_doc(path: Path) -> None:
    for full_name, record in records(load(path)):
        assert record.get("doc", "").strip(), full_name
        for field in record["fields"]:
            assert field.get("doc", "").strip(), f"{full_name}.{field['name']}"


@pytest.mark.parametrize("name", EXPECTED)
def test_current_schema_describes_itself(name: str) -> None:
    schema = schemas.current(name)
    assert schema.name == name
    assert schema.full_name == f"io.dspex.{name}"
    assert schema.definition["namespace"] == "io.dspex"
    assert schema.version >= 1
    assert schema.canonical.startswith(f'{{"name":"io.dspex.{name}","type":"record"')
    assert '"doc"' not in schema.canonical and '"default"' not in schema.canonical


@pytest.mark.parametrize("name", EXPECTED)
def test_fingerprint_is_the_spec_rabin_of_the_canonical_form(name: str) -> None:
    schema = schemas.current(name)
    assert schema.fingerprint == spec_fingerprint64(schema.canonical.encode("utf-8"))
    assert 0 <= schema.fingerprint < 2**64


def test_rabin_fingerprint_matches_spec_on_primitive() -> None:
    assert rabin_fingerprint('"int"') == spec_fingerprint64(b'"int"')


@pytest.mark.parametrize("name", EXPECTED)
def test_sample_validates_and_round_trips(name: str) -> None:
    schema = schemas.current(name)
    record = sample(name)
    assert validate(record, schema.parsed, strict=True)
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, schema.parsed, record)
    buffer.seek(0)
    assert fastavro.schemaless_reader(buffer, schema.parsed) == record


def test_samples_are_fresh_each_call() -> None:
    assert sample("Request")["request_id"] != sample("Request")["request_id"]


def test_unknown_schema_names_the_name_and_the_known_ones() -> None:
    with pytest.raises(schemas.UnknownSchema) as info:
        schemas.current("Reqest")
    assert "Reqest" in str(info.value) and "Request" in str(info.value)
    assert isinstance(info.value, schemas.SchemaContractError)
    with pytest.raises(schemas.UnknownSchema):
        sample("Reqest")


def test_by_fingerprint_finds_every_version_of_every_schema() -> None:
    for name in EXPECTED:
        for schema in schemas.versions(name):
            assert schemas.by_fingerprint(schema.fingerprint) == schema
    assert schemas.by_fingerprint(0) is None


def test_versions_end_with_current_and_are_unique_by_fingerprint() -> None:
    for name in EXPECTED:
        found = schemas.versions(name)
        assert found[-1] == schemas.current(name)
        assert len({s.fingerprint for s in found}) == len(found)
        assert [s.version for s in found] == sorted(s.version for s in found)


def test_shipped_history_holds_v1_of_every_schema() -> None:
    for name in EXPECTED:
        assert (PACKAGE_DIR / "history" / f"{name}.v1.avsc").is_file()


def test_named_types_inlined_in_several_files_are_identical() -> None:
    seen: dict[str, tuple[str, dict[str, Any]]] = {}
    shared = set()
    for path in sorted(PACKAGE_DIR.glob("*.avsc")):
        for full_name, record in records(load(path)):
            if full_name in seen:
                shared.add(full_name)
                assert record == seen[full_name][1], (
                    f"{full_name}: {path.name} vs {seen[full_name][0]}"
                )
            else:
                seen[full_name] = (path.name, record)
    assert {"io.dspex.Route", "io.dspex.ErrorInfo"} <= shared


def test_store_is_lazy_and_rejects_a_misnamed_file(tmp_path: Path) -> None:
    store = SchemaStore(tmp_path / "missing")  # constructing reads nothing
    assert store.names() == []
    (tmp_path / "Thing.avsc").write_text(
        json.dumps({"type": "record", "name": "Other", "fields": []})
    )
    with pytest.raises(schemas.SchemaContractError, match=r"Thing\.avsc"):
        SchemaStore(tmp_path).current("Thing")


def test_schemas_package_imports_neither_streams_nor_agents() -> None:
    for path in PACKAGE_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            for module in modules:
                assert module.split(".")[0] not in {"streams", "agents"}, f"{path.name}: {module}"
