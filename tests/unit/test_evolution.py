"""Schema evolution: compatible changes pass, breaking changes fail check(), release() snapshots."""

from __future__ import annotations

import copy
import io
import json
import shutil
from pathlib import Path
from typing import Any

import avro.schema
import fastavro
import pytest
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType

from dspex import schemas
from dspex.schemas.evolution import check, check_all, example, release
from dspex.schemas.registry import PACKAGE_DIR, SchemaStore
from dspex.schemas.samples import sample

NAMES = schemas.names()


@pytest.fixture
def store(tmp_path: Path) -> SchemaStore:
    """A private copy of the shipped schemas and history, safe to change."""
    for path in PACKAGE_DIR.glob("*.avsc"):
        shutil.copy(path, tmp_path / path.name)
    shutil.copytree(PACKAGE_DIR / "history", tmp_path / "history")
    return SchemaStore(tmp_path)


def definition(name: str) -> dict[str, Any]:
    return copy.deepcopy(schemas.current(name).definition)


def with_optional_field(name: str) -> dict[str, Any]:
    changed = definition(name)
    changed["fields"].append(
        {"name": "added_later", "type": ["null", "string"], "default": None, "doc": "New."}
    )
    return changed


def first_field(changed: dict[str, Any], **match: Any) -> dict[str, Any]:
    field: dict[str, Any] = next(
        f for f in changed["fields"] if all(f.get(k, "<absent>") == v for k, v in match.items())
    )
    return field


def avro_compatible(reader: dict[str, Any], writer: dict[str, Any]) -> bool:
    checker = ReaderWriterCompatibilityChecker()  # type: ignore[no-untyped-call]  # avro: no hints
    result = checker.get_compatibility(
        avro.schema.parse(json.dumps(reader)), avro.schema.parse(json.dumps(writer))
    )
    return result.compatibility is SchemaCompatibilityType.compatible


def test_shipped_schemas_have_no_problems() -> None:
    assert check_all() == []


@pytest.mark.parametrize("name", NAMES)
def test_adding_an_optional_field_reads_old_records(name: str) -> None:
    old = schemas.current(name)
    new = with_optional_field(name)
    assert check(name, new) == []
    assert avro_compatible(new, old.definition)
    buffer = io.BytesIO()
    record = sample(name)
    fastavro.schemaless_writer(buffer, old.parsed, record)
    buffer.seek(0)
    read = fastavro.schemaless_reader(buffer, old.parsed, fastavro.parse_schema(new))
    assert read == {**record, "added_later": None}


@pytest.mark.parametrize("name", NAMES)
def test_removing_a_field_without_default_is_rejected(name: str) -> None:
    changed = definition(name)
    field = first_field(changed, default="<absent>")
    changed["fields"].remove(field)
    problems = check(name, changed)
    assert problems and any(field["name"] in p for p in problems)


@pytest.mark.parametrize("name", NAMES)
def test_changing_a_field_type_is_rejected(name: str) -> None:
    changed = definition(name)
    field = first_field(changed, type="string")
    field["type"] = "boolean"
    problems = check(name, changed)
    assert problems and any(field["name"] in p for p in problems)


@pytest.mark.parametrize("name", NAMES)
def test_adding_a_required_field_without_default_is_rejected(name: str) -> None:
    changed = definition(name)
    changed["fields"].append({"name": "must_have", "type": "string", "doc": "Required."})
    problems = check(name, changed)
    assert problems and any("must_have" in p for p in problems)


def test_changing_a_shared_named_type_is_rejected() -> None:
    changed = definition("Request")
    route = first_field(changed, name="route")["type"][1]
    first_field(route, name="pool")["type"] = "int"
    assert check("Request", changed)


def test_an_undocumented_field_is_rejected() -> None:
    changed = with_optional_field("Response")
    del changed["fields"][-1]["doc"]
    assert check("Response", changed) == [
        "Response: field io.dspex.Response.added_later has no doc"
    ]


def test_a_schema_that_does_not_parse_is_rejected() -> None:
    changed = definition("Response")
    first_field(changed, name="seq")["type"] = "integer"
    problems = check("Response", changed)
    assert len(problems) == 1 and "fastavro" in problems[0]


@pytest.mark.parametrize("name", NAMES)
def test_generated_examples_are_valid(name: str) -> None:
    parsed = schemas.current(name).parsed
    for full in (True, False):
        assert fastavro.validation.validate(
            example(schemas.current(name).definition, full=full), parsed
        )


def test_release_is_a_no_op_when_unchanged(store: SchemaStore) -> None:
    assert release("JobControl", store=store).version == 1
    assert sorted(p.name for p in store.history_dir.glob("JobControl.*")) == ["JobControl.v1.avsc"]


def test_release_snapshots_a_compatible_change_as_the_next_version(store: SchemaStore) -> None:
    current_file = store.root / "JobControl.avsc"
    current_file.write_text(json.dumps(with_optional_field("JobControl"), indent=2) + "\n")
    store.clear()
    assert store.current("JobControl").version == 2
    released = release("JobControl", store=store)
    assert released.version == 2
    assert (store.history_dir / "JobControl.v2.avsc").read_text() == current_file.read_text()
    assert [s.version for s in store.versions("JobControl")] == [1, 2]
    v1 = store.versions("JobControl")[0]
    assert store.by_fingerprint(v1.fingerprint) == v1
    assert check("JobControl", store=store) == []


def test_release_refuses_an_incompatible_change(store: SchemaStore) -> None:
    changed = definition("OptimizationJob")
    changed["fields"].append({"name": "must_have", "type": "string", "doc": "Required."})
    (store.root / "OptimizationJob.avsc").write_text(json.dumps(changed))
    store.clear()
    with pytest.raises(schemas.IncompatibleSchema, match="must_have"):
        release("OptimizationJob", store=store)
    assert not (store.history_dir / "OptimizationJob.v2.avsc").exists()


def test_doc_only_change_keeps_the_version(store: SchemaStore) -> None:
    changed = definition("MetricSnapshot")
    changed["doc"] = "Reworded."
    (store.root / "MetricSnapshot.avsc").write_text(json.dumps(changed))
    store.clear()
    assert store.current("MetricSnapshot").version == 1
    assert len(store.versions("MetricSnapshot")) == 1
