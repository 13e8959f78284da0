"""Read a topic from its beginning to its current end: the one reader for every DSPex process.

Compacted topics (``programs``, ``variables``, ``jobs.status``, ``jobs.control``,
``routing``) are the system of record: a process or a command rebuilds its view
by reading one to its end. :func:`read_to_end` does that with a throwaway
consumer (no group offsets) and decodes each record; :func:`latest_by_key` folds
the result into the latest record per key. :func:`watermarks` and
:func:`end_offsets` give the offsets to start following from, for readers that go
on consuming live.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Iterator

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
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
    give_up = time.monotonic() + timeout_s
    while ends:
        if time.monotonic() > give_up:
            raise BrokerUnavailable(f"topic={topic}: not read to its end within {timeout_s}s")
        for message in consumer.consume(_BATCH, 0.2):
            if message.error() is None:
                yield message
        # positions, not offsets: a compacted partition has holes
        for tp in consumer.position([TopicPartition(topic, p) for p in ends]):
            if tp.offset >= ends[tp.partition]:
                del ends[tp.partition]


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


def end_offsets(consumer: Consumer, topic: str, timeout_s: float) -> list[TopicPartition]:
    """Every partition of ``topic`` at its current high-water mark."""
    marks = watermarks(consumer, topic, timeout_s)
    return [TopicPartition(topic, partition, high) for partition, (_, high) in marks.items()]


def watermarks(consumer: Consumer, topic: str, timeout_s: float) -> dict[int, tuple[int, int]]:
    """``{partition: (low, high)}`` for every partition of ``topic``.

    A topic created a moment ago may be unknown or leaderless for a while:
    transient errors are retried until ``timeout_s`` has passed.
    """
    give_up = time.monotonic() + timeout_s
    while True:
        try:
            return _watermarks(consumer, topic, timeout_s)
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
