"""The CompactedReader against a real broker: full replay, the recent-topic budget, following."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from dspex.agents.plumbing.catalog import CompactedReader, RoutingCatalog
from dspex.agents.router.cache import ResultCache
from dspex.schemas.samples import sample
from dspex.streams import kafka
from dspex.streams.serde import make_serde
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics
from tests.integration.tail import until

PARTITIONS = 6  # the catalog's `cache` partitions
PER_PARTITION = 20
TOTAL = PER_PARTITION * PARTITIONS
BUDGET = 12  # two per partition


async def test_recent_topic_replays_its_newest_records_only_then_follows(
    settings: Settings, create_topics: Callable[[], object]
) -> None:
    create_topics()
    topics = Topics(settings.topics)
    routing, cache_topic = topics.name("routing"), topics.name("cache")
    serde, producer = make_serde(settings), kafka.producer(settings)
    assert topics.spec("cache").partitions == PARTITIONS

    table = sample("RoutingTable") | {"program_id": "qa"}
    producer.produce(routing, serde.encode("RoutingTable", table, topic=routing), b"qa")
    answer = sample("Response") | {"status": "ok", "final": True, "cached": False}
    answer["outputs"] = {"answer": '"Paris"'}
    value = serde.encode("Response", answer, topic=cache_topic)
    for i in range(TOTAL):
        producer.produce(cache_topic, value, f"key-{i:03d}".encode(), partition=i % PARTITIONS)
    producer.flush(10)

    catalog, cache = RoutingCatalog(), ResultCache(1000)
    reader = CompactedReader(
        settings,
        serde,
        {routing: ("RoutingTable", catalog.apply), cache_topic: ("Response", cache.apply)},
        recent={cache_topic: BUDGET},
    )
    await reader.start({routing: topics.spec("routing").partitions, cache_topic: PARTITIONS})
    try:
        await asyncio.wait_for(reader.ready.wait(), 30)
        assert catalog.table_for("qa") is not None  # ready means the whole routing topic
        await asyncio.wait_for(reader.warm.wait(), 30)
        newest = {f"key-{i:03d}" for i in range(TOTAL - BUDGET, TOTAL)}
        assert {k for k in newest if cache.get(k) is not None} == newest
        assert len(cache) == BUDGET  # nothing older than the budget was replayed
        assert cache.get("key-000") is None

        producer.produce(cache_topic, value, b"live")  # written after start: followed
        producer.flush(10)
        await until(lambda: cache.get("live") is not None, 30, "the live record followed")
    finally:
        await reader.stop()
