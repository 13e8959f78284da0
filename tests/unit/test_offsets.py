"""OffsetTracker never commits past an unfinished offset; RecentIds is a bounded LRU."""

from __future__ import annotations

import random

import pytest

from dspex.agents.plumbing.offsets import OffsetTracker, RecentIds

TP = ("dspex.pool.general", 0)
OTHER = ("dspex.pool.general", 1)


def _expected(started: set[int], finished: set[int]) -> int | None:
    """The definition, brute force: one past the highest o with every started <= o finished."""
    if not finished:
        return None
    unfinished = started - finished
    if unfinished:
        return min(unfinished)
    return max(finished) + 1


def test_nothing_is_committable_before_anything_finished() -> None:
    tracker = OffsetTracker()
    tracker.started(TP, 5)
    tracker.started(TP, 6)
    assert tracker.committable() == {}
    assert tracker.in_flight() == 2


def test_in_order_completion_commits_one_past_the_last() -> None:
    tracker = OffsetTracker()
    for offset in (10, 11, 12):
        tracker.started(TP, offset)
        assert tracker.finished(TP, offset)
    assert tracker.committable() == {TP: 13}
    assert tracker.in_flight() == 0


def test_out_of_order_completion_stops_at_the_lowest_unfinished() -> None:
    tracker = OffsetTracker()
    for offset in range(5):
        tracker.started(TP, offset)
    tracker.finished(TP, 3)
    tracker.finished(TP, 4)
    assert tracker.committable() == {TP: 0}
    tracker.finished(TP, 0)
    tracker.finished(TP, 1)
    assert tracker.committable() == {TP: 2}
    tracker.finished(TP, 2)
    assert tracker.committable() == {TP: 5}


def test_gaps_in_offsets_are_committed_past() -> None:
    # compacted topics and transaction markers leave offsets that are never delivered
    tracker = OffsetTracker()
    for offset in (3, 7, 9):
        tracker.started(TP, offset)
    tracker.finished(TP, 3)
    tracker.finished(TP, 9)
    assert tracker.committable() == {TP: 7}
    tracker.finished(TP, 7)
    assert tracker.committable() == {TP: 10}


def test_partitions_are_independent() -> None:
    tracker = OffsetTracker()
    tracker.started(TP, 0)
    tracker.started(OTHER, 100)
    tracker.finished(OTHER, 100)
    assert tracker.committable() == {OTHER: 101}
    assert tracker.in_flight() == 1
    assert tracker.in_flight([OTHER]) == 0
    assert tracker.in_flight([TP]) == 1


def test_finishing_an_unknown_offset_changes_nothing() -> None:
    tracker = OffsetTracker()
    tracker.started(TP, 1)
    assert not tracker.finished(TP, 2)
    assert not tracker.finished(OTHER, 1)
    assert tracker.finished(TP, 1)
    assert not tracker.finished(TP, 1)
    assert tracker.committable() == {TP: 2}


def test_starting_an_offset_twice_counts_once() -> None:
    tracker = OffsetTracker()
    tracker.started(TP, 4)
    tracker.started(TP, 4)
    assert tracker.in_flight() == 1
    tracker.finished(TP, 4)
    assert tracker.in_flight() == 0
    assert tracker.committable() == {TP: 5}


def test_forget_drops_revoked_partitions_and_late_finishes() -> None:
    tracker = OffsetTracker()
    tracker.started(TP, 0)
    tracker.started(OTHER, 0)
    tracker.finished(OTHER, 0)
    tracker.forget([TP, OTHER])
    assert tracker.committable() == {}
    assert tracker.in_flight() == 0
    assert not tracker.finished(TP, 0)  # the task of a revoked partition finishing late
    assert tracker.partitions() == []


def test_uncommitted_reports_only_progress_since_the_last_commit() -> None:
    tracker = OffsetTracker()
    tracker.started(TP, 0)
    tracker.started(OTHER, 0)
    tracker.finished(TP, 0)
    tracker.finished(OTHER, 0)
    assert tracker.uncommitted() == {TP: 1, OTHER: 1}
    tracker.committed({TP: 1, OTHER: 1})
    assert tracker.uncommitted() == {}
    tracker.started(TP, 1)
    tracker.finished(TP, 1)
    assert tracker.uncommitted() == {TP: 2}


def test_committed_after_forget_is_ignored() -> None:
    tracker = OffsetTracker()
    tracker.started(TP, 0)
    tracker.finished(TP, 0)
    tracker.forget([TP])
    tracker.committed({TP: 1})
    tracker.started(TP, 0)  # re-assigned and redelivered from the old position
    tracker.finished(TP, 0)
    assert tracker.uncommitted() == {TP: 1}


@pytest.mark.parametrize("seed", range(50))
def test_random_completion_orders_match_the_definition(seed: int) -> None:
    rng = random.Random(seed)
    tracker = OffsetTracker()
    partitions = [("t", p) for p in range(rng.randint(1, 3))]
    next_offset = {tp: rng.randint(0, 1000) for tp in partitions}
    started: dict[tuple[str, int], set[int]] = {tp: set() for tp in partitions}
    finished: dict[tuple[str, int], set[int]] = {tp: set() for tp in partitions}
    last: dict[tuple[str, int], int] = {}
    for _ in range(400):
        tp = rng.choice(partitions)
        running = sorted(started[tp] - finished[tp])
        if running and rng.random() < 0.55:
            offset = rng.choice(running)
            assert tracker.finished(tp, offset)
            finished[tp].add(offset)
        else:
            offset = next_offset[tp]
            next_offset[tp] += rng.choice((1, 1, 1, 2))  # sometimes a gap
            tracker.started(tp, offset)
            started[tp].add(offset)
        _check(tracker, started, finished, last)
    assert tracker.in_flight() == sum(len(started[tp] - finished[tp]) for tp in partitions)


def _check(
    tracker: OffsetTracker,
    started: dict[tuple[str, int], set[int]],
    finished: dict[tuple[str, int], set[int]],
    last: dict[tuple[str, int], int],
) -> None:
    committable = tracker.committable()
    for tp in started:
        expected = _expected(started[tp], finished[tp])
        assert committable.get(tp) == expected
        if expected is None:
            continue
        # never past an unfinished offset, and never backwards
        assert all(o >= expected for o in started[tp] - finished[tp])
        assert expected >= last.get(tp, expected)
        last[tp] = expected


def test_recent_ids_remember_and_evict_the_least_recent() -> None:
    recent = RecentIds(capacity=3)
    for request_id in ("a", "b", "c"):
        recent.add(request_id)
    assert recent.seen("a")  # a is now the most recent
    recent.add("d")  # evicts b
    assert "b" not in recent
    assert recent.seen("a")
    assert recent.seen("c")
    assert recent.seen("d")
    assert not recent.seen("b")
    assert len(recent) == 3


def test_recent_ids_adding_twice_keeps_one_entry() -> None:
    recent = RecentIds(capacity=2)
    recent.add("x")
    recent.add("x")
    recent.add("y")
    assert len(recent) == 2
    assert "x" in recent


def test_recent_ids_need_a_positive_capacity() -> None:
    with pytest.raises(ValueError, match="capacity"):
        RecentIds(capacity=0)
