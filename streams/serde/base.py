"""What every DSPex serde shares: the interface, the catalog seam and the Avro body codec.

A serde turns one record into the bytes of one Kafka message value and back.
Implementations differ only in framing (:mod:`dspex.streams.serde.single_object`,
:mod:`dspex.streams.serde.confluent`); the Avro body, the schema resolution from the
writer's version into the current reader, and the mapping of fastavro's
exceptions into :class:`~dspex.streams.errors.SerdeError` live here, once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from io import BytesIO
from typing import Any, Protocol, cast

from fastavro import schemaless_reader, schemaless_writer
from fastavro.validation import ValidationError, validate

from dspex.streams.errors import CorruptRecord, SchemaNotFound, SerdeError


@dataclass(frozen=True, slots=True)
class Decoded:
    """One decoded message value: which record, its fields, the writer's schema version.

    ``writer_version`` is 0 when the writer's schema is not one of the versions
    this process ships (possible only with a registry, where any producer may
    register a compatible schema).
    """

    schema_name: str
    record: dict[str, Any]
    writer_version: int


class Serde(Protocol):
    """Encodes and decodes the value of a DSPex topic."""

    def encode(self, schema_name: str, record: Mapping[str, Any], *, topic: str) -> bytes:
        """Frame ``record`` as the current version of ``schema_name``."""
        ...

    def decode(self, data: bytes, *, topic: str, expect: str | None = None) -> Decoded:
        """Read ``data`` with its writer's schema into the current reader schema."""
        ...


class AvroSchema(Protocol):
    """One version of a DSPex record schema (``schemas.Schema`` satisfies this)."""

    @property
    def name(self) -> str: ...
    @property
    def full_name(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def definition(self) -> dict[str, Any]: ...
    @property
    def parsed(self) -> Any: ...
    @property
    def fingerprint(self) -> int: ...


class SchemaCatalog(Protocol):
    """Where a serde finds schemas; the ``schemas`` package itself satisfies this.

    ``current`` raises ``ValueError`` (``schemas.UnknownSchema``) or ``LookupError``
    for an unknown name.
    """

    def names(self) -> list[str]: ...
    def current(self, name: str) -> AvroSchema: ...
    def by_fingerprint(self, fingerprint: int, /) -> AvroSchema | None: ...


def default_catalog() -> SchemaCatalog:
    """The ``schemas`` package, imported when a serde is built rather than at import time."""
    from dspex import schemas

    return schemas


@dataclass(frozen=True, slots=True)
class Resolution:
    """How to read one writer schema: cached per fingerprint or registry id."""

    name: str
    full_name: str
    writer_version: int
    writer_parsed: Any
    reader_parsed: Any  # None when the writer is the current version: no resolution needed
    label: str  # names the writer in error messages, e.g. "writer fingerprint 0x..."


def resolution(writer: AvroSchema, reader: AvroSchema, label: str) -> Resolution:
    """Pair a writer version with the current reader of the same record."""
    same = writer.fingerprint == reader.fingerprint
    return Resolution(
        name=reader.name,
        full_name=reader.full_name,
        writer_version=writer.version,
        writer_parsed=writer.parsed,
        reader_parsed=None if same else reader.parsed,
        label=label,
    )


def current_schema(catalog: SchemaCatalog, name: str, topic: str) -> AvroSchema:
    """The catalog's current version of ``name``, or :class:`SchemaNotFound`."""
    try:
        return catalog.current(name)
    except (ValueError, LookupError) as exc:
        raise SchemaNotFound(str(exc), topic=topic) from exc


def check_expected(res: Resolution, expect: str | None, topic: str) -> None:
    """Refuse bytes that carry another record than the caller expects."""
    if expect is not None and expect != res.name and expect != res.full_name:
        namespace = res.full_name.rpartition(".")[0]
        wanted = expect if "." in expect or not namespace else f"{namespace}.{expect}"
        raise SerdeError(f"expected {wanted}, got {res.full_name}", topic=topic)


def write_body(out: BytesIO, schema: AvroSchema, record: Mapping[str, Any], topic: str) -> None:
    """Append the Avro binary of ``record`` to ``out``; a bad record names its field."""
    try:
        schemaless_writer(out, schema.parsed, record)
    except Exception as exc:  # fastavro raises ValueError, TypeError, AttributeError, ...
        raise SerdeError(_invalid_message(schema, record, exc), topic=topic) from exc


def read_body(data: bytes, offset: int, res: Resolution, topic: str) -> dict[str, Any]:
    """Read the Avro body at ``data[offset:]``; it must end exactly at the end of ``data``."""
    buf = BytesIO(data)
    buf.seek(offset)
    try:
        record = schemaless_reader(buf, res.writer_parsed, res.reader_parsed)
    except Exception as exc:  # garbage makes fastavro raise almost anything
        # running out of bytes shows as EOFError, or IndexError mid-varint
        ran_out = isinstance(exc, EOFError) or buf.tell() >= len(data)
        kind = "truncated" if ran_out else "corrupt"
        raise CorruptRecord(_read_message(kind, res, exc), topic=topic) from exc
    extra = len(data) - buf.tell()
    if extra:
        reason = f"{extra} trailing byte(s) after the record"
        raise CorruptRecord(_read_message("corrupt", res, reason), topic=topic)
    return cast("dict[str, Any]", record)  # the reader schema is a record


def _read_message(kind: str, res: Resolution, reason: object) -> str:
    if isinstance(reason, Exception):
        detail = f"{type(reason).__name__}: {_clip(str(reason)) or 'end of data'}"
    else:
        detail = str(reason)
    return f"{kind} Avro record for {res.full_name} ({res.label}): {detail}"


def _invalid_message(schema: AvroSchema, record: object, exc: Exception) -> str:
    head = f"record does not match {schema.full_name} v{schema.version}"
    if not isinstance(record, Mapping):
        return f"{head}: expected a mapping, got {type(record).__name__}"
    try:
        validate(record, schema.parsed, raise_errors=True)
    except ValidationError as invalid:
        return f"{head}: {_describe(invalid)} ({_clip(str(exc))})"
    except Exception as other:  # only building a message: never mask the first error
        return f"{head}: {exc} (validation failed too: {other})"
    return f"{head}: {type(exc).__name__}: {_clip(str(exc))}"


def _describe(invalid: ValidationError) -> str:
    """One clause per offending field; a union's branches collapse into one clause."""
    expected: dict[str, list[str]] = {}
    got: dict[str, str] = {}
    for error in invalid.errors:
        field = error.field or "<record>"
        expected.setdefault(field, []).append(_type_name(error.schema))
        got[field] = f"{type(error.datum).__name__} {_short(error.datum)}"
    return "; ".join(
        f"field {field} is {got[field]}, expected {' | '.join(types)}"
        for field, types in expected.items()
    )


def _type_name(schema: Any) -> str:
    if isinstance(schema, dict):
        return str(schema.get("name") or schema.get("type"))
    if isinstance(schema, list):
        return " | ".join(_type_name(branch) for branch in schema)
    return str(schema)


def _short(value: object) -> str:
    return _clip(repr(value), 40)


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else f"{text[: limit - 3]}..."
