"""Watching topics from a test: what was produced, waits that say what they wait for, offsets.

:class:`Tail` reads topics (by short name) with a consumer of its own, in a
thread, decoding every record, from their end as of its construction or from
their beginning. A test waits on what it has read with :meth:`Tail.wait`
(blocking: the agents run in other processes) or :meth:`Tail.until` (async:
the agents share the test's event loop), and :meth:`Tail.catch_up` /
:meth:`Tail.caught_up` wait until it has read every watched partition up to
its end offset as of the call — what a test does before it asserts that
something was *not* produced, instead of sleeping and hoping.

:func:`until` is the same poll for any condition; :func:`end_offsets`,
:func:`wait_for_records`, :func:`lag` and :func:`committed` read watermarks and
committed offsets: a consumer group that committed everything has handled it.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

from confluent_kafka import KafkaError, Message, TopicPartition

from dspex.streams import kafka
from dspex.streams.reader import StallGuard, watermarks
from dspex.streams.serde import make_serde
from dspex.streams.settings import Settings
from dspex.streams.tenants import tenant_of
from dspex.streams.topics import Topics

__all__ = ["OpenTail", "Tail", "committed", "end_offsets", "lag", "until", "wait_for_records"]

T = TypeVar("T")
Record = dict[str, Any]
Partition = tuple[str, int]
_POLL_S = 0.05
_METADATA_TIMEOUT_S = 10.0


class Tail:
    """Reads topics in a thread and keeps every record, decoded, per short topic name.

    ``records[short]`` holds ``(key, record)`` pairs in the order read; a record the
    serde cannot decode is kept as ``None`` (see :meth:`undecodable`), a consumer
    error in ``errors``; :meth:`messages` gives the messages themselves (bytes,
    headers, offsets). Close it (the ``tails`` fixture does) to stop the thread.
    """

    def __init__(
        self, settings: Settings, shorts: Iterable[str], *, from_beginning: bool = False
    ) -> None:
        self._settings = settings
        self._shorts = {physical(settings, s): s for s in shorts}
        self._serde = make_serde(settings)
        self.records: dict[str, list[tuple[bytes | None, Record | None]]] = {
            s: [] for s in self._shorts.values()
        }
        self._messages: dict[str, list[Message]] = {s: [] for s in self._shorts.values()}
        self.errors: list[KafkaError] = []
        self._lock = threading.Lock()
        self._consumer = kafka.consumer(settings, f"test-tail-{uuid.uuid4().hex}")
        self._start = _offsets(self._consumer, self._shorts, beginning=from_beginning)
        self._read_to = dict(self._start)
        assigned = [TopicPartition(t, p, o) for (t, p), o in self._start.items()]
        self._consumer.assign(assigned)
        # librdkafka may stop fetching a partition after a broker restart: restart it
        self._stalls = StallGuard(self._consumer, interval_s=5.0)
        self._stalls.assigned(assigned)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-tail", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        partitions = [TopicPartition(t, p) for t, p in self._start]
        while not self._stop.is_set():
            for message in self._consumer.consume(500, _POLL_S):
                self._keep(message)
            self._stalls.check()
            # positions, not last offsets + 1: transaction markers and compaction leave holes
            read = {
                (tp.topic, tp.partition): tp.offset for tp in self._consumer.position(partitions)
            }
            with self._lock:  # no position (-1001): nothing read past the start offset yet
                self._read_to.update({tp: o for tp, o in read.items() if o >= 0})

    def _keep(self, message: Message) -> None:
        error = message.error()
        if error is not None:
            with self._lock:
                self.errors.append(error)
            return
        topic = str(message.topic())
        try:
            record: Record | None = self._serde.decode(message.value() or b"", topic=topic).record
        except Exception:
            record = None
        with self._lock:
            self.records[self._shorts[topic]].append((message.key(), record))
            self._messages[self._shorts[topic]].append(message)

    def of(self, short: str) -> list[Record]:
        """The decoded records read so far from ``short``."""
        with self._lock:
            return [r for _, r in self.records[short] if r is not None]

    def messages(self, short: str) -> list[Message]:
        """The messages read so far from ``short``, as consumed."""
        with self._lock:
            return list(self._messages[short])

    def undecodable(self) -> int:
        """How many records read so far did not decode."""
        with self._lock:
            return sum(1 for pairs in self.records.values() for _, r in pairs if r is None)

    def wait(self, check: Callable[[Tail], T | None], timeout_s: float, what: str) -> T:
        """Poll (blocking) until ``check(self)`` is truthy and return it; fail naming ``what``."""
        deadline = time.monotonic() + timeout_s
        while not (result := check(self)):
            if time.monotonic() > deadline:
                raise AssertionError(self._timed_out(timeout_s, what))
            time.sleep(_POLL_S)
        return result

    async def until(self, check: Callable[[Tail], T | None], timeout_s: float, what: str) -> T:
        """:meth:`wait` without blocking the event loop."""
        deadline = time.monotonic() + timeout_s
        while not (result := check(self)):
            if time.monotonic() > deadline:
                raise AssertionError(self._timed_out(timeout_s, what))
            await asyncio.sleep(_POLL_S)
        return result

    def ends(self) -> dict[Partition, int]:
        """The end offset (high-water mark) of every watched partition, now."""
        return end_offsets_by_partition(self._settings, self._shorts)

    def has_read(self, ends: dict[Partition, int]) -> bool:
        """Whether every watched partition has been read up to ``ends``."""
        with self._lock:
            return all(self._read_to[tp] >= end for tp, end in ends.items())

    def catch_up(self, timeout_s: float = 30.0) -> None:
        """Block until everything on the watched topics now has been read."""
        ends = self.ends()
        self.wait(lambda t: t.has_read(ends), timeout_s, f"the end offsets {ends}")

    async def caught_up(self, timeout_s: float = 30.0) -> None:
        """:meth:`catch_up` without blocking the event loop."""
        ends = await asyncio.to_thread(self.ends)
        await self.until(lambda t: t.has_read(ends), timeout_s, f"the end offsets {ends}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._stalls.close()
        self._consumer.close()

    def _timed_out(self, timeout_s: float, what: str) -> str:
        with self._lock:
            counts = {s: len(r) for s, r in self.records.items()}
        return f"timed out after {timeout_s}s waiting for {what}: read {counts}"


def physical(settings: Settings, short: str) -> str:
    """The topic a short name means: a catalog topic, or a tenant's (``tenant.acme.requests``)."""
    prefix = settings.topics.prefix
    if tenant_of(prefix + short, prefix) is not None:
        return prefix + short
    return Topics(settings.topics).name(short)


