"""Avro single-object encoding: the serde used when no schema registry is configured.

Framing per the Avro specification: the marker ``C3 01``, the writer schema's
CRC-64-AVRO fingerprint (of its Parsing Canonical Form) as 8 little-endian
bytes, then the Avro binary body. Any Avro library can decode it without a
registry, given the schema the fingerprint names.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from io import BytesIO
from typing import Any

from dspex.streams.errors import CorruptRecord, SchemaNotFound
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

MARKER = b"\xc3\x01"
HEADER_SIZE = len(MARKER) + 8
_FINGERPRINT = struct.Struct("<Q")


def header(fingerprint: int) -> bytes:
    """The 10-byte single-object header for a writer schema's fingerprint."""
    return MARKER + _FINGERPRINT.pack(fingerprint)


class SingleObjectSerde:
    """Serde for Avro single-object encoding; schemas come from the ``schemas`` package.

    ``catalog`` is the seam for tests (a catalog holding an older schema version);
    it defaults to the ``schemas`` package. Lookups are cached per schema name and
    per writer fingerprint, so the hot path parses nothing.
    """

    def __init__(self, catalog: SchemaCatalog | None = None) -> None:
        self._catalog = catalog if catalog is not None else default_catalog()
        self._writers: dict[str, tuple[bytes, AvroSchema]] = {}
        self._readers: dict[int, Resolution] = {}

    def encode(self, schema_name: str, record: Mapping[str, Any], *, topic: str) -> bytes:
        """Frame ``record`` as the current version of ``schema_name``."""
        writer = self._writers.get(schema_name) or self._writer(schema_name, topic)
        out = BytesIO()
        out.write(writer[0])
        write_body(out, writer[1], record, topic)
        return out.getvalue()

    def decode(self, data: bytes, *, topic: str, expect: str | None = None) -> Decoded:
        """Check the header, find the writer by fingerprint, read into the current reader."""
        if not data or len(data) < HEADER_SIZE or data[:2] != MARKER:
            raise CorruptRecord(_bad_header(data), topic=topic)
        (fingerprint,) = _FINGERPRINT.unpack_from(data, 2)
        res = self._readers.get(fingerprint) or self._reader(fingerprint, topic)
        check_expected(res, expect, topic)
        return Decoded(res.name, read_body(data, HEADER_SIZE, res, topic), res.writer_version)

    def _writer(self, schema_name: str, topic: str) -> tuple[bytes, AvroSchema]:
        schema = current_schema(self._catalog, schema_name, topic)
        entry = (header(schema.fingerprint), schema)
        self._writers[schema_name] = entry
        return entry

    def _reader(self, fingerprint: int, topic: str) -> Resolution:
        writer = self._catalog.by_fingerprint(fingerprint)
        if writer is None:
            raise SchemaNotFound(
                f"unknown writer schema fingerprint 0x{fingerprint:016x}: "
                "not a version of any DSPex schema this process knows",
                topic=topic,
            )
        reader = current_schema(self._catalog, writer.name, topic)
        res = resolution(writer, reader, f"writer fingerprint 0x{fingerprint:016x}")
        self._readers[fingerprint] = res
        return res


def _bad_header(data: bytes | None) -> str:
    if not data:
        return "empty message value: not an Avro single-object record"
    if data[:2] != MARKER[: len(data[:2])]:
        return (
            f"bad magic {bytes(data[:2]).hex()}: not an Avro single-object record "
            f"(expected {MARKER.hex()})"
        )
    return f"truncated single-object header: {len(data)} of {HEADER_SIZE} bytes"
