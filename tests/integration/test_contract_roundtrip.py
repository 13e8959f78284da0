"""Every record type travels through a real broker on its catalog topic and comes back intact.

The bytes read back are also decoded by Apache Avro's reference implementation,
so what DSPex writes is what any Avro client in any language can read.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Callable
from typing import Any

import avro.io
import avro.schema
import pytest

from dspex import schemas
from dspex.schemas.samples import sample
from dspex.streams import kafka
from dspex.streams.ops.admin import TopicReport
from dspex.streams.serde import make_serde
from dspex.streams.settings import Settings
from dspex.streams.topics import CATALOG, Topics
from tests.integration.tail import OpenTail

TOPIC_FOR_SCHEMA = {spec.schema: spec.name for spec in reversed(CATALOG)}


def _reference_decode(data: bytes) -> dict[str, Any]:
    """Decode single-object encoding with Apache Avro only (no DSPex code)."""
    assert data[:2] == b"\xc3\x01"
    (fingerprint,) = struct.unpack("<Q", data[2:10])
    writer = schemas.by_fingerprint(fingerprint)
    assert writer is not None
    parsed = avro.schema.parse(json.dumps(writer.definition))
    reader = avro.io.DatumReader(parsed)
    record = reader.read(avro.io.BinaryDecoder(io.BytesIO(data[10:])))
    assert isinstance(record, dict)
    return record


@pytest.mark.parametrize("name", sorted(TOPIC_FOR_SCHEMA))
def test_every_record_type_round_trips_through_the_broker(
    name: str, settings: Settings, create_topics: Callable[[], list[TopicReport]], tails: OpenTail
) -> None:
    create_topics()
    short = TOPIC_FOR_SCHEMA[name]
    topic = Topics(settings.topics).name(short)
    serde = make_serde(settings)
    records = [sample(name) for _ in range(5)]
    producer = kafka.producer(settings)
    for i, record in enumerate(records):
        producer.produce(topic, key=f"k{i}".encode(), value=serde.encode(name, record, topic=topic))
    assert producer.flush(30) == 0

    tail = tails([short], from_beginning=True)
    tail.catch_up()  # the producer flushed: all of them are on the topic
    messages = tail.messages(short)
    assert len(messages) == len(records) and tail.errors == []
    by_key = {msg.key(): msg.value() for msg in messages}
    for i, record in enumerate(records):
        data = by_key[f"k{i}".encode()]
        assert data is not None
        decoded = serde.decode(data, topic=topic, expect=name)
        assert decoded.schema_name == name
        assert decoded.record == record
        assert _reference_decode(data) == decoded.record
