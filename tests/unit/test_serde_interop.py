"""Single-object records interoperate with the reference Apache ``avro`` package.

What "any Avro tool can decode without a registry" means in practice: the 10-byte
header is the spec's (marker ``C3 01`` + avro's own CRC-64-AVRO fingerprint of
its own Parsing Canonical Form), and the body reads with avro's DatumReader. The
other direction too: avro's DatumWriter behind a spec header decodes with ours.

avro 1.12's Python canonical form keeps ``{"type":"long"}`` for a primitive that
carries a ``logicalType``, where the spec ([PRIMITIVES], [STRIP]) and Java and
fastavro give ``"long"`` (the Rust SDK had the same bug, AVRO-4004). Since the
spec strips ``logicalType``, the schema without it has the same canonical form:
avro fingerprints that one.
"""

from __future__ import annotations

import io
import json
from typing import Any

import avro.io
import avro.schema
import pytest

from dspex import schemas
from dspex.schemas import samples
from dspex.streams.serde import SingleObjectSerde

TOPIC = "dspex.interop"
MARKER = b"\xc3\x01"


def avro_schema(name: str) -> avro.schema.Schema:
    return avro.schema.parse(json.dumps(schemas.current(name).definition))


def strip_logical_types(node: Any) -> Any:
    """The same schema for parsing purposes: the spec's canonical form drops logicalType."""
    if isinstance(node, dict):
        return {k: strip_logical_types(v) for k, v in node.items() if k != "logicalType"}
    if isinstance(node, list):
        return [strip_logical_types(item) for item in node]
    return node


def avro_parsing_schema(name: str) -> avro.schema.Schema:
    stripped = strip_logical_types(schemas.current(name).definition)
    return avro.schema.parse(json.dumps(stripped))


def avro_header(name: str) -> bytes:
    return MARKER + avro_parsing_schema(name).fingerprint("CRC-64-AVRO")


def avro_read(name: str, data: bytes) -> Any:
    assert data[:10] == avro_header(name), "header is not the marker + avro's fingerprint"
    stream = io.BytesIO(data[10:])
    record = avro.io.DatumReader(avro_schema(name)).read(avro.io.BinaryDecoder(stream))
    assert stream.read() == b"", "avro left bytes unread"
    return record


def avro_write(name: str, record: dict[str, Any]) -> bytes:
    out = io.BytesIO()
    avro.io.DatumWriter(avro_schema(name)).write(record, avro.io.BinaryEncoder(out))
    return avro_header(name) + out.getvalue()


@pytest.mark.parametrize("name", schemas.names())
def test_canonical_form_and_fingerprint_agree_with_avro(name: str) -> None:
    ours = schemas.current(name)
    theirs = avro_parsing_schema(name)
    assert theirs.canonical_form == ours.canonical
    assert theirs.fingerprint("CRC-64-AVRO") == ours.fingerprint.to_bytes(8, "little")


@pytest.mark.parametrize("name", schemas.names())
def test_avro_reads_what_we_write(name: str) -> None:
    record = samples.sample(name)
    data = SingleObjectSerde().encode(name, record, topic=TOPIC)
    assert avro_read(name, data) == record


@pytest.mark.parametrize("name", schemas.names())
def test_we_read_what_avro_writes(name: str) -> None:
    record = samples.sample(name)
    data = avro_write(name, record)
    decoded = SingleObjectSerde().decode(data, topic=TOPIC, expect=name)
    assert decoded.schema_name == name
    assert decoded.record == record


@pytest.mark.parametrize("name", schemas.names())
def test_bytes_are_identical_both_ways(name: str) -> None:
    record = samples.sample(name)
    assert SingleObjectSerde().encode(name, record, topic=TOPIC) == avro_write(name, record)
