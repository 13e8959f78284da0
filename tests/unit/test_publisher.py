"""Serving delivery reports: polled while records wait for one, asleep when none do."""

from __future__ import annotations

import asyncio
from typing import Any

from dspex.agents.plumbing.publisher import DELIVERY_POLL_S, Publisher, serve_deliveries
from dspex.streams.serde import make_serde
from dspex.streams.settings import load_settings

SERDE = make_serde(load_settings())


class QueuedProducer:
    """Holds each delivery report until ``broker_acks`` runs; ``poll`` serves acked ones."""

    def __init__(self) -> None:
        self.polls = 0
        self.queued: list[Any] = []  # reports librdkafka has not handed over yet
        self.ready: list[Any] = []  # reports the next poll() serves

    def produce(self, topic: str, value: bytes, key: Any, **kw: Any) -> None:
        self.queued.append(kw["on_delivery"])

    def broker_acks(self) -> None:
        self.ready += self.queued
        self.queued = []

    def poll(self, _: float) -> int:
        self.polls += 1
        served, self.ready = self.ready, []
        for callback in served:
            callback(None, None)
        return len(served)

    def __len__(self) -> int:
        return len(self.queued) + len(self.ready)


async def test_an_idle_publisher_is_not_polled_and_a_send_wakes_the_server() -> None:
    producer = QueuedProducer()
    publisher = Publisher(producer, SERDE, asyncio.get_running_loop())  # type: ignore[arg-type]
    server = asyncio.create_task(serve_deliveries(publisher))
    try:
        await asyncio.sleep(40 * DELIVERY_POLL_S)
        assert producer.polls == 1  # one look at start, then asleep: no 5 ms wake-ups

        delivered = await publisher.send_bytes("app.replies", b"k", b"v")
        await asyncio.sleep(4 * DELIVERY_POLL_S)
        assert not delivered.done() and producer.polls > 2  # polled while the record waits
        producer.broker_acks()
        await asyncio.wait_for(delivered, 1)

        await asyncio.sleep(2 * DELIVERY_POLL_S)
        settled = producer.polls
        await asyncio.sleep(40 * DELIVERY_POLL_S)
        assert producer.polls == settled  # nothing waits: asleep again
    finally:
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)
    await publisher.send_bytes("app.replies", b"k", b"v")  # after the server: no stale wake-up
    assert producer.polls == settled


async def test_one_server_serves_every_publisher_it_was_given() -> None:
    first, second = QueuedProducer(), QueuedProducer()
    loop = asyncio.get_running_loop()
    publishers = [Publisher(p, SERDE, loop) for p in (first, second)]  # type: ignore[arg-type]
    server = asyncio.create_task(serve_deliveries(*publishers))
    try:
        await asyncio.sleep(0)
        delivered = await publishers[1].send_bytes("app.audit", b"k", b"v")
        second.broker_acks()
        await asyncio.wait_for(delivered, 1)
        assert first.polls == second.polls > 1
    finally:
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)
