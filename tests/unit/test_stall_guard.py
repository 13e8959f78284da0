"""StallGuard: a partition that stopped fetching is restarted; a moving one never is."""

from __future__ import annotations

from typing import cast

from confluent_kafka import Consumer, TopicPartition

from dspex.streams.reader import StallGuard


class FakeConsumer:
    """Positions and high-water marks set by the test; seeks recorded."""

    def __init__(self, positions: dict[int, int], highs: dict[int, int]) -> None:
        self.positions = positions
        self.highs = highs
        self.seeks: list[tuple[int, int]] = []

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition("t", p) for p in self.positions]

    def position(self, tps: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition("t", tp.partition, self.positions[tp.partition]) for tp in tps]

    def get_watermark_offsets(
        self, tp: TopicPartition, timeout: float, cached: bool
    ) -> tuple[int, int]:
        assert not cached, "a cached mark is what the stalled fetcher last saw"
        return 0, self.highs[tp.partition]

    def seek(self, tp: TopicPartition) -> None:
        self.seeks.append((tp.partition, tp.offset))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def guard(consumer: FakeConsumer, clock: Clock, wanted: list[bool] | None = None) -> StallGuard:
    flag = wanted if wanted is not None else [True]
    return StallGuard(cast(Consumer, consumer), interval_s=10, clock=clock, wanted=lambda: flag[0])


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
