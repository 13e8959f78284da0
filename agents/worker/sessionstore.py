"""A worker's hot sessions: a bounded LRU in front of the ``sessions`` topic.

A session a worker has not served lately (a cold start, a partition taken over
from a crashed worker, an LRU eviction) is read from the topic: its partition
(:func:`~dspex.streams.sessions.session_partition`) is scanned to its current end
by one consumer of the worker's own, and concurrent misses on one partition share
a scan. Because the scan reads to the high-water mark and a worker counts a turn
done only once its state write is acknowledged, a worker taking over a session
sees every turn its predecessor finished.

A worker's cached copy is right only while it is the session's only writer. A
:class:`Invalidator` therefore follows the topic from its end and drops a cached
session whenever someone else writes it: another worker (the partition moved and
came back), ``dspex sessions end`` or the sessions agent's expiry tombstone.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from confluent_kafka import Consumer, Message, TopicPartition

from dspex.schemas.records import Record
from dspex.streams import kafka
from dspex.streams.reader import StallGuard, end_offsets
from dspex.streams.serde import Serde
from dspex.streams.sessions import (
    WRITER_HEADER,
    Found,
    header,
    scan_partition,
    session_partition,
)
from dspex.streams.settings import Settings

logger = logging.getLogger(__name__)

READ_TIMEOUT_S = 30.0
SETTLE_TIMEOUT_S = 5.0
SETTLE_POLL_S = 0.005


class SessionCache:
    """Session states by id, least recently used dropped past ``capacity``."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._states: OrderedDict[str, Record] = OrderedDict()

    def get(self, session_id: str) -> Record | None:
        state = self._states.get(session_id)
        if state is not None:
            self._states.move_to_end(session_id)
        return state

    def put(self, session_id: str, state: Record) -> None:
        self._states[session_id] = state
        self._states.move_to_end(session_id)
        while len(self._states) > self._capacity:
            self._states.popitem(last=False)

    def drop(self, session_id: str) -> None:
        self._states.pop(session_id, None)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._states

    def __len__(self) -> int:
        return len(self._states)


class Loader(Protocol):
    """Reads a cold session from the topic (:class:`SessionLoader`; tests give a fake)."""

    async def load(self, session_id: str) -> Found: ...

    def close(self) -> None: ...


class SessionLoader:
    """Reads sessions from the topic on a cache miss; one scan serves every miss of a partition."""

    def __init__(self, settings: Settings, serde: Serde, topic: str, partitions: int) -> None:
        self._settings = settings
        self._serde = serde
        self._topic = topic
        self._partitions = partitions
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="sessions-load")
        self._consumer: Consumer | None = None
        self._waiting: dict[int, dict[str, list[asyncio.Future[Found]]]] = {}
        self._scanning: dict[int, asyncio.Task[None]] = {}
        self.scans = 0
        """Partition scans done so far (tests and logs)."""

    async def load(self, session_id: str) -> Found:
        """The session's latest record on the topic (``Found()`` when there is none)."""
        partition = session_partition(session_id, self._partitions)
        found: asyncio.Future[Found] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(partition, {}).setdefault(session_id, []).append(found)
        if partition not in self._scanning:
            self._scanning[partition] = asyncio.create_task(
                self._scan_while_waiting(partition), name=f"sessions-{partition}"
            )
        return await found

    async def _scan_while_waiting(self, partition: int) -> None:
        try:
            while self._waiting.get(partition):
                wanted = self._waiting.pop(partition)
                loop = asyncio.get_running_loop()
                try:
                    found = await loop.run_in_executor(
                        self._thread, self._scan, partition, list(wanted)
                    )
                except Exception as exc:
                    for futures in wanted.values():
                        for future in futures:
                            if not future.done():
                                future.set_exception(exc)
                    continue
                for session_id, futures in wanted.items():
                    for future in futures:
                        if not future.done():
                            future.set_result(found.get(session_id, Found()))
        finally:
            del self._scanning[partition]

    def _scan(self, partition: int, wanted: list[str]) -> dict[str, Found]:
        if self._consumer is None:
            group = f"dspex-sessions-load-{uuid.uuid4().hex}"
            self._consumer = kafka.consumer(self._settings, group)
        self.scans += 1
        return scan_partition(
            self._consumer, self._serde, self._topic, partition, wanted, READ_TIMEOUT_S
        )

    def close(self) -> None:
        def close_consumer() -> None:
            if self._consumer is not None:
                self._consumer.close()

        self._thread.submit(close_consumer).result(timeout=READ_TIMEOUT_S)
        self._thread.shutdown(wait=False)


