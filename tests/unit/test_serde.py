"""The Avro serdes: round trips, exact framing, and bad bytes that must become SerdeErrors."""

from __future__ import annotations

import dataclasses
import json
import random
import struct
from io import BytesIO
from typing import Any

import fastavro
import pytest
from confluent_kafka.schema_registry import Schema as RegistrySchema
from confluent_kafka.schema_registry import SchemaRegistryClient, SchemaRegistryError

from dspex import schemas
from dspex.schemas import samples
from dspex.schemas.registry import build
from dspex.streams.errors import CorruptRecord, RegistryUnavailable, SchemaNotFound, SerdeError
from dspex.streams.serde import ConfluentSerde, Serde, SingleObjectSerde, make_serde
from dspex.streams.serde.confluent import registry_client
from dspex.streams.settings import load_settings
from tests.fakes import FailingRegistry

TOPIC = "dspex.test"
NAMES = schemas.names()


def body(name: str, record: dict[str, Any]) -> bytes:
    out = BytesIO()
    fastavro.schemaless_writer(out, schemas.current(name).parsed, record)
    return out.getvalue()


def mock_client() -> SchemaRegistryClient:
    client: SchemaRegistryClient = SchemaRegistryClient.new_client({"url": "mock://serde"})
    return client


@pytest.fixture(params=["single_object", "confluent"])
def serde(request: pytest.FixtureRequest) -> Serde:
    if request.param == "confluent":
        return ConfluentSerde(mock_client())
    return SingleObjectSerde()


def raises_serde_error(serde: Serde, data: bytes) -> SerdeError:
    try:
        serde.decode(data, topic=TOPIC)
    except SerdeError as exc:
        assert f"topic={TOPIC}" in str(exc)
        return exc
    raise AssertionError(f"decoded {data!r} without an error")


# -- round trips and framing ---------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_every_sample_round_trips(serde: Serde, name: str) -> None:
    record = samples.sample(name)
    data = serde.encode(name, record, topic=TOPIC)
    decoded = serde.decode(data, topic=TOPIC, expect=name)
    assert decoded.schema_name == name
    assert decoded.writer_version == schemas.current(name).version
    assert decoded.record == record


@pytest.mark.parametrize("name", NAMES)
def test_single_object_framing_is_the_avro_spec(name: str) -> None:
    record = samples.sample(name)
    data = SingleObjectSerde().encode(name, record, topic=TOPIC)
    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == struct.pack("<Q", schemas.current(name).fingerprint)
    assert data[10:] == body(name, record)


@pytest.mark.parametrize("name", NAMES)
def test_confluent_framing_is_magic_and_big_endian_id(name: str) -> None:
    client = mock_client()
    record = samples.sample(name)
    data = ConfluentSerde(client).encode(name, record, topic=TOPIC)
    registered = client.get_latest_version(f"{TOPIC}-value")
    assert registered.schema_id is not None and registered.schema.schema_str is not None
    assert data[:1] == b"\x00"
    assert data[1:5] == registered.schema_id.to_bytes(4, "big")
    assert data[5:] == body(name, record)
    assert json.loads(registered.schema.schema_str) == schemas.current(name).definition


def test_confluent_registers_once_per_topic() -> None:
    client = mock_client()
    serde = ConfluentSerde(client)
    for topic in ("dspex.a", "dspex.a", "dspex.b"):
        serde.encode("Request", samples.sample("Request"), topic=topic)
    assert sorted(client.get_subjects()) == ["dspex.a-value", "dspex.b-value"]
    assert client.get_versions("dspex.a-value") == [1]


def test_make_serde_follows_the_settings() -> None:
    assert isinstance(make_serde(load_settings()), SingleObjectSerde)
    registry = make_serde(load_settings(schema_registry={"url": "mock://settings"}))
    assert isinstance(registry, ConfluentSerde)


# -- bad bytes -----------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00", b"\xc3", b"garbage that is not avro", b"\xc3\x02" + bytes(16), b"\x01" * 12],
)
def test_garbage_is_a_corrupt_record_or_unknown_schema(serde: Serde, data: bytes) -> None:
    exc = raises_serde_error(serde, data)
    assert isinstance(exc, CorruptRecord | SchemaNotFound)


def test_wrong_magic_is_named(serde: Serde) -> None:
    data = serde.encode("Request", samples.sample("Request"), topic=TOPIC)
    exc = raises_serde_error(serde, b"\x7f" + data[1:])
    assert isinstance(exc, CorruptRecord)
    assert "bad magic" in str(exc)


