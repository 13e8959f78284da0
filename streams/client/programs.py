"""Program versions for ``publish_program``: the record, and the latest version on the topic.

The programs topic is compacted and keyed by program id, so the latest version
of a program is found by reading every partition from its start to its current
end (a compacted topic may have holes in its offsets: positions, not offsets,
say when a partition is done).

:func:`publish_next_version` picks the next number inside a Kafka transaction
whose ``transactional.id`` belongs to the program (:func:`version_txn_id`), so two
publishers never take the same number (:mod:`dspex.streams.client.fenced` has the
argument; the job runners use the same :func:`fenced_by_program`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from confluent_kafka import KafkaException, Producer

from dspex.schemas import records
from dspex.schemas.times import now
from dspex.streams.client.fenced import Delivered, fenced_publish, until_visible
from dspex.streams.errors import BrokerUnavailable
from dspex.streams.reader import read_to_end
from dspex.streams.serde import Serde, make_serde
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics

logger = logging.getLogger(__name__)

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
    """``attempt(producer, latest)`` in a transaction fenced per program, committed
    (:func:`~dspex.streams.client.fenced.fenced_publish`); raises ``KafkaException``."""
    codec = serde or make_serde(settings)
    topic = Topics(settings.topics).name("programs")
    return fenced_publish(
        settings,
        version_txn_id(settings, program_id),
        lambda: latest_version(settings, codec, topic, program_id),
        attempt,
        timeout_s=timeout_s,
        producer_conf=producer_conf,
    )


def publish_next_version(
    settings: Settings,
    serde: Serde,
    topic: str,
    program_id: str,
    build: Callable[[int], dict[str, Any]],
) -> int:
    """Publish ``build(latest)`` as ``program_id``'s next version, fenced (see the module doc),
    and return once routers can see it."""
    delivered = Delivered()

    def attempt(producer: Producer, latest: int) -> int:
        delivered.clear()
        record = build(latest)
        value = serde.encode("ProgramVersion", record, topic=topic)
        producer.produce(topic, value, program_id.encode(), on_delivery=delivered)
        return int(record["version"])

    try:
        version = fenced_by_program(settings, program_id, attempt, serde=serde)
    except KafkaException as exc:
        raise BrokerUnavailable(
            f"topic={topic} program_id={program_id}: no version published: {exc}"
        ) from exc
    until_visible(settings, delivered.where(), f"program_id={program_id} version={version}")
    return version