class OpenTail(Protocol):
    """The ``tails`` fixture: opens a :class:`Tail` that is closed when the test ends."""

    def __call__(
        self,
        shorts: Iterable[str],
        *,
        settings: Settings | None = None,
        from_beginning: bool = False,
    ) -> Tail: ...


async def until(check: Callable[[], T | None], timeout_s: float, what: str) -> T:
    """Poll ``check`` on the event loop until it is truthy and return it; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(_POLL_S)
    return result


def end_offsets(settings: Settings, shorts: Iterable[str]) -> dict[str, int]:
    """Sum of the high-water marks of each topic: how many records it ever received."""
    topics = Topics(settings.topics)
    names = {topics.name(s): s for s in shorts}
    totals = dict.fromkeys(names.values(), 0)
    for (topic, _), end in end_offsets_by_partition(settings, names).items():
        totals[names[topic]] += end
    return totals


def end_offsets_by_partition(settings: Settings, names: Iterable[str]) -> dict[Partition, int]:
    """The high-water mark of every partition of the topics ``names`` (full names)."""
    consumer = kafka.consumer(settings, f"test-offsets-{uuid.uuid4().hex}")
    try:
        return _offsets(consumer, names, beginning=False)
    finally:
        consumer.close()


def lag(settings: Settings, group: str, shorts: Iterable[str]) -> int:
    """Records on ``shorts`` that consumer group ``group`` has not committed yet."""
    topics = Topics(settings.topics)
    ends = end_offsets_by_partition(settings, [topics.name(s) for s in shorts])
    consumer = kafka.consumer(settings, group)  # never subscribes: only reads the commits
    try:
        tps = [TopicPartition(t, p) for t, p in ends]
        committed = {
            (tp.topic, tp.partition): max(tp.offset, 0)
            for tp in consumer.committed(tps, timeout=_METADATA_TIMEOUT_S)
        }
    finally:
        consumer.close()
    return sum(end - committed[tp] for tp, end in ends.items())


async def committed(
    settings: Settings, group: str, shorts: Iterable[str], timeout_s: float = 30.0
) -> None:
    """Until ``group`` has committed every record on ``shorts`` (polled off the event loop)."""
    shorts = list(shorts)
    deadline = time.monotonic() + timeout_s
    while left := await asyncio.to_thread(lag, settings, group, shorts):
        if time.monotonic() > deadline:
            raise AssertionError(f"group {group}: {left} record(s) uncommitted after {timeout_s}s")
        await asyncio.sleep(0.1)


def wait_for_records(settings: Settings, topic: str, count: int, timeout_s: float) -> None:
    """Until ``topic`` (any topic, by its full name) holds at least ``count`` records."""
    consumer = kafka.consumer(settings, f"test-{uuid.uuid4().hex}")
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            marks = watermarks(consumer, topic, _METADATA_TIMEOUT_S)
            total = sum(high - low for low, high in marks.values())
            if total >= count:
                return
            assert time.monotonic() < deadline, f"{topic}: {total} records after {timeout_s}s"
            time.sleep(0.2)
    finally:
        consumer.close()


def _offsets(consumer: Any, names: Iterable[str], *, beginning: bool) -> dict[Partition, int]:
    # watermarks retries the leaderless moments of a topic created just before
    found = {}
    for topic in names:
        for partition, (low, high) in watermarks(consumer, topic, _METADATA_TIMEOUT_S).items():
            found[(topic, partition)] = low if beginning else high
    return found
