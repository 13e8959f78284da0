"""Delivery bookkeeping for a worker: which offsets may be committed, which requests were answered.

A worker runs many messages of one partition at once and they finish in any
order. :class:`OffsetTracker` says how far each partition may be committed
without ever skipping a message that is still running; :class:`RecentIds`
remembers recently answered request ids so a redelivered request is not
answered twice. Both are pure: no Kafka, no clock, no I/O.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

TopicPartition = tuple[str, int]
"""A partition as ``(topic, partition)``: hashable and cheap, unlike confluent's TopicPartition."""


@dataclass
class _Partition:
    """Offsets of one partition: the unfinished ones, and the highest finished one."""

    pending: set[int] = field(default_factory=set)
    heap: list[int] = field(default_factory=list)  # pending offsets; finished ones removed lazily
    highest_finished: int | None = None

    def lowest_pending(self) -> int | None:
        while self.heap and self.heap[0] not in self.pending:
            heapq.heappop(self.heap)
        return self.heap[0] if self.heap else None

    def next_offset(self) -> int | None:
        """The offset to commit: the lowest unfinished one, else one past the highest finished."""
        if self.highest_finished is None:
            return None
        lowest = self.lowest_pending()
        return lowest if lowest is not None else self.highest_finished + 1


class OffsetTracker:
    """Per-partition commit positions under out-of-order completion.

    ``committable()[tp]`` is one past the highest offset ``o`` such that every
    offset started at or below ``o`` has finished — so a commit never passes a
    message that is still running. Kafka delivers a partition in order, so an
    offset never started below a started one does not exist (compacted away,
    or a transaction marker) and is safe to commit past.
    """

    def __init__(self) -> None:
        self._partitions: dict[TopicPartition, _Partition] = {}
        self._committed: dict[TopicPartition, int] = {}

    def started(self, tp: TopicPartition, offset: int) -> None:
        """``offset`` of ``tp`` was received and is now running."""
        part = self._partitions.setdefault(tp, _Partition())
        if offset not in part.pending:
            part.pending.add(offset)
            heapq.heappush(part.heap, offset)

    def finished(self, tp: TopicPartition, offset: int) -> bool:
        """``offset`` of ``tp`` is done; False (and no change) when it was not running."""
        part = self._partitions.get(tp)
        if part is None or offset not in part.pending:
            return False
        part.pending.discard(offset)
        if part.highest_finished is None or offset > part.highest_finished:
            part.highest_finished = offset
        return True

    def is_running(self, tp: TopicPartition, offset: int) -> bool:
        """Whether ``offset`` of ``tp`` was started and has not finished."""
        part = self._partitions.get(tp)
        return part is not None and offset in part.pending

    def committable(self) -> dict[TopicPartition, int]:
        """Next offset to commit for every partition where at least one message finished."""
        positions = {tp: part.next_offset() for tp, part in self._partitions.items()}
        return {tp: offset for tp, offset in positions.items() if offset is not None}

    def uncommitted(self) -> dict[TopicPartition, int]:
        """The subset of :meth:`committable` that moved since the last :meth:`committed`."""
        return {
            tp: offset
            for tp, offset in self.committable().items()
            if self._committed.get(tp) != offset
        }

    def committed(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Record that ``offsets`` were committed to the group."""
        for tp, offset in offsets.items():
            if tp in self._partitions:
                self._committed[tp] = offset

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Drop everything known about ``partitions`` (revoked or lost)."""
        for tp in partitions:
            self._partitions.pop(tp, None)
            self._committed.pop(tp, None)

    def in_flight(self, partitions: Iterable[TopicPartition] | None = None) -> int:
        """How many started offsets have not finished (in ``partitions``, default all)."""
        chosen = self._partitions if partitions is None else partitions
        return sum(len(self._partitions[tp].pending) for tp in chosen if tp in self._partitions)

    def partitions(self) -> list[TopicPartition]:
        """Every partition the tracker knows about."""
        return list(self._partitions)


class RecentIds:
    """A bounded LRU set of request ids answered recently, for dedupe on redelivery.

    Bounded because a worker runs forever; a redelivery comes soon after the
    original (a rebalance, a restart), so the most recent ids are the ones
    that matter.
    """

    def __init__(self, capacity: int = 100_000) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, request_id: str) -> None:
        """Remember ``request_id``, evicting the least recently seen id when full."""
        self._ids[request_id] = None
        self._ids.move_to_end(request_id)
        if len(self._ids) > self._capacity:
            self._ids.popitem(last=False)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._ids

    def seen(self, request_id: str) -> bool:
        """Whether ``request_id`` was answered recently; a hit counts as a use."""
        if request_id not in self._ids:
            return False
        self._ids.move_to_end(request_id)
        return True

    def __len__(self) -> int:
        return len(self._ids)
