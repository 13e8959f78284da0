"""Program versions for ``publish_program``: the record, and the latest version on the topic.

The programs topic is compacted and keyed by program id, so the latest version
of a program is found by reading every partition from its start to its current
end (a compacted topic may have holes in its offsets: positions, not offsets,
say when a partition is done).

:func:`publish_next_version` picks the next number inside a Kafka transaction
whose ``transactional.id`` belongs to the program (:func:`version_txn_id`): it
fences any other publisher of that program (a job runner completing an
optimization, another ``dspex programs put``) between reading the latest version
and committing the new one, so two publishers never take the same number
(``dspex.agents.jobs.versions`` has the full argument).
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from confluent_kafka import KafkaException, Message, Producer, TopicPartition

from dspex.schemas import records
from dspex.schemas.times import now
from dspex.streams import kafka
from dspex.streams.errors import BrokerUnavailable
from dspex.streams.reader import read_to_end
from dspex.streams.serde import Serde, make_serde
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics

logger = logging.getLogger(__name__)

VISIBLE_TIMEOUT_S = 10.0
ATTEMPTS = 8
BACKOFF_S = 0.5
T = TypeVar("T")


def program_version_record(
    program_id: str,
    signature: str,
    *,
    version: int,
    parent_version: int | None,
    module_type: str,
    state_json: str | None,
    module_config_json: str,
    tools: Iterable[str],
    metric: str | None,
    description: str | None,
    created_by: str,
    score: float | None = None,
    adapter: str | None = None,
) -> dict[str, Any]:
    """A ProgramVersion record ready for the serde (``score``: its metric's, when measured)."""
    return records.program_version(
        program_id=program_id,
        version=version,
        signature=signature,
        module_type=module_type,
        module_config_json=module_config_json,
        state_json=state_json or "{}",
        tools=list(tools),
        adapter=adapter,
        metric=metric,
        score=score,
        description=description or "",
        parent_version=parent_version,
        created_at=now(),
        created_by=created_by,
    )


def latest_version(
    settings: Settings, serde: Serde, topic: str, program_id: str, timeout_s: float = 10.0
) -> int:
    """The highest version of ``program_id`` on the programs topic; 0 when there is none."""
    versions = read_versions(settings, serde, topic, timeout_s, program_id=program_id)
    return max((int(r["version"]) for r in versions.get(program_id, [])), default=0)


def read_versions(
    settings: Settings,
    serde: Serde,
    topic: str,
    timeout_s: float = 10.0,
    *,
    program_id: str | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Every ProgramVersion still on the topic, per program id, oldest version first.

    Compaction keeps only the latest record per program id, so older versions
    show up only until the log cleaner has run.
    """
    found: dict[str, list[dict[str, Any]]] = {}
    records = read_to_end(
        settings, serde, topic, "ProgramVersion", key=program_id, timeout_s=timeout_s
    )
    for _, record in records:
        if record is not None:
            found.setdefault(record["program_id"], []).append(record)
    return {pid: sorted(rs, key=lambda r: int(r["version"])) for pid, rs in found.items()}


def version_txn_id(settings: Settings, program_id: str) -> str:
    """The ``transactional.id`` every publisher of ``program_id``'s versions uses."""
    return f"{settings.topics.prefix}programs-{program_id}"


def fenced_by_program(
    settings: Settings,
    program_id: str,
    attempt: Callable[[Producer, int], T],
    *,
    timeout_s: float = 30.0,
    producer_conf: Mapping[str, Any] | None = None,
    serde: Serde | None = None,
) -> T:
    """``attempt(producer, latest)`` inside a transaction fenced per program, committed.

    The one implementation of the module doc's argument, for ``publish_program`` and the
    job runners: a producer under :func:`version_txn_id` fences every other holder of
    the id (``init_transactions`` also waits out their commits), the latest version is
    read only then, ``attempt`` produces in the open transaction, and the commit makes
    it visible. A fenced or refused attempt is aborted and made again, after a random
    wait, with a fresh producer (``ATTEMPTS`` in all); the last ``KafkaException`` is
    raised when none succeeded.
    """
    serde = serde or make_serde(settings)
    topic = Topics(settings.topics).name("programs")
    error = KafkaException("no attempt made")
    conf = {"transactional.id": version_txn_id(settings, program_id), **(producer_conf or {})}
    for number in range(1, ATTEMPTS + 1):
        producer = kafka.producer(settings, **conf)
        try:
            producer.init_transactions(timeout_s)
            latest = latest_version(settings, serde, topic, program_id)
            producer.begin_transaction()
            result = attempt(producer, latest)
            producer.commit_transaction(timeout_s)  # flushes: delivery reports are served
            return result
        except KafkaException as exc:  # fenced by a racing publisher: re-read and renumber
            error = exc
            logger.info(
                "version publish fenced program_id=%s attempt=%d: %s", program_id, number, exc
            )
            with contextlib.suppress(KafkaException):  # a fenced producer cannot abort: fine
                producer.abort_transaction(timeout_s)
            time.sleep(random.uniform(0, BACKOFF_S * number))  # noqa: S311 - jitter
    raise error


def publish_next_version(
    settings: Settings,
    serde: Serde,
    topic: str,
    program_id: str,
    build: Callable[[int], dict[str, Any]],
) -> int:
    """Publish ``build(latest)`` as ``program_id``'s next version, fenced (see the module doc),
    and return once routers can see it."""
    delivered: list[Message] = []

    def attempt(producer: Producer, latest: int) -> int:
        delivered.clear()
        record = build(latest)
        producer.produce(
            topic,
            serde.encode("ProgramVersion", record, topic=topic),
            program_id.encode(),
            on_delivery=lambda _error, message: delivered.append(message),
        )
        return int(record["version"])

    try:
        version = fenced_by_program(settings, program_id, attempt, serde=serde)
    except KafkaException as exc:
        raise BrokerUnavailable(
            f"topic={topic} program_id={program_id}: no version published: {exc}"
        ) from exc
    (message,) = delivered
    where = TopicPartition(topic, message.partition() or 0, message.offset() or 0)
    _until_visible(settings, where, program_id, version)
    return version


def _until_visible(
    settings: Settings, where: TopicPartition, program_id: str, version: int
) -> None:
    """Wait until read-committed readers (the routers) can see ``version`` at ``where``.

    A commit returns once the coordinator has decided it; the markers reach the
    partition a moment later, and until then a router would still answer "no program
    registered" to a request sent right after ``put``. A read-committed reader sees
    the record once the partition's last stable offset is past it: one ListOffsets
    request per look, not a re-read of the topic.
    """
    consumer = kafka.consumer(
        settings, f"dspex-visible-{uuid.uuid4().hex}", **{"isolation.level": "read_committed"}
    )
    try:
        give_up = time.monotonic() + VISIBLE_TIMEOUT_S
        latest = TopicPartition(where.topic, where.partition, -1)  # timestamp -1: the end
        while True:
            with contextlib.suppress(KafkaException):  # a moment without a leader: look again
                (end,) = consumer.offsets_for_times([latest], timeout=VISIBLE_TIMEOUT_S)
                if end.offset > where.offset:
                    return
            if time.monotonic() > give_up:
                logger.warning(
                    "program_id=%s version=%d not yet visible after %.0fs",
                    program_id,
                    version,
                    VISIBLE_TIMEOUT_S,
                )
                return
            time.sleep(0.02)
    finally:
        consumer.close()
