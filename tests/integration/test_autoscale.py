"""``dspex up``'s pool hint follower reads the newest RoutingTable's hints from the broker."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from dspex.schemas.samples import sample
from dspex.streams import kafka
from dspex.streams.ops.autoscale import HintFollower, desired_processes
from dspex.streams.serde import make_serde
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics


def test_follower_takes_the_newest_tables_hints(
    settings: Settings, create_topics: Callable[[], object]
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
        time.sleep(1.0)  # the older table and the junk after it change nothing
        assert follower.hints() == {"general": 3}
    finally:
        follower.stop()
    assert desired_processes(follower.hints(), settings.pools)["general"] == 3
