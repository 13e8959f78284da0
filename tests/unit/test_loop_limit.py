"""The consumer loop's in-flight limit, its commit seam and unfinished messages, on a fake consumer.

The fake returns what is already in its fetch queue even from a paused partition,
as librdkafka can for messages fetched before a pause took effect or from a
partition assigned meanwhile: the loop must put such a message back (``seek``), never
run it past its limit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, cast

from confluent_kafka import Consumer, TopicPartition

from dspex.agents.plumbing.loop import ConsumerLoop, LoopConfig, PlainCommit, Unfinished
from dspex.agents.plumbing.messages import Consumed
from dspex.streams.settings import load_settings

TP = tuple[str, int]


class FakeMessage:
    """The parts of a confluent-kafka message the loop reads."""

    def __init__(self, topic: str, partition: int, offset: int) -> None:
        self._where = (topic, partition, offset)

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return self._where[0]

    def partition(self) -> int:
        return self._where[1]

    def offset(self) -> int:
        return self._where[2]

    def key(self) -> bytes:
        return b"k"

    def value(self) -> bytes:
        return b"v"

    def headers(self) -> None:
        return None

    def timestamp(self) -> tuple[int, int]:
        return (0, 0)


class FakeConsumer:
    """A fetch queue that ignores pauses; a seek holds a message until its partition resumes."""

    def __init__(self, messages: list[FakeMessage]) -> None:
        self.queue = list(messages)
        self.held: list[FakeMessage] = []
        self.paused: set[TP] = set()
        self.seeks: list[tuple[str, int, int]] = []
        self.commits: list[dict[TP, int]] = []

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[FakeMessage]:
        ready = [m for m in self.held if (m.topic(), m.partition()) not in self.paused]
        for message in ready:
            self.held.remove(message)
        taken = [*ready, *self.queue][:num_messages]
        self.queue = [m for m in self.queue if m not in taken]
        self.held = [m for m in ready if m not in taken] + self.held
        return taken

    def seek(self, tp: TopicPartition) -> None:
        self.seeks.append((tp.topic, tp.partition, tp.offset))
        self.held.append(FakeMessage(tp.topic, tp.partition, tp.offset))

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition("t", 0), TopicPartition("t", 1)]

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.paused |= {(p.topic, p.partition) for p in partitions}

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.paused -= {(p.topic, p.partition) for p in partitions}

    def commit(self, offsets: list[TopicPartition], asynchronous: bool = True) -> None:
        self.commits.append({(p.topic, p.partition): p.offset for p in offsets})

    def close(self) -> None:
        return None


def make_loop(
    consumer: FakeConsumer,
    handle: Callable[[Consumed], Awaitable[None]],
    limit: int = 1,
    **options: Any,
) -> ConsumerLoop:
    config = LoopConfig(
        topics=("t",), group_id="g", client_id="c", limit=limit, poll_timeout_s=0.01, keepalive_s=0
    )
    settings = load_settings(kafka={"bootstrap_servers": "127.0.0.1:1"})
    loop = ConsumerLoop(settings, config, handle, **options)
    loop._subscribe = lambda: cast(Consumer, consumer)  # type: ignore[method-assign]
    return loop


async def run_until(loop: ConsumerLoop, done: Callable[[], bool]) -> None:
    stop = asyncio.Event()
    running = asyncio.create_task(loop.run(stop))
    for _ in range(1000):
        if done() or running.done():
            break
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(running, 30)


async def test_at_its_limit_the_loop_puts_back_a_message_polled_while_paused() -> None:
    consumer = FakeConsumer([FakeMessage("t", 0, 0), FakeMessage("t", 1, 0)])
    seen: list[TP] = []
    running = [0]
    most = [0]

    async def handle(consumed: Consumed) -> None:
        running[0] += 1
        most[0] = max(most[0], running[0])
        seen.append((consumed.topic, consumed.partition))
        if consumed.partition == 0:  # long enough for many paused polls
            while not consumer.seeks:
                await asyncio.sleep(0.01)
        running[0] -= 1

    await run_until(make_loop(consumer, handle), lambda: len(seen) == 2 and not running[0])
    print(f"\nheld at once {most[0]}, put back {consumer.seeks}")
    assert seen == [("t", 0), ("t", 1)]
    assert most[0] == 1
    assert consumer.seeks[0] == ("t", 1, 0)
    assert consumer.commits[-1] == {("t", 0): 1, ("t", 1): 1}


class Recording(PlainCommit):
    """A committer that records what the loop asks of it."""

    def __init__(self) -> None:
        self.offsets: list[dict[TP, int]] = []
        self.forgotten: list[set[TP]] = []

    def commit(self, consumer: Consumer, offsets: list[TopicPartition]) -> None:
        self.offsets.append({(p.topic, p.partition): p.offset for p in offsets})

    def forget(self, partitions: set[TP]) -> None:
        self.forgotten.append(partitions)


async def test_commits_go_through_the_committer_and_an_unfinished_message_stays_uncommitted() -> (
    None
):
    consumer = FakeConsumer([FakeMessage("t", 0, o) for o in range(3)])
    committer = Recording()
    released: list[set[TP]] = []
    seen: list[int] = []

    async def handle(consumed: Consumed) -> None:
        seen.append(consumed.offset)
        if consumed.offset == 1:
            raise Unfinished

    # the unfinished message keeps one of the two slots: the other runs the rest
    loop = make_loop(consumer, handle, 2, committer=committer, on_released=released.append)
    await run_until(loop, lambda: len(seen) == 3)
    assert seen == [0, 1, 2]
    assert consumer.commits == []  # the committer, not the consumer, commits
    assert committer.offsets and all(o == {("t", 0): 1} for o in committer.offsets)
    assert loop._fatal is None
    loop._on_lost(cast(Consumer, consumer), [TopicPartition("t", 0)])
    assert committer.forgotten == [{("t", 0)}] and released == [{("t", 0)}]


async def test_a_batch_handler_gets_each_fetch_at_once_within_the_limit() -> None:
    consumer = FakeConsumer([FakeMessage("t", o % 2, o // 2) for o in range(10)])
    batches: list[list[tuple[int, int]]] = []

    async def one(_: Consumed) -> None:
        raise AssertionError("a fetch of several messages goes to the batch handler")

    async def handle_batch(batch: list[Consumed]) -> None:
        batches.append([(c.partition, c.offset) for c in batch])
        await asyncio.sleep(0.01)

    loop = make_loop(consumer, one, 4, handle_batch=handle_batch)
    await run_until(loop, lambda: sum(map(len, batches)) == 10 and not loop.in_flight())
    print(f"\nbatches {[len(b) for b in batches]}")
    assert sorted(m for b in batches for m in b) == sorted((o % 2, o // 2) for o in range(10))
    assert all(2 <= len(b) <= 4 for b in batches)
    assert consumer.commits[-1] == {("t", 0): 5, ("t", 1): 5}
