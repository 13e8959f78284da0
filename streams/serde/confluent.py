"""Confluent wire format: the serde used when a schema registry URL is configured.

Framing: magic byte ``00``, the registry's schema id as 4 big-endian bytes, then
the Avro binary body. Subjects follow the TopicNameStrategy (``<topic>-value``).
The current schema is registered on the first encode per topic and schema; a
writer schema is fetched by id on the first decode of that id. Both are cached.
The registry is reached through :class:`RegistryClient`, the two calls the serde makes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from io import BytesIO
from typing import Any, Protocol, TypeVar

from confluent_kafka.schema_registry import Schema as RegistrySchema
from confluent_kafka.schema_registry import SchemaRegistryClient, SchemaRegistryError
from fastavro import parse_schema
from fastavro.schema import fingerprint, to_parsing_canonical_form

from dspex.streams.errors import CorruptRecord, RegistryUnavailable, SchemaNotFound
from dspex.streams.serde.base import (
    AvroSchema,
    Decoded,
    Resolution,
    SchemaCatalog,
    check_expected,
    current_schema,
    default_catalog,
    read_body,
    resolution,
    write_body,
)
from dspex.streams.settings import Settings

MAGIC = b"\x00"
HEADER_SIZE = 5
_SCHEMA_ID = struct.Struct(">I")
_RETRYABLE_STATUS = frozenset({408, 429})
_T = TypeVar("_T")


def header(schema_id: int) -> bytes:
    """The 5-byte Confluent wire-format header for a registry schema id."""
    return MAGIC + _SCHEMA_ID.pack(schema_id)


def registry_client(settings: Settings) -> SchemaRegistryClient:
    """A registry client for the settings; ``mock://`` URLs give an in-memory registry."""
    # new_client, not the constructor: only it returns the mock for mock:// URLs
    client: SchemaRegistryClient = SchemaRegistryClient.new_client(
        settings.schema_registry.to_client_conf()
    )
    return client


class RegistryClient(Protocol):
    """What the serde calls on a Schema Registry client; ``SchemaRegistryClient`` is one."""

    def register_schema(self, subject_name: str, schema: RegistrySchema) -> int:
        """Register ``schema`` under ``subject_name`` (idempotent); its schema id."""
        ...

    def get_schema(self, schema_id: int) -> RegistrySchema:
        """The schema registered with ``schema_id``."""
        ...


