"""``dspex up``'s pool hint follower reads the newest RoutingTable's hints from the broker."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from confluent_kafka import KafkaError, Message

from dspex.schemas.samples import sample
from dspex.streams import kafka
from dspex.streams.ops.autoscale import HintFollower, desired_processes
from dspex.streams.serde import make_serde
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics


def test_follower_takes_the_newest_tables_hints(
    settings: Settings, create_topics: Callable[[], object], caplog: pytest.LogCaptureFixture
) -> None:
    create_topics()
    topic = Topics(settings.topics).name("routing")
    serde, producer = make_serde(settings), kafka.producer(settings)
    now = datetime.now(UTC).replace(microsecond=0)
    tables = [  # (program, created, hints): the newest is not the last one written
        ("a", now, {"general": 3}),
        ("b", now - timedelta(minutes=1), {"general": 9}),
        ("c", now + timedelta(seconds=1), {}),
    ]
    for program, created, hints in tables:
        record = sample("RoutingTable") | {
            "program_id": program,
            "created_at": created,
            "pool_hints": hints,
        }
        producer.produce(topic, serde.encode("RoutingTable", record, topic=topic), program.encode())
    producer.produce(topic, b"not avro", b"junk")
    producer.flush(10)
    follower = HintFollower(settings)
    follower.start()
    try:
        deadline = time.monotonic() + 30
        while follower.hints() != {"general": 3}:
            assert time.monotonic() < deadline, follower.hints()
            time.sleep(0.1)
        # A marker after them on every partition: the follower reads each partition in
        # order and logs every unreadable record, so once it has logged all the markers
        # it has read the older table and the junk too.
        markers = _produce_markers(settings, topic)
        while not markers <= _logged_unreadable(caplog):
            assert time.monotonic() < deadline, (markers, _logged_unreadable(caplog))
            time.sleep(0.1)
        assert follower.hints() == {"general": 3}  # the older table and the junk changed nothing
    finally:
        follower.stop()
    assert desired_processes(follower.hints(), settings.pools)["general"] == 3


def _produce_markers(settings: Settings, topic: str) -> set[tuple[int, int]]:
    """An unreadable record on every partition of ``topic``: their (partition, offset)s."""
    producer = kafka.producer(settings)
    placed: set[tuple[int, int]] = set()

    def delivered(err: KafkaError | None, message: Message) -> None:
        assert err is None, err
        placed.add((message.partition() or 0, message.offset() or 0))

    partitions = Topics(settings.topics).spec("routing").partitions
    for partition in range(partitions):
        producer.produce(topic, b"marker", b"marker", partition=partition, on_delivery=delivered)
    assert producer.flush(10) == 0
    return placed


def _logged_unreadable(caplog: pytest.LogCaptureFixture) -> set[tuple[int, int]]:
    """(partition, offset) of every routing record the follower logged as unreadable."""
    found: set[tuple[int, int]] = set()
    for record in list(caplog.records):
        if record.levelno == logging.WARNING and record.msg.startswith("unreadable routing"):
            args: Any = record.args
            found.add((int(args[0]), int(args[1])))
    return found
