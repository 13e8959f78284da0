"""Serving delivery reports: polled while records wait for one, asleep when none do."""

from __future__ import annotations

import asyncio

from dspex.agents.plumbing.publisher import DELIVERY_POLL_S, Publisher, serve_deliveries
from dspex.streams.serde import make_serde
from dspex.streams.settings import load_settings
from tests.fakes import FakeProducer

SERDE = make_serde(load_settings())


async def test_an_idle_publisher_is_not_polled_and_a_send_wakes_the_server() -> None:
    producer = FakeProducer(hold_acks=True)
    publisher = Publisher(producer, SERDE, asyncio.get_running_loop())
    server = asyncio.create_task(serve_deliveries(publisher))
    try:
        # clock waits on purpose: what is tested is how often the server polls as time
        # passes (every DELIVERY_POLL_S while a record waits, never while none does)
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
    first, second = FakeProducer(hold_acks=True), FakeProducer(hold_acks=True)
    loop = asyncio.get_running_loop()
    publishers = [Publisher(p, SERDE, loop) for p in (first, second)]
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