class ConfluentSerde:
    """Serde for the Confluent wire format through a Schema Registry.

    ``catalog`` (default: the ``schemas`` package) supplies the current reader
    schemas; a writer schema fetched from the registry is matched to a DSPex
    record by its full name.
    """

    def __init__(self, client: RegistryClient, catalog: SchemaCatalog | None = None) -> None:
        self._client = client
        self._catalog = catalog if catalog is not None else default_catalog()
        self._writers: dict[tuple[str, str], tuple[bytes, AvroSchema]] = {}
        self._readers: dict[int, Resolution] = {}
        self._names: dict[str, str] = {}  # full name -> DSPex schema name

    @classmethod
    def from_settings(
        cls, settings: Settings, catalog: SchemaCatalog | None = None
    ) -> ConfluentSerde:
        """Build the serde with a registry client configured from ``settings``."""
        return cls(registry_client(settings), catalog)

    def encode(self, schema_name: str, record: Mapping[str, Any], *, topic: str) -> bytes:
        """Frame ``record`` as the current version of ``schema_name``, registered for ``topic``."""
        writer = self._writers.get((topic, schema_name)) or self._register(schema_name, topic)
        out = BytesIO()
        out.write(writer[0])
        write_body(out, writer[1], record, topic)
        return out.getvalue()

    def decode(self, data: bytes, *, topic: str, expect: str | None = None) -> Decoded:
        """Check the header, fetch the writer by schema id, read into the current reader."""
        if not data or len(data) < HEADER_SIZE or data[:1] != MAGIC:
            raise CorruptRecord(_bad_header(data), topic=topic)
        (schema_id,) = _SCHEMA_ID.unpack_from(data, 1)
        res = self._readers.get(schema_id) or self._fetch(schema_id, topic)
        check_expected(res, expect, topic)
        return Decoded(res.name, read_body(data, HEADER_SIZE, res, topic), res.writer_version)

    def _register(self, schema_name: str, topic: str) -> tuple[bytes, AvroSchema]:
        schema = current_schema(self._catalog, schema_name, topic)
        subject = f"{topic}-value"
        # register the full definition: its defaults matter to the registry's compatibility check
        text = json.dumps(schema.definition, separators=(",", ":"))
        what = f"registering {schema.full_name} v{schema.version} under subject {subject}"
        schema_id = _call(
            lambda: self._client.register_schema(subject, RegistrySchema(text, "AVRO")), what, topic
        )
        entry = (header(schema_id), schema)
        self._writers[(topic, schema_name)] = entry
        return entry

    def _fetch(self, schema_id: int, topic: str) -> Resolution:
        what = f"fetching schema id {schema_id}"
        fetched = _call(lambda: self._client.get_schema(schema_id), what, topic)
        if fetched.schema_type not in (None, "AVRO"):
            msg = f"registry schema id {schema_id} is {fetched.schema_type}, not Avro"
            raise SchemaNotFound(msg, topic=topic)
        res = self._resolve(schema_id, _parse_json(fetched.schema_str, schema_id, topic), topic)
        self._readers[schema_id] = res
        return res

    def _resolve(self, schema_id: int, definition: Any, topic: str) -> Resolution:
        writer = self._writer_schema(schema_id, definition, topic)
        name = self._name_of(writer.full_name, schema_id, topic)
        reader = current_schema(self._catalog, name, topic)
        label = f"registry schema id {schema_id}, writer fingerprint 0x{writer.fingerprint:016x}"
        return resolution(writer, reader, label)

    def _writer_schema(self, schema_id: int, definition: Any, topic: str) -> AvroSchema:
        """The catalog's version when it has this schema, else the registry's own, parsed."""
        try:
            fp = _fingerprint(definition)
            known = self._catalog.by_fingerprint(fp)
            if known is not None:
                return known
            parsed = parse_schema(definition, named_schemas={})
        except Exception as exc:  # the registry holds something fastavro cannot parse
            msg = f"registry schema id {schema_id} is not a valid Avro schema: {exc}"
            raise SchemaNotFound(msg, topic=topic) from exc
        if not isinstance(parsed, dict) or parsed.get("type") != "record":
            raise SchemaNotFound(f"registry schema id {schema_id} is not a record", topic=topic)
        return _RegistryOnly(parsed["name"], definition, parsed, fp)

    def _name_of(self, full_name: str, schema_id: int, topic: str) -> str:
        if not self._names:
            self._names = {self._catalog.current(n).full_name: n for n in self._catalog.names()}
        name = self._names.get(full_name)
        if name is None:
            msg = f"registry schema id {schema_id} is {full_name}, not a DSPex record"
            raise SchemaNotFound(msg, topic=topic)
        return name


@dataclass(frozen=True, slots=True)
class _RegistryOnly:
    """A writer schema found only in the registry (another producer's compatible version)."""

    full_name: str
    definition: dict[str, Any]
    parsed: Any
    fingerprint: int
    version: int = 0

    @property
    def name(self) -> str:
        return self.full_name.rpartition(".")[2]


def _fingerprint(definition: Any) -> int:
    """CRC-64-AVRO of the Parsing Canonical Form, as the unsigned integer the spec defines."""
    digest = fingerprint(to_parsing_canonical_form(definition), "CRC-64-AVRO")
    return int.from_bytes(bytes.fromhex(digest), "little")


def _parse_json(text: str | None, schema_id: int, topic: str) -> Any:
    try:
        return json.loads(text or "")
    except ValueError as exc:
        msg = f"registry schema id {schema_id} is not valid JSON: {exc}"
        raise SchemaNotFound(msg, topic=topic) from exc


def _call(request: Callable[[], _T], what: str, topic: str) -> _T:
    """Run one registry request, mapping its failures into the DSPex tree."""
    try:
        return request()
    except SchemaRegistryError as exc:
        status = exc.http_status_code
        if status >= 500 or status in _RETRYABLE_STATUS:
            raise RegistryUnavailable(f"topic={topic}: registry error {what}: {exc}") from exc
        raise SchemaNotFound(f"registry refused {what}: {exc}", topic=topic) from exc
    except Exception as exc:  # httpx transport errors, timeouts, OAuth token failures
        raise RegistryUnavailable(f"topic={topic}: registry unreachable {what}: {exc}") from exc


def _bad_header(data: bytes | None) -> str:
    if not data:
        return "empty message value: not a Confluent wire-format record"
    if data[:1] != MAGIC:
        return f"bad magic byte {data[0]:#04x}: not a Confluent wire-format record (expected 0x00)"
    return f"truncated Confluent wire-format header: {len(data)} of {HEADER_SIZE} bytes"