@pytest.mark.parametrize("name", NAMES)
def test_every_truncation_point_is_a_serde_error(serde: Serde, name: str) -> None:
    data = serde.encode(name, samples.sample(name), topic=TOPIC)
    for end in range(len(data)):
        exc = raises_serde_error(serde, data[:end])
        assert isinstance(exc, CorruptRecord), (end, exc)
        assert "truncated" in str(exc) or "empty" in str(exc), (end, exc)


def test_truncated_body_names_schema_and_writer() -> None:
    serde = SingleObjectSerde()
    data = serde.encode("Request", samples.sample("Request"), topic="dspex.requests")
    with pytest.raises(CorruptRecord) as info:
        serde.decode(data[:-1], topic="dspex.requests")
    fingerprint = f"0x{schemas.current('Request').fingerprint:016x}"
    message = str(info.value)
    assert message.startswith("topic=dspex.requests: truncated Avro record for io.dspex.Request")
    assert f"writer fingerprint {fingerprint}" in message


def test_trailing_junk_is_corrupt(serde: Serde) -> None:
    data = serde.encode("Request", samples.sample("Request"), topic=TOPIC)
    exc = raises_serde_error(serde, data + b"\x00junk")
    assert isinstance(exc, CorruptRecord)
    assert "5 trailing byte(s)" in str(exc)


def test_random_bodies_never_escape_as_foreign_errors(serde: Serde) -> None:
    rng = random.Random(1234)
    data = serde.encode("Execution", samples.sample("Execution"), topic=TOPIC)
    head = 10 if isinstance(serde, SingleObjectSerde) else 5
    for _ in range(300):
        noise = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        try:
            serde.decode(data[:head] + noise, topic=TOPIC)
        except SerdeError:
            pass


def test_unknown_fingerprint_names_it_in_hex() -> None:
    data = b"\xc3\x01" + struct.pack("<Q", 0x0123456789ABCDEF) + b"\x00"
    with pytest.raises(SchemaNotFound, match=r"topic=dspex\.requests: .*0x0123456789abcdef"):
        SingleObjectSerde().decode(data, topic="dspex.requests")


def test_unknown_registry_id_is_schema_not_found() -> None:
    with pytest.raises(SchemaNotFound, match=r"topic=dspex.requests: .*schema id 4242"):
        ConfluentSerde(mock_client()).decode(b"\x00\x00\x00\x10\x92\x00", topic="dspex.requests")


@pytest.mark.parametrize("expect", ["Request", "io.dspex.Request"])
def test_expect_refuses_another_record(serde: Serde, expect: str) -> None:
    data = serde.encode("Response", samples.sample("Response"), topic=TOPIC)
    with pytest.raises(SerdeError, match=r"expected io\.dspex\.Request, got io\.dspex\.Response"):
        serde.decode(data, topic=TOPIC, expect=expect)
    assert serde.decode(data, topic=TOPIC, expect="io.dspex.Response").schema_name == "Response"


# -- bad records on encode -----------------------------------------------------


def test_wrong_typed_field_is_named(serde: Serde) -> None:
    record = {**samples.sample("Request"), "request_id": 42}
    with pytest.raises(SerdeError, match=f"topic={TOPIC}: .*request_id is int 42, expected string"):
        serde.encode("Request", record, topic=TOPIC)


def test_missing_required_field_is_named(serde: Serde) -> None:
    record = {k: v for k, v in samples.sample("Request").items() if k != "created_at"}
    with pytest.raises(SerdeError, match="created_at"):
        serde.encode("Request", record, topic=TOPIC)


def test_nested_field_is_named() -> None:
    route = {"pool": 7, "decided_at": 0}
    record = {**samples.sample("Request"), "route": route}
    with pytest.raises(SerdeError, match=r"io\.dspex\.Route\.pool is int 7, expected string"):
        SingleObjectSerde().encode("Request", record, topic=TOPIC)


def test_not_a_mapping_is_refused(serde: Serde) -> None:
    with pytest.raises(SerdeError, match="expected a mapping, got list"):
        # a list where a mapping is typed: what an untyped caller can pass at run time
        serde.encode("Request", [1, 2], topic=TOPIC)  # type: ignore[arg-type]


def test_unknown_schema_name_on_encode(serde: Serde) -> None:
    with pytest.raises(SchemaNotFound, match=f"topic={TOPIC}: unknown schema 'Nope'"):
        serde.encode("Nope", {}, topic=TOPIC)


# -- schema evolution: an older writer read into the current reader ------------


