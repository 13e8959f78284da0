"""Read a topic from its beginning to its current end: the one reader for every DSPex process.

Compacted topics (``programs``, ``variables``, ``jobs.status``, ``jobs.control``,
``routing``) are the system of record: a process or a command rebuilds its view
by reading one to its end. :func:`read_to_end` does that with a throwaway
consumer (no group offsets) and decodes each record; :func:`latest_by_key` folds
the result into the latest record per key. :func:`watermarks` and
:func:`end_offsets` give the offsets to start following from, for readers that go
on consuming live. :class:`TopicFollower` reads some topics from a point in time
and others whole, then follows them live (``dspex top`` and the web dashboard).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from dspex.schemas.records import Record
from dspex.streams import kafka
from dspex.streams.errors import BrokerUnavailable, ConfigError, DSPexError
from dspex.streams.serde import Serde
from dspex.streams.settings import Settings

logger = logging.getLogger(__name__)
T = TypeVar("T")

_BATCH = 500


def read_to_end(
    settings: Settings,
    serde: Serde,
    topic: str,
    schema: str,
    *,
    key: str | None = None,
    timeout_s: float = 30.0,
) -> list[tuple[str, Record | None]]:
    """Every ``(key, record)`` of ``topic`` up to its current end (``None``: a tombstone).

    ``key`` keeps only that key's records. A record that does not decode as
    ``schema`` is logged with its coordinates and skipped, as the agents skip it.
    """
    consumer = kafka.consumer(settings, f"dspex-read-{uuid.uuid4().hex}")
    wanted = key.encode("utf-8") if key is not None else None
    found: list[tuple[str, Record | None]] = []
    try:
        for message in scan_to_end(consumer, topic, timeout_s):
            if wanted is not None and message.key() != wanted:
                continue
            try:
                found.append((_key(message), _decode(serde, schema, message)))
            except DSPexError as exc:
                logger.warning("skipping undecodable %s %s: %s", schema, _where(message), exc)
    except KafkaException as exc:
        raise BrokerUnavailable(f"topic={topic}: cannot read: {exc}") from exc
    finally:
        consumer.close()
    return found


def latest_by_key(records: Iterable[tuple[str, Record | None]]) -> dict[str, Record]:
    """The last record per key, a tombstone removing the key."""
    latest: dict[str, Record] = {}
    for key, record in records:
        if record is None:
            latest.pop(key, None)
        else:
            latest[key] = record
    return latest


def scan_to_end(consumer: Consumer, topic: str, timeout_s: float) -> Iterator[Message]:
    """Every record of ``topic`` from the beginning up to the end offsets seen at the start.

    Raises BrokerUnavailable when that end is not reached within ``timeout_s``.
    """
    marks = watermarks(consumer, topic, timeout_s)
    ends = {partition: high for partition, (low, high) in marks.items() if high > low}
    yield from scan_range(consumer, topic, dict.fromkeys(ends, OFFSET_BEGINNING), ends, timeout_s)


def scan_range(
    consumer: Consumer,
    topic: str,
    starts: Mapping[int, int],
    ends: Mapping[int, int],
    timeout_s: float,
) -> Iterator[Message]:
    """Every record of ``topic`` from ``starts`` (offsets per partition) up to ``ends``.

    A partition whose start is at or past its end is not read. Raises BrokerUnavailable
    when the ends are not reached within ``timeout_s``.
    """
    todo = {p: end for p, end in ends.items() if p in starts and (starts[p] < 0 or starts[p] < end)}
    consumer.assign([TopicPartition(topic, p, starts[p]) for p in todo])
    give_up = time.monotonic() + timeout_s
    while todo:
        if time.monotonic() > give_up:
            raise BrokerUnavailable(f"topic={topic}: not read to its end within {timeout_s}s")
        for message in consumer.consume(_BATCH, 0.2):
            if message.error() is None:
                yield message
        # positions, not offsets: a compacted partition has holes
        for tp in consumer.position([TopicPartition(topic, p) for p in todo]):
            if tp.offset >= todo[tp.partition]:
                del todo[tp.partition]


def group_lag(settings: Settings, group: str, topic: str, timeout_s: float = 10.0) -> int:
    """Messages of ``topic`` that consumer group ``group`` has not committed yet.

    Reads the group's committed offsets through a consumer of that group id that
    never joins it (``committed()``), and the partitions' watermarks. A partition
    the group never committed counts from its earliest offset. Not the Admin API's
    ``list_consumer_group_offsets``: that path crashed long-running processes with
    a SIGSEGV in librdkafka when the broker came back (librdkafka #5040). The
    consumer lives for this one call.
    """
    consumer = kafka.consumer(settings, group)
    try:
        marks = watermarks(consumer, topic, timeout_s)
        tps = [TopicPartition(topic, partition) for partition in marks]
        committed = {tp.partition: tp.offset for tp in consumer.committed(tps, timeout=timeout_s)}
    except KafkaException as exc:
        raise BrokerUnavailable(f"group={group} topic={topic}: cannot read offsets: {exc}") from exc
    finally:
        consumer.close()
    return sum(
        max(0, high - max(committed.get(partition, -1), low))
        for partition, (low, high) in marks.items()
    )


class StallGuard:
    """Restarts the fetch of an assigned partition that stopped fetching for good.

    librdkafka sometimes leaves a partition of an ``assign()``-ed consumer unfetched
    after its broker restarts (librdkafka issue 5153; here about one restart in eight):
    no error is reported, the position stays where it was while the log grows, and
    nothing arrives again until the consumer is replaced. That stopped the client's
    replies after a 15 s broker outage while every answer was on the topic.

    Every ``interval_s`` while ``wanted()``, the guard notes each assigned partition's
    position; for those that have not moved since the previous check it asks the
    broker for their ends, in ONE ListOffsets request, on a thread of its own: the
    broker answers a connection's requests in order, so each request waits behind the
    consumer's parked fetch (up to ``fetch.wait.max.ms``), and asking per partition on
    the polling thread stopped an idle 18-partition reader for ~9 s in every 10
    (program versions reached routers seconds late). A partition still at the asked
    position and behind its end is sought to that position again, which restarts its
    fetcher (no record is skipped or repeated); a partition is restarted at one
    position once, and again only after ``RESTART_AGAIN_CHECKS`` checks. A healthy
    partition behind its end moves between two checks and is never touched. The end
    is the high-water mark for a read-uncommitted consumer and the last stable offset
    for a read-committed one (librdkafka asks with the consumer's isolation level),
    and positions count transaction markers. Call :meth:`check` from the thread that
    polls the consumer, and :meth:`close` before closing the consumer.
    """

    def __init__(
        self,
        consumer: Consumer,
        *,
        interval_s: float = 10.0,
        wanted: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = time.monotonic,
        run: Callable[[Callable[[], list[TopicPartition]]], Future[list[TopicPartition]]]
        | None = None,
    ) -> None:
        """``run`` runs the end-offsets request (default: a shared background thread)."""
        self._consumer = consumer
        self._interval_s = interval_s
        self._wanted = wanted
        self._clock = clock
        self._run = run or _stall_checks().submit
        self._starts: dict[tuple[str, int], int] = {}
        self._last: dict[tuple[str, int], int] = {}
        self._restarted: dict[tuple[str, int], tuple[int, float]] = {}  # position, when
        self._asked: dict[tuple[str, int], int] = {}  # positions the pending request is for
        self._pending: Future[list[TopicPartition]] | None = None
        self._due = clock() + interval_s
        self.restarts = 0
        """Partition fetches restarted so far (logs and tests)."""

    def assigned(self, partitions: Iterable[TopicPartition]) -> None:
        """Note the offsets ``partitions`` were assigned at (positions before any record)."""
        for tp in partitions:
            self._starts[(tp.topic, tp.partition)] = tp.offset

    def check(self) -> list[tuple[str, int]]:
        """Ask for the ends of unmoved partitions when a check is due; restart those an
        answered request found stalled. Returns the partitions restarted now."""
        now = self._clock()
        if now >= self._due:
            self._due = now + self._interval_s
            if not self._wanted():
                self._last.clear()  # positions only compare across consecutive checks
            else:
                self._ask()
        if self._pending is None or not self._pending.done():
            return []
        pending, self._pending = self._pending, None
        try:
            ends = pending.result()
        except KafkaException as exc:  # the broker is away: nothing to judge now
            logger.debug("stall check skipped error=%s", exc)
            return []
        return self._restart(self._stalled(ends))

    def close(self) -> None:
        """Wait for a request still running (the consumer must outlive it)."""
        if self._pending is not None:
            with contextlib.suppress(Exception):
                self._pending.result(STALL_CHECK_TIMEOUT_S + 1.0)
            self._pending = None

    def _positions(self, tps: list[TopicPartition]) -> dict[tuple[str, int], int]:
        found = {}
        for tp in self._consumer.position(tps):
            key = (tp.topic, tp.partition)
            position = tp.offset if tp.offset >= 0 else self._starts.get(key, -1)
            if position >= 0:
                found[key] = position
        return found

    def _ask(self) -> None:
        last, self._last = self._last, self._positions(self._consumer.assignment())
        unmoved = {key: pos for key, pos in self._last.items() if last.get(key) == pos}
        if not unmoved or self._pending is not None:
            return
        self._asked = unmoved
        # a timestamp of -1 asks for the latest offset: one request for all of them
        wanted = [TopicPartition(t, p, -1) for t, p in unmoved]
        consumer = self._consumer
        self._pending = self._run(
            lambda: consumer.offsets_for_times(wanted, timeout=STALL_CHECK_TIMEOUT_S)
        )

    def _stalled(self, ends: list[TopicPartition]) -> list[TopicPartition]:
        now = self._clock()
        asked = [TopicPartition(t, p) for t, p in self._asked]
        still = self._positions(asked) if asked else {}
        stalled: list[TopicPartition] = []
        for end in ends:
            key = (end.topic, end.partition)
            position = self._asked.get(key)
            if position is None or still.get(key) != position or end.offset <= position:
                continue  # moved meanwhile, or at its end
            # once per position, then again only after a while: a read-committed
            # position does not move past aborted records nobody receives, and a seek
            # every check would make the fetcher read them again and again
            before = self._restarted.get(key)
            if before is not None and before[0] == position:
                if now - before[1] < RESTART_AGAIN_CHECKS * self._interval_s:
                    continue
            self._restarted[key] = (position, now)
            stalled.append(TopicPartition(end.topic, end.partition, position))
        return stalled

    def _restart(self, stalled: list[TopicPartition]) -> list[tuple[str, int]]:
        for tp in stalled:
            logger.warning(
                "fetch stalled topic=%s partition=%d position=%d: restarting it",
                tp.topic,
                tp.partition,
                tp.offset,
            )
            self._consumer.seek(tp)
            self.restarts += 1
        return [(tp.topic, tp.partition) for tp in stalled]


@functools.cache
def _stall_checks() -> ThreadPoolExecutor:
    """The threads every StallGuard of this process asks for end offsets on."""
    return ThreadPoolExecutor(2, thread_name_prefix="dspex-stall-check")


STALL_CHECK_TIMEOUT_S = 2.0
RESTART_AGAIN_CHECKS = 6


Apply = Callable[[str, str, Record | None], None]
"""What a follower calls for each record: topic, key and the decoded record (None: a tombstone)."""


class TopicFollower:
    """A group-less consumer: some topics from a point in time, others whole, then live.

    ``starts`` maps each topic to the epoch milliseconds to read it from, or
    ``None`` to read it from its beginning (a compacted topic). No consumer group
    is joined and nothing is committed: any number of viewers can follow. A record
    that does not decode is reported to ``on_skip`` and skipped.
    """

    def __init__(
        self,
        settings: Settings,
        serde: Serde,
        starts: Mapping[str, int | None],
        *,
        on_skip: Callable[[str], None] = lambda line: None,
        timeout_s: float = 10.0,
    ) -> None:
        self.serde = serde
        self.on_skip = on_skip
        self.timeout_s = timeout_s
        self.consumer: Consumer = kafka.consumer(settings, f"dspex-follow-{uuid.uuid4().hex}")
        # librdkafka may stop fetching a partition after a broker restart: restart it
        self.stalls = StallGuard(self.consumer)
        self.pending = self._assign(starts)

    def _assign(self, starts: Mapping[str, int | None]) -> dict[tuple[str, int], int]:
        """Assign every partition; returns the end offsets to catch up with."""
        assigned: list[TopicPartition] = []
        ends = {}
        for topic, since_ms in starts.items():
            marks = watermarks(self.consumer, topic, self.timeout_s)  # waits out new topics
            if not marks:
                raise ConfigError(f"topic={topic}: not found; run `dspex topics create`")
            firsts = self._firsts(topic, since_ms, marks)
            for partition, (low, high) in marks.items():
                start = firsts.get(partition, low)
                if 0 <= start < high:
                    ends[(topic, partition)] = high
                else:
                    # nothing recent (or empty): what arrives from now on. The high-water
                    # mark, not OFFSET_END: that is resolved at the first fetch, later, and
                    # a record produced in between would be skipped.
                    start = high
                assigned.append(TopicPartition(topic, partition, start))
        self.consumer.assign(assigned)
        self.stalls.assigned(assigned)
        return ends

    def _firsts(
        self, topic: str, since_ms: int | None, marks: Mapping[int, tuple[int, int]]
    ) -> dict[int, int]:
        """Each partition's first offset at or after ``since_ms`` (-1: none); {} = beginning."""
        if since_ms is None:
            return {}
        wanted = [TopicPartition(topic, p, since_ms) for p in marks]
        found: list[TopicPartition] = _retrying(
            topic,
            self.timeout_s,
            lambda: self.consumer.offsets_for_times(wanted, timeout=self.timeout_s),
        )
        return {tp.partition: tp.offset for tp in found}

    def poll(self, seconds: float, apply: Apply) -> None:
        """Apply every record that arrives within ``seconds``."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            for message in self.consumer.consume(_BATCH, min(left, 0.2)):
                if message.error() is None:
                    self._apply(message, apply)
            self.stalls.check()

    def catch_up(self, apply: Apply, timeout_s: float | None = None) -> bool:
        """Read until the end offsets seen at start (or ``timeout_s``); True when there."""
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while self.pending and time.monotonic() < deadline:
            self.poll(0.2, apply)
        return not self.pending

    def _apply(self, message: Message, apply: Apply) -> None:
        topic, partition = str(message.topic()), int(message.partition() or 0)
        if self.pending.get((topic, partition), 0) <= int(message.offset() or 0) + 1:
            self.pending.pop((topic, partition), None)
        value = message.value()
        try:
            record = self.serde.decode(value, topic=topic).record if value else None
        except DSPexError as exc:
            self.on_skip(f"skipped {_where(message)}: {exc}")
            return
        apply(topic, _key(message), record)

    def close(self) -> None:
        self.stalls.close()
        self.consumer.close()


def end_offsets(consumer: Consumer, topic: str, timeout_s: float) -> list[TopicPartition]:
    """Every partition of ``topic`` at its current high-water mark."""
    marks = watermarks(consumer, topic, timeout_s)
    return [TopicPartition(topic, partition, high) for partition, (_, high) in marks.items()]


def watermarks(consumer: Consumer, topic: str, timeout_s: float) -> dict[int, tuple[int, int]]:
    """``{partition: (low, high)}`` for every partition of ``topic``.

    A topic created a moment ago may be unknown or leaderless for a while:
    transient errors are retried until ``timeout_s`` has passed.
    """
    return _retrying(topic, timeout_s, lambda: _watermarks(consumer, topic, timeout_s))


def _retrying(topic: str, timeout_s: float, call: Callable[[], T]) -> T:
    """``call()``, again while the broker's error is transient, until ``timeout_s``."""
    give_up = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            code = error.code() if isinstance(error, KafkaError) else None
            if code not in _TRANSIENT or time.monotonic() > give_up:
                raise _offsets_error(topic, code, exc) from exc
            time.sleep(0.2)


def _key(message: Message) -> str:
    return (message.key() or b"").decode("utf-8", "replace")


def _where(message: Message) -> str:
    return f"topic={message.topic()} partition={message.partition()} offset={message.offset()}"


def _decode(serde: Serde, schema: str, message: Message) -> Record | None:
    value = message.value()
    if not value:  # a tombstone
        return None
    return serde.decode(value, topic=message.topic() or "", expect=schema).record


def _offsets_error(topic: str, code: int | None, exc: KafkaException) -> DSPexError:
    if code == KafkaError.UNKNOWN_TOPIC_OR_PART:
        return ConfigError(f"topic {topic} does not exist: create it first")
    refused = kafka.explain(exc)
    if isinstance(refused, DSPexError):  # a wrong password, an untrusted certificate, an ACL...
        return refused
    error = exc.args[0] if exc.args else None
    cause = error.str() if isinstance(error, KafkaError) else str(exc)
    return BrokerUnavailable(f"topic={topic}: cannot read offsets: {cause}")


def _watermarks(consumer: Consumer, topic: str, timeout_s: float) -> dict[int, tuple[int, int]]:
    metadata = consumer.list_topics(topic, timeout=timeout_s).topics[topic]
    if metadata.error is not None:
        raise KafkaException(metadata.error)
    marks: dict[int, tuple[int, int]] = {}
    for partition in sorted(metadata.partitions):
        found = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout_s)
        if found is None:
            raise BrokerUnavailable(
                f"topic={topic} partition={partition}: no offsets in {timeout_s}s"
            )
        marks[partition] = (found[0], found[1])
    return marks


_TRANSIENT = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
    }
)
