"""A consumer loop whose static member is fenced joins again with a new consumer.

Seen after a broker restart under load: a static member whose session timed out
rejoined while an offset commit of its old member id was in flight; the broker
fenced the commit (FENCED_INSTANCE_ID), librdkafka made the consumer fatal, and
the loop kept polling a handle that never fetched again: the router stayed up and
routed nothing. Here the fencing is made on purpose: a second consumer joins the
group under the loop's ``group.instance.id`` while the loop is committing. The
loop must notice, replace its consumer, and handle what is produced afterwards.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

from dspex.agents.plumbing.loop import ConsumerLoop, LoopConfig
from dspex.agents.plumbing.messages import Consumed
from dspex.streams import kafka
from dspex.streams.ops.admin import TopicReport
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics


async def test_a_fenced_static_member_joins_again_and_keeps_consuming(
    settings: Settings, create_topics: Callable[[], list[TopicReport]]
) -> None:
    create_topics()
    topic = Topics(settings.topics).name("pool.general")
    group = f"{settings.topics.prefix}fenced"
    seen: list[str] = []

    async def handle(consumed: Consumed) -> None:
        seen.append((consumed.value or b"").decode())

    config = LoopConfig(
        topics=(topic,), group_id=group, client_id="fenced-test", limit=8, instance_id="1"
    )
    loop = ConsumerLoop(settings, config, handle)
    stop = asyncio.Event()
    running = asyncio.create_task(loop.run(stop))
    producer = kafka.producer(settings)

    async def produce_and_wait(values: list[str], timeout_s: float = 90.0) -> float:
        started = time.monotonic()
        for value in values:
            producer.produce(topic, value.encode(), key=value.encode())
        producer.flush(30)
        while not set(values) <= set(seen):
            assert time.monotonic() - started < timeout_s, (values, seen)
            assert not running.done(), running
            await asyncio.sleep(0.1)
        return time.monotonic() - started

    try:
        await produce_and_wait([f"before-{n}" for n in range(6)])
        # an impostor with the same instance id joins: the loop's member id is fenced
        impostor = kafka.consumer(
            settings,
            group,
            **{"group.instance.id": "1", "partition.assignment.strategy": "cooperative-sticky"},
        )
        impostor.subscribe([topic])
        fenced_at = time.monotonic()
        while loop.renewals == 0:
            impostor.poll(0.2)
            assert time.monotonic() - fenced_at < 90, "the loop never saw it was fenced"
            await asyncio.sleep(0)
        impostor.close()
        after = [f"after-{uuid.uuid4().hex[:6]}-{n}" for n in range(6)]
        took = await produce_and_wait(after)
        print(
            f"\nfenced static member: new consumer {loop.renewals}x; records produced after "
            f"the impostor left handled {took:.1f}s later"
        )
        assert loop.renewals >= 1
        assert not running.done()
    finally:
        stop.set()
        await asyncio.wait_for(running, 60)