class Invalidator:
    """Follows the sessions topic from its end and drops cached sessions that others wrote.

    What it has read is handed to the event loop in one callback per batch (the drops,
    then the new positions), so :meth:`settle` — "has everything on this partition up to
    its current end been read?" — is true only once those drops have happened. The
    worker settles before it trusts a cached session: a tombstone that ``dspex sessions
    end`` had written before the turn was consumed is never missed.
    """

    def __init__(
        self, settings: Settings, topic: str, writer: str, drop: Callable[[str], None]
    ) -> None:
        self._settings = settings
        self._topic = topic
        self._writer = writer
        self._drop = drop
        self._positions: dict[int, int] = {}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="sessions-follow", daemon=True)
        self._offsets = ThreadPoolExecutor(1, thread_name_prefix="sessions-offsets")
        self._offsets_consumer: Consumer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop, timeout_s: float = READ_TIMEOUT_S) -> None:
        """Start following; returns once positioned at the topic's end (or ``timeout_s``)."""
        self._loop = loop
        self._thread.start()
        if not self._ready.wait(timeout_s):
            logger.warning("sessions follower not positioned within %.0fs", timeout_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

        def close() -> None:
            if self._offsets_consumer is not None:
                self._offsets_consumer.close()

        self._offsets.submit(close).result(timeout=READ_TIMEOUT_S)
        self._offsets.shutdown(wait=False)

    async def settle(self, partition: int, timeout_s: float = SETTLE_TIMEOUT_S) -> bool:
        """Wait until the follower has applied everything on ``partition`` up to its end now.

        False (and a warning) when that takes longer than ``timeout_s``: the caller then
        goes on with what it has.
        """
        loop = asyncio.get_running_loop()
        high = await loop.run_in_executor(self._offsets, self._high, partition)
        give_up = loop.time() + timeout_s
        while self._positions.get(partition, -1) < high:
            if loop.time() > give_up or not self._thread.is_alive():
                logger.warning("sessions follower behind partition=%d end=%d", partition, high)
                return False
            await asyncio.sleep(SETTLE_POLL_S)
        return True

    def _high(self, partition: int) -> int:
        if self._offsets_consumer is None:
            group = f"dspex-sessions-offsets-{uuid.uuid4().hex}"
            self._offsets_consumer = kafka.consumer(self._settings, group)
        tp = TopicPartition(self._topic, partition)
        _, high = self._offsets_consumer.get_watermark_offsets(
            tp, timeout=READ_TIMEOUT_S, cached=False
        )
        return int(high)

    def _follow(self) -> None:
        group = f"dspex-sessions-follow-{uuid.uuid4().hex}"
        consumer = kafka.consumer(self._settings, group, **{"fetch.wait.max.ms": 20})
        stalls: StallGuard | None = None
        try:
            start = end_offsets(consumer, self._topic, READ_TIMEOUT_S)
            consumer.assign(start)
            stalls = StallGuard(consumer)  # librdkafka may stop fetching after a broker restart
            stalls.assigned(start)
            self._hand_over([], {tp.partition: tp.offset for tp in start})
            self._ready.set()
            while not self._stop.is_set():
                # the first record (or 0.1 s), then whatever else is fetched already
                messages = consumer.consume(1, 0.1)
                messages += consumer.consume(499, 0) if messages else []
                others = [
                    (m.key() or b"").decode("utf-8", "replace")
                    for m in messages
                    if m.error() is None and not self._own(m)
                ]
                stalls.check()
                positions = {tp.partition: tp.offset for tp in consumer.position(start)}
                self._hand_over(others, positions)
        except Exception:
            logger.exception("sessions follower stopped topic=%s", self._topic)
        finally:
            self._ready.set()
            if stalls is not None:
                stalls.close()
            consumer.close()

    def _hand_over(self, dropped: list[str], positions: dict[int, int]) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._apply, dropped, positions)

    def _apply(self, dropped: list[str], positions: dict[int, int]) -> None:
        for session_id in dropped:
            self._drop(session_id)
        for partition, offset in positions.items():
            if offset >= 0:  # no position yet: keep the last known one
                self._positions[partition] = max(offset, self._positions.get(partition, -1))

    def _own(self, message: Message) -> bool:
        return header(message, WRITER_HEADER) == self._writer
