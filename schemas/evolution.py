"""Keep the contract compatible: check changes, release new versions.

The rule is FULL_TRANSITIVE compatibility against every released version
(``history/<Name>.v<N>.avsc``):

* BACKWARD — the current schema can read data written with the old one
  (consumers upgraded first keep reading the topic's history);
* FORWARD — the old schema can read data written with the current one
  (Java/Go clients still compiled against an old version keep working). This
  is what rejects removing a field that has no default.

Each direction is judged twice, because either alone has blind spots:
Apache Avro's ``ReaderWriterCompatibilityChecker`` (the reference rules) and a
fastavro round trip (records generated from the writer schema, one with every
optional value filled and one as sparse as possible, written with the writer
schema and read with the reader schema).

:func:`check` also lints the candidate: it must parse with fastavro and Apache
Avro, and every record and field must carry a ``doc``, since the files are the
contract other languages code against. :func:`release` snapshots a changed,
compatible schema as the next history version.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import avro.errors
import avro.schema
import fastavro
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType

from dspex.schemas.errors import IncompatibleSchema
from dspex.schemas.registry import NAMESPACE, Schema, SchemaStore, build, default_store

__all__ = ["check", "check_all", "compatibility", "example", "lint", "records", "release"]

_NAMED = frozenset({"record", "enum", "fixed"})
_PRIMITIVE_EXAMPLES: dict[str, Any] = {
    "null": None,
    "boolean": True,
    "int": 7,
    "long": 1_700_000_000_000,
    "float": 1.5,
    "double": 2.5,
    "bytes": b"\x00\x01",
    "string": "x",
}


def check(
    name: str, candidate: dict[str, Any] | None = None, *, store: SchemaStore | None = None
) -> list[str]:
    """Problems that stop ``candidate`` (default: the current ``<name>.avsc``) being released.

    An empty list means it is well formed, documented, can read data written by
    every released version of ``name``, and every released version can read its data.
    """
    store = store or default_store()
    definition = candidate if candidate is not None else store.current(name).definition
    problems = lint(name, definition)
    if problems:
        return problems
    for old in store.released(name):
        backward = f"{name}: cannot read v{old.version} data"
        problems += compatibility(definition, old.definition, label=backward)
        forward = f"{name}: v{old.version} readers cannot read its data"
        problems += compatibility(old.definition, definition, label=forward)
    return problems


def check_all(*, store: SchemaStore | None = None) -> list[str]:
    """:func:`check` for every current schema; each problem names its schema."""
    store = store or default_store()
    return [problem for name in store.names() for problem in check(name, store=store)]


def release(name: str, *, store: SchemaStore | None = None) -> Schema:
    """Snapshot the current ``name`` as the next history version and return it.

    Does nothing (returns the current schema) when its fingerprint equals the
    latest release. Raises :class:`IncompatibleSchema` when :func:`check` finds problems.
    """
    store = store or default_store()
    schema = store.current(name)
    released = store.released(name)
    if released and released[-1].fingerprint == schema.fingerprint:
        return schema
    problems = check(name, store=store)
    if problems:
        raise IncompatibleSchema(name, problems)
    store.write_release(name, schema.version)
    return store.current(name)


def lint(name: str, definition: dict[str, Any]) -> list[str]:
    """Problems with one definition on its own: name, parsing, missing docs."""
    if definition.get("name") != name or definition.get("namespace") != NAMESPACE:
        return [f"{name}: must be record {NAMESPACE}.{name}"]
    try:
        build(definition, 1, name)
    except ValueError as exc:
        return [f"{name}: fastavro: {exc}"]
    try:
        avro.schema.parse(json.dumps(definition))
    except (avro.errors.AvroException, ValueError, TypeError) as exc:
        return [f"{name}: Apache Avro: {exc}"]
    return [f"{name}: {missing} has no doc" for missing in _undocumented(definition)]


def compatibility(
    reader: dict[str, Any], writer: dict[str, Any], *, label: str = "reader"
) -> list[str]:
    """Why ``reader`` cannot read data written with ``writer`` (empty when it can)."""
    return _avro_problems(reader, writer, label) + _round_trip_problems(reader, writer, label)


def records(definition: Any, namespace: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every record defined inline in ``definition``, as (full name, definition)."""
    if isinstance(definition, list):
        for branch in definition:
            yield from records(branch, namespace)
        return
    if not isinstance(definition, dict):
        return
    kind = definition.get("type")
    if kind in ("array", "map"):
        yield from records(definition.get("items", definition.get("values")), namespace)
    elif kind == "record":
        full = _full_name(definition, namespace)
        yield full, definition
        for fld in definition.get("fields", []):
            yield from records(fld.get("type"), full.rpartition(".")[0])
    elif isinstance(kind, (dict, list)):
        yield from records(kind, namespace)


