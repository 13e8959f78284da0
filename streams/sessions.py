"""Session state on the compacted ``sessions`` topic: where a session lives, reading it, ending it.

One ``SessionState`` per session id (the key), always on partition
:func:`session_partition` — chosen by DSPex, not by a client's partitioner, so
that a worker, the sessions agent and ``dspex sessions`` all find, overwrite and
tombstone the same partition. A tombstone carries the header
:data:`ENDED_HEADER` (``expired`` or ``ended``): while the broker keeps it
(``delete.retention.ms``, a day), a returning session is told it expired.
Everything here is shared by the worker (``dspex.agents.worker.sessions``), the
sessions agent and the CLI/client; docs/sessions.md has the guarantees.
"""

from __future__ import annotations

import logging
import time
import uuid
import zlib
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import cast

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from dspex.schemas.records import Record
from dspex.streams import kafka
from dspex.streams.errors import BrokerUnavailable, DSPexError, InvalidRequest
from dspex.streams.reader import latest_by_key, read_to_end
from dspex.streams.serde import Serde
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics

__all__ = [
    "ENDED_HEADER",
    "WRITER_HEADER",
    "Found",
    "end_session",
    "find_session",
    "header",
    "list_sessions",
    "scan_partition",
    "session_partition",
    "session_variable_keys",
]

ENDED_HEADER = "dspex-session-ended"
"""On a tombstone: why the session ended (``expired`` or ``ended``)."""
WRITER_HEADER = "dspex-writer"
"""On every sessions record: who wrote it (a worker id, ``sweeper``, ``cli``)."""
SCHEMA = "SessionState"
logger = logging.getLogger(__name__)


def session_partition(session_id: str, partitions: int) -> int:
    """The ``sessions`` partition of ``session_id``: CRC-32 of its UTF-8 bytes, modulo."""
    return zlib.crc32(session_id.encode("utf-8")) % partitions


@dataclass(frozen=True)
class Found:
    """The latest record of one session on the topic.

    ``state`` None with ``ended`` set: a tombstone (why it ended); both None: never seen
    (or the tombstone was compacted away).
    """

    state: Record | None = None
    ended: str | None = None
    offset: int = -1


def scan_partition(
    consumer: Consumer,
    serde: Serde,
    topic: str,
    partition: int,
    wanted: Collection[str],
    timeout_s: float = 30.0,
) -> dict[str, Found]:
    """The latest record of each ``wanted`` session in one partition, read to its current end.

    Sessions not on the partition are absent from the answer. A record that does not
    decode is logged and skipped: one bad record must not hide a session's older state.
    """
    keys = {key.encode("utf-8"): key for key in wanted}
    found: dict[str, Found] = {}
    for message in _partition_to_end(consumer, topic, partition, timeout_s):
        key = keys.get(message.key() or b"")
        if key is None:
            continue
        value = message.value()
        if not value:
            ended = header(message, ENDED_HEADER) or "ended"
            found[key] = Found(None, ended, message.offset() or -1)
            continue
        try:
            state = serde.decode(value, topic=topic, expect=SCHEMA).record
        except DSPexError as exc:  # undecodable: the session keeps what it had before
            logger.warning("skipping undecodable session %s: %s", _where(message), exc)
            continue
        found[key] = Found(state, None, message.offset() or -1)
    return found


def _partition_to_end(
    consumer: Consumer, topic: str, partition: int, timeout_s: float
) -> Iterator[Message]:
    tp = TopicPartition(topic, partition)
    try:
        low, high = consumer.get_watermark_offsets(tp, timeout=timeout_s)
    except KafkaException as exc:
        raise BrokerUnavailable(f"topic={topic} partition={partition}: no offsets: {exc}") from exc
    if high <= low:
        return
    consumer.assign([TopicPartition(topic, partition, low)])
    give_up = time.monotonic() + timeout_s
    try:
        while True:
            if time.monotonic() > give_up:
                raise BrokerUnavailable(
                    f"topic={topic} partition={partition}: not read to {high} in {timeout_s}s"
                )
            for message in consumer.consume(500, 0.2):
                if message.error() is None:
                    yield message
            # the position, not the last offset: a compacted partition has holes
            if consumer.position([tp])[0].offset >= high:
                return
    finally:
        consumer.unassign()


def _where(message: Message) -> str:
    return f"topic={message.topic()} partition={message.partition()} offset={message.offset()}"


def header(message: Message, name: str) -> str | None:
    """A consumed record's header as text (None when absent)."""
    # a consumed message's headers are a list of (key, value) pairs; the stubs allow more
    pairs = cast("list[tuple[str, str | bytes | None]]", message.headers() or [])
    for key, value in pairs:
        if key == name and value is not None:
            return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return None


def find_session(settings: Settings, serde: Serde, session_id: str) -> Found:
    """The latest record of one session (a throwaway consumer; for the CLI and client)."""
    topics = Topics(settings.topics)
    partition = session_partition(session_id, topics.spec("sessions").partitions)
    consumer = kafka.consumer(settings, f"dspex-sessions-{uuid.uuid4().hex}")
    try:
        found = scan_partition(consumer, serde, topics.name("sessions"), partition, [session_id])
    finally:
        consumer.close()
    return found.get(session_id, Found())


def list_sessions(settings: Settings, serde: Serde) -> dict[str, Record]:
    """Every live session's latest state (tombstoned ones left out), by session id."""
    topic = Topics(settings.topics).name("sessions")
    return latest_by_key(read_to_end(settings, serde, topic, SCHEMA))


def session_variable_keys(settings: Settings, serde: Serde, session_id: str) -> list[str]:
    """The ``variables`` keys of the session's own variables (scope ``session``)."""
    topic = Topics(settings.topics).name("variables")
    latest = latest_by_key(read_to_end(settings, serde, topic, "VariableUpdate"))
    return sorted(
        key
        for key, record in latest.items()
        if record.get("scope") == "session" and record.get("scope_ref") == session_id
    )


def end_session(
    settings: Settings, serde: Serde, session_id: str, *, reason: str = "ended"
) -> Record:
    """Tombstone a live session (with why) and its session variables; returns its state.

    Raises :class:`InvalidRequest` (field ``session_id``) when there is no such live
    session: never seen, already ended, or expired and swept.
    """
    found = find_session(settings, serde, session_id)
    if found.state is None:
        why = f"it {found.ended}" if found.ended else "no such session"
        raise InvalidRequest("session_id", f"session {session_id!r} is not live: {why}")
    topics = Topics(settings.topics)
    partition = session_partition(session_id, topics.spec("sessions").partitions)
    producer = kafka.producer(settings)
    headers: list[tuple[str, str | bytes | None]] = [
        (ENDED_HEADER, reason.encode()),
        (WRITER_HEADER, b"cli"),
    ]
    producer.produce(
        topics.name("sessions"), None, session_id, headers=headers, partition=partition
    )
    for key in session_variable_keys(settings, serde, session_id):
        producer.produce(topics.name("variables"), None, key, headers=headers)
    if producer.flush(30):
        raise BrokerUnavailable(f"topic={topics.name('sessions')}: tombstone not acknowledged")
    return found.state