def without(definition: dict[str, Any], *dropped: str) -> dict[str, Any]:
    fields = [f for f in definition["fields"] if f["name"] not in dropped]
    return {**definition, "fields": fields}


class OldRequestCatalog:
    """The real catalog plus a Request v1 without ``cache`` and ``metadata``; current is v2."""

    def __init__(self) -> None:
        current = schemas.current("Request")
        self.old = build(without(current.definition, "cache", "metadata"), version=1)
        self.new = dataclasses.replace(current, version=2)

    def names(self) -> list[str]:
        return schemas.names()

    def current(self, name: str) -> schemas.Schema:
        return self.new if name == "Request" else schemas.current(name)

    def by_fingerprint(self, fp: int, /) -> schemas.Schema | None:
        return self.old if fp == self.old.fingerprint else schemas.by_fingerprint(fp)


def old_record(catalog: OldRequestCatalog) -> tuple[dict[str, Any], bytes]:
    record = without_keys(samples.sample("Request"), "cache", "metadata")
    out = BytesIO()
    fastavro.schemaless_writer(out, catalog.old.parsed, record)
    return record, out.getvalue()


def without_keys(record: dict[str, Any], *dropped: str) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in dropped}


def test_old_writer_single_object_reads_with_defaults() -> None:
    catalog = OldRequestCatalog()
    record, old_body = old_record(catalog)
    data = b"\xc3\x01" + struct.pack("<Q", catalog.old.fingerprint) + old_body
    decoded = SingleObjectSerde(catalog).decode(data, topic=TOPIC, expect="Request")
    assert decoded.writer_version == 1
    assert decoded.record["cache"] is True
    assert decoded.record["metadata"] == {}
    assert decoded.record["request_id"] == record["request_id"]


@pytest.mark.parametrize("knows_old", [True, False])
def test_old_writer_from_registry_reads_with_defaults(knows_old: bool) -> None:
    catalog = OldRequestCatalog()
    client = mock_client()
    text = json.dumps(catalog.old.definition)
    schema_id = client.register_schema(f"{TOPIC}-value", RegistrySchema(text, "AVRO"))
    record, old_body = old_record(catalog)
    serde = ConfluentSerde(client, catalog if knows_old else None)
    decoded = serde.decode(b"\x00" + schema_id.to_bytes(4, "big") + old_body, topic=TOPIC)
    # a writer only the registry knows is still read; its version is unknown (0)
    assert decoded.writer_version == (1 if knows_old else 0)
    assert decoded.record["cache"] is True
    assert decoded.record["request_id"] == record["request_id"]


def test_registry_schema_of_a_foreign_record_is_refused() -> None:
    client = mock_client()
    foreign = {"type": "record", "name": "Other", "namespace": "com.acme", "fields": []}
    schema_id = client.register_schema("x-value", RegistrySchema(json.dumps(foreign), "AVRO"))
    with pytest.raises(SchemaNotFound, match=r"com\.acme\.Other, not a DSPex record"):
        ConfluentSerde(client).decode(b"\x00" + schema_id.to_bytes(4, "big"), topic=TOPIC)


# -- registry failures ---------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (SchemaRegistryError(503, 50301, "unavailable"), RegistryUnavailable),
        (SchemaRegistryError(500, 50001, "store error"), RegistryUnavailable),
        (SchemaRegistryError(429, -1, "slow down"), RegistryUnavailable),
        (ConnectionRefusedError("connection refused"), RegistryUnavailable),
        (SchemaRegistryError(404, 40403, "Schema not found"), SchemaNotFound),
        (SchemaRegistryError(401, 401, "Unauthorized"), SchemaNotFound),
    ],
)
def test_registry_errors_are_mapped(error: Exception, expected: type[Exception]) -> None:
    serde = ConfluentSerde(FailingRegistry(error))
    with pytest.raises(expected, match=f"topic={TOPIC}: "):
        serde.decode(b"\x00\x00\x00\x00\x01\x00", topic=TOPIC)
    with pytest.raises(expected, match="Request"):
        serde.encode("Request", samples.sample("Request"), topic=TOPIC)


def test_unreachable_registry_is_retryable() -> None:
    settings = load_settings(schema_registry={"url": "http://127.0.0.1:9"})
    client = SchemaRegistryClient({**settings.schema_registry.to_client_conf(), "max.retries": 0})
    with pytest.raises(RegistryUnavailable, match="unreachable"):
        ConfluentSerde(client).decode(b"\x00\x00\x00\x00\x01\x00", topic=TOPIC)
    assert isinstance(registry_client(settings), SchemaRegistryClient)
