"""StallGuard: a partition that stopped fetching is restarted; a moving one never is."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import cast

from confluent_kafka import Consumer, TopicPartition

from dspex.streams.reader import StallGuard


class FakeConsumer:
    """Positions and high-water marks set by the test; seeks recorded."""

    def __init__(self, positions: dict[int, int], highs: dict[int, int]) -> None:
        self.positions = positions
        self.highs = highs
        self.seeks: list[tuple[int, int]] = []
        self.requests: list[list[int]] = []  # partitions per end-offsets request
        self.release = threading.Event()
        self.release.set()

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition("t", p) for p in self.positions]

    def position(self, tps: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition("t", tp.partition, self.positions[tp.partition]) for tp in tps]

    def offsets_for_times(self, tps: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        assert all(tp.offset == -1 for tp in tps), "timestamp -1: the latest offset"
        self.requests.append(sorted(tp.partition for tp in tps))
        self.release.wait(5)
        return [TopicPartition("t", tp.partition, self.highs[tp.partition]) for tp in tps]

    def seek(self, tp: TopicPartition) -> None:
        self.seeks.append((tp.partition, tp.offset))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def inline(call: Callable[[], list[TopicPartition]]) -> Future[list[TopicPartition]]:
    """Run the end-offsets request at once (the default runs it on a thread)."""
    done: Future[list[TopicPartition]] = Future()
    done.set_result(call())
    return done


def guard(consumer: FakeConsumer, clock: Clock, wanted: list[bool] | None = None) -> StallGuard:
    flag = wanted if wanted is not None else [True]
    return StallGuard(
        cast(Consumer, consumer), interval_s=10, clock=clock, wanted=lambda: flag[0], run=inline
    )


def test_a_partition_behind_its_end_that_does_not_move_is_restarted_once_per_check() -> None:
    consumer, clock = FakeConsumer({0: 5, 1: 7}, {0: 9, 1: 7}), Clock()
    stalls = guard(consumer, clock)
    assert stalls.check() == []  # not due yet
    clock.now = 10
    assert stalls.check() == []  # first look: nothing to compare with
    clock.now = 15
    assert stalls.check() == []  # not due
    clock.now = 20
    assert stalls.check() == [("t", 0)]  # partition 1 is at its end
    assert consumer.seeks == [(0, 5)]
    assert stalls.restarts == 1


def test_a_partition_that_moves_is_never_restarted() -> None:
    consumer, clock = FakeConsumer({0: 5}, {0: 100}), Clock()
    stalls = guard(consumer, clock)
    for n in range(1, 6):
        clock.now = 10 * n
        consumer.positions[0] += 3  # slow, but fetching
        assert stalls.check() == []
    assert consumer.seeks == []


def test_an_unfetched_partition_counts_from_where_it_was_assigned() -> None:
    consumer, clock = FakeConsumer({0: -1001}, {0: 4}), Clock()
    stalls = guard(consumer, clock)
    stalls.assigned([TopicPartition("t", 0, 2)])
    clock.now = 10
    stalls.check()
    clock.now = 20
    assert stalls.check() == [("t", 0)]
    assert consumer.seeks == [(0, 2)]


def test_nothing_is_checked_while_nothing_is_wanted() -> None:
    consumer, clock, wanted = FakeConsumer({0: 5}, {0: 9}), Clock(), [False]
    stalls = guard(consumer, clock, wanted)
    for n in range(1, 4):
        clock.now = 10 * n
        assert stalls.check() == []
    wanted[0] = True
    clock.now = 40
    assert stalls.check() == []  # the first look after a pause only records positions
    clock.now = 50
    assert stalls.check() == [("t", 0)]


def test_a_partition_is_restarted_at_one_position_once_then_only_after_a_while() -> None:
    """A read-committed position stays before aborted records nobody receives: seeking it
    at every check would make the fetcher read them again and again."""
    consumer, clock = FakeConsumer({0: 5}, {0: 9}), Clock()
    stalls = guard(consumer, clock)
    restarted = []
    for n in range(1, 10):
        clock.now = 10 * n
        restarted += stalls.check()
    assert consumer.seeks == [(0, 5), (0, 5)]  # at 20 s, then 60 s later (6 checks)
    assert restarted == [("t", 0), ("t", 0)]


def test_the_ends_are_asked_in_one_request_off_the_polling_thread() -> None:
    """The broker answers a connection's requests in order, each behind the consumer's
    parked fetch: one request per partition on the polling thread stopped an idle
    18-partition reader for ~9 s in every 10."""
    consumer, clock = FakeConsumer({0: 5, 1: 7, 2: 1}, {0: 9, 1: 7, 2: 1}), Clock()
    stalls = StallGuard(cast(Consumer, consumer), interval_s=10, clock=clock)  # its own thread
    clock.now = 10
    stalls.check()
    consumer.release.clear()  # the broker is slow to answer
    clock.now = 20
    started = time.monotonic()
    assert stalls.check() == []  # asked, not waited for
    assert time.monotonic() - started < 1.0
    consumer.release.set()
    deadline = time.monotonic() + 5
    restarted: list[tuple[str, int]] = []
    while not restarted and time.monotonic() < deadline:
        restarted = stalls.check()  # the answer is applied on the polling thread
        time.sleep(0.01)
    assert restarted == [("t", 0)]
    assert consumer.requests == [[0, 1, 2]]  # one request for every unmoved partition
    stalls.close()


def test_a_partition_that_moved_while_its_end_was_asked_is_not_restarted() -> None:
    consumer, clock = FakeConsumer({0: 5}, {0: 9}), Clock()
    asked: list[Callable[[], list[TopicPartition]]] = []

    def later(call: Callable[[], list[TopicPartition]]) -> Future[list[TopicPartition]]:
        asked.append(call)
        return Future()

    stalls = StallGuard(cast(Consumer, consumer), interval_s=10, clock=clock, run=later)
    clock.now = 10
    stalls.check()
    clock.now = 20
    stalls.check()
    (call,) = asked
    consumer.positions[0] = 6  # the fetcher moved on meanwhile
    future = stalls._pending
    assert future is not None
    future.set_result(call())
    assert stalls.check() == []
    assert consumer.seeks == []
