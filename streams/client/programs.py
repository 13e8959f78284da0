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
from collections.abc import Callable, Iterable
from typing import Any

from confluent_kafka import KafkaException, Message, TopicPartition

from dspex.schemas import records
from dspex.schemas.times import now
from dspex.streams import kafka
from dspex.streams.errors import BrokerUnavailable
from dspex.streams.reader import read_to_end
from dspex.streams.serde import Serde
from dspex.streams.settings import Settings

logger = logging.getLogger(__name__)

VISIBLE_TIMEOUT_S = 10.0
PUBLISH_ATTEMPTS = 8


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


def publish_next_version(
    settings: Settings,
    serde: Serde,
    topic: str,
    program_id: str,
    build: Callable[[int], dict[str, Any]],
) -> int:
    """Publish ``build(latest)`` as ``program_id``'s next version, fenced (see the module doc)."""
    for attempt in range(1, PUBLISH_ATTEMPTS + 1):
        try:
            version, where = _publish_fenced(settings, serde, topic, program_id, build)
        except KafkaException as exc:  # fenced by a racing publisher: re-read and renumber
            logger.info(
                "version publish fenced program_id=%s attempt=%d: %s", program_id, attempt, exc
            )
            time.sleep(random.uniform(0, 0.5 * attempt))  # noqa: S311 - jitter, not security
            continue
        _until_visible(settings, where, program_id, version)
        return version
    raise BrokerUnavailable(f"topic={topic} program_id={program_id}: no version published")


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


def _publish_fenced(
    settings: Settings,
    serde: Serde,
    topic: str,
    program_id: str,
    build: Callable[[int], dict[str, Any]],
) -> tuple[int, TopicPartition]:
    """Publish the next version in a transaction fenced per program: (version, where)."""
    producer = kafka.producer(
        settings, **{"transactional.id": version_txn_id(settings, program_id)}
    )
    producer.init_transactions(30.0)  # fences the id's other holders; waits out their commits
    record = build(latest_version(settings, serde, topic, program_id))
    producer.begin_transaction()
    delivered: list[Message] = []
    producer.produce(
        topic,
        serde.encode("ProgramVersion", record, topic=topic),
        program_id.encode(),
        on_delivery=lambda _error, message: delivered.append(message),
    )
    try:
        producer.commit_transaction(30.0)  # flushes: the delivery report has been served
    except KafkaException as exc:
        error = exc.args[0] if exc.args else None
        if not getattr(error, "fatal", lambda: True)():
            producer.abort_transaction(30.0)
        raise
    (message,) = delivered
    where = TopicPartition(topic, message.partition() or 0, message.offset() or 0)
    return int(record["version"]), where
