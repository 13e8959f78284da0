"""CompactedReader readiness: ``ready`` waits for the required topics only, ``warm`` for all."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import TopicPartition  # type: ignore[import-untyped]  # faust's; ships no hints

from dspex.agents.plumbing.catalog import CompactedReader
from dspex.streams.serde import make_serde
from dspex.streams.settings import load_settings


class StuckConsumer:
    """No new records; ``routing`` is at its end, ``cache`` stays behind forever."""

    def __init__(self, positions: dict[Any, int]) -> None:
        self.positions = positions
        self.fetches = 0

    async def getmany(self, timeout_ms: int) -> dict[Any, list[Any]]:
        self.fetches += 1
        await asyncio.sleep(0)
        return {}

    async def position(self, tp: Any) -> int:
        return self.positions[tp]


def _reader(**kwargs: Any) -> CompactedReader:
    settings = load_settings()
    views = {"routing": ("RoutingTable", print), "cache": ("Response", print)}
    return CompactedReader("localhost:9", settings.kafka, make_serde(settings), views, **kwargs)


async def test_a_recent_topic_behind_its_end_does_not_hold_ready() -> None:
    reader = _reader(recent={"cache": 10})
    routing, cache = TopicPartition("routing", 0), TopicPartition("cache", 0)
    reader._consumer = consumer = StuckConsumer({routing: 5, cache: 3})
    task = asyncio.create_task(reader._follow([routing, cache], {routing: 5, cache: 9}))
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


def test_a_recent_topic_needs_a_view() -> None:
    with pytest.raises(ValueError, match="recent topics without a view"):
        _reader(recent={"variables": 10})