def example(definition: Any, *, full: bool = True) -> Any:
    """A datum valid for ``definition``: every optional value set (``full``) or none."""
    return _example(definition, {}, "", full)


def _undocumented(definition: dict[str, Any]) -> list[str]:
    missing: list[str] = []
    for full, record in records(definition):
        if not str(record.get("doc", "")).strip():
            missing.append(f"record {full}")
        for fld in record.get("fields", []):
            if not str(fld.get("doc", "")).strip():
                missing.append(f"field {full}.{fld.get('name')}")
    return missing


def _avro_problems(reader: dict[str, Any], writer: dict[str, Any], label: str) -> list[str]:
    # avro ships py.typed but leaves this constructor unannotated
    checker = ReaderWriterCompatibilityChecker()  # type: ignore[no-untyped-call]
    result = checker.get_compatibility(
        avro.schema.parse(json.dumps(reader)), avro.schema.parse(json.dumps(writer))
    )
    if result.compatibility is SchemaCompatibilityType.compatible:
        return []
    kinds = ", ".join(sorted({kind.value for kind in result.incompatibilities}))
    paths = {_field_path(loc, reader) for loc in result.locations}
    where = ", ".join(sorted(paths - {"(root)"} or paths))
    details = "; ".join(sorted(result.messages))
    return [f"{label}: Apache Avro: {kinds} at {where} ({details})"]


def _round_trip_problems(reader: dict[str, Any], writer: dict[str, Any], label: str) -> list[str]:
    problems: list[str] = []
    reader_parsed = fastavro.parse_schema(reader)
    writer_parsed = fastavro.parse_schema(writer)
    for full in (True, False):
        datum = example(writer, full=full)
        buffer = io.BytesIO()
        try:
            fastavro.schemaless_writer(buffer, writer_parsed, datum)
            buffer.seek(0)
            fastavro.schemaless_reader(buffer, writer_parsed, reader_parsed)
        except Exception as exc:  # any failure to resolve is the finding itself
            shape = "full" if full else "sparse"
            problems.append(f"{label}: fastavro round trip ({shape} record): {exc!r}")
    return problems


def _field_path(location: str, reader: dict[str, Any]) -> str:
    """Turn a checker location such as ``/fields/17/type/1`` into field names (``route``)."""
    node: Any = reader
    names: list[str] = []
    for token in (t for t in location.split("/") if t):
        try:
            node = node[int(token)] if token.isdigit() else node[token]
        except (KeyError, IndexError, TypeError):
            break
        if isinstance(node, dict) and "name" in node and not _is_named_type(node):
            names.append(str(node["name"]))
    return ".".join(names) or "(root)"


def _is_named_type(node: dict[str, Any]) -> bool:
    kind = node.get("type")
    return isinstance(kind, str) and kind in _NAMED


def _full_name(named: dict[str, Any], namespace: str) -> str:
    name = str(named["name"])
    if "." in name:
        return name
    space = named.get("namespace", namespace)
    return f"{space}.{name}" if space else name


def _example(schema: Any, named: dict[str, Any], namespace: str, full: bool) -> Any:
    if isinstance(schema, str):
        if schema in _PRIMITIVE_EXAMPLES:
            return _PRIMITIVE_EXAMPLES[schema]
        ref = named.get(schema) or named[f"{namespace}.{schema}"]
        return _example(ref, named, namespace, full)
    if isinstance(schema, list):
        branches = [b for b in schema if b != "null"] if full else schema
        return _example(branches[0] if branches else "null", named, namespace, full)
    kind = schema["type"]
    if kind == "record":
        return _example_record(schema, named, namespace, full)
    if kind == "enum":
        named[_full_name(schema, namespace)] = schema
        return schema["symbols"][0]
    if kind == "fixed":
        named[_full_name(schema, namespace)] = schema
        return bytes(int(schema["size"]))
    if kind == "array":
        return [_example(schema["items"], named, namespace, full)] if full else []
    if kind == "map":
        return {"k": _example(schema["values"], named, namespace, full)} if full else {}
    if schema.get("logicalType") == "uuid":
        return "00000000-0000-4000-8000-000000000000"
    return _example(kind, named, namespace, full)


def _example_record(
    schema: dict[str, Any], named: dict[str, Any], namespace: str, full: bool
) -> dict[str, Any]:
    full_name = _full_name(schema, namespace)
    named[full_name] = schema
    inner = full_name.rpartition(".")[0]
    return {f["name"]: _example(f["type"], named, inner, full) for f in schema["fields"]}
