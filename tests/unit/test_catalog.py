"""CompactedReader readiness: ``ready`` waits for the required topics only, ``warm`` for all."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from confluent_kafka import TopicPartition

from dspex.agents.plumbing.catalog import CompactedReader
from dspex.streams.serde import make_serde
from dspex.streams.settings import load_settings


class StuckConsumer:
    """No new records; ``routing`` is at its end, ``cache`` stays behind forever."""

    def __init__(self, positions: dict[tuple[str, int], int]) -> None:
        self.positions = positions
        self.fetches = 0

    def consume(self, count: int, timeout: float) -> list[Any]:
        self.fetches += 1
        return []

    def position(self, tps: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, self.positions[(tp.topic, 0)]) for tp in tps]


def _reader(**kwargs: Any) -> CompactedReader:
    settings = load_settings()
    views = {"routing": ("RoutingTable", print), "cache": ("Response", print)}
    return CompactedReader(settings, make_serde(settings), views, **kwargs)


async def test_a_recent_topic_behind_its_end_does_not_hold_ready() -> None:
    reader = _reader(recent={"cache": 10})
    reader._consumer = consumer = StuckConsumer({("routing", 0): 5, ("cache", 0): 3})
    ranges = {("routing", 0): (0, 5), ("cache", 0): (0, 9)}
    task = asyncio.create_task(reader._follow(ranges))
    try:
        await asyncio.wait_for(reader.ready.wait(), 5)
        # two more rounds of the reader's loop, each checking whether the recent topic
        # caught up: not a time that passed, the work that would have set warm
        ready_at = consumer.fetches

        async def two_more_rounds() -> None:
            while consumer.fetches < ready_at + 2:
                await asyncio.sleep(0)

        await asyncio.wait_for(two_more_rounds(), 5)
        assert not reader.warm.is_set()
    finally:
        task.cancel()


async def test_partitions_with_nothing_to_read_are_ready_at_once() -> None:
    reader = _reader()
    reader._consumer = StuckConsumer({})
    task = asyncio.create_task(reader._follow({("routing", 0): (4, 4), ("cache", 0): (0, 0)}))
    try:
        await asyncio.wait_for(reader.warm.wait(), 5)
        assert reader.ready.is_set()
    finally:
        task.cancel()


def test_a_recent_topic_needs_a_view() -> None:
    with pytest.raises(ValueError, match="recent topics without a view"):
        _reader(recent={"variables": 10})
