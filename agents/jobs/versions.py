"""A job's result as the next version of its program (or pipeline), numbered safely.

Two optimizer jobs on one program, finishing on two runners, used to read the latest
version (N) and both publish N + 1. :func:`commit_versioned` numbers the result inside
a transaction fenced per program — per pipeline for a pipeline job — together with the
job's records and its consumer offset (still fenced by the consumer group, KIP-447):
:mod:`dspex.streams.client.fenced` has the argument, and ``publish_program`` and
``pipelines put`` take the same fences, so a version put by hand and a job result
cannot collide either. The job runner's committer
(:class:`~dspex.agents.jobs.txn.Completion`) calls it for a staged job whose result
is a new version.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from confluent_kafka import Consumer, Producer, TopicPartition

from dspex.agents.plumbing.messages import Outgoing
from dspex.streams.client.fenced import fenced_publish
from dspex.streams.client.pipelines import latest_pipeline_version, pipeline_txn_id
from dspex.streams.client.programs import fenced_by_program
from dspex.streams.serde import make_serde
from dspex.streams.settings import Settings


@dataclass(frozen=True)
class Built:
    """A job's records for one version number, and the line the runner logs."""

    records: list[Outgoing]
    version: int
    summary: str


@dataclass(frozen=True)
class Versioned:
    """A result that becomes ``program_id``'s next version: ``build(latest)`` gives its records."""

    program_id: str
    build: Callable[[int], Built]
    pipeline_id: str | None = None
    """A pipeline job's: fenced per pipeline, and ``build`` gets the pipeline's latest version."""


def commit_versioned(
    settings: Settings,
    consumer: Consumer,
    versioned: Versioned,
    records: Sequence[Outgoing],
    offsets: list[TopicPartition],
    *,
    worker_id: str,
    timeout_s: float,
) -> Built:
    """Publish ``versioned`` (and ``records``) with ``offsets`` under the next free version.

    Raises ``KafkaException`` when every attempt was fenced or refused (the caller tries
    again at its next commit).
    """

    def attempt(producer: Producer, latest: int) -> Built:
        built = versioned.build(latest)
        for out in [*records, *built.records]:
            producer.produce(out.topic, out.value, out.key)
        producer.send_offsets_to_transaction(offsets, consumer.consumer_group_metadata(), timeout_s)
        return built

    conf = {"client.id": worker_id, "transaction.timeout.ms": int(timeout_s * 1000)}
    pipeline_id = versioned.pipeline_id
    if pipeline_id is None:
        return fenced_by_program(
            settings, versioned.program_id, attempt, timeout_s=timeout_s, producer_conf=conf
        )
    serde = make_serde(settings)
    return fenced_publish(
        settings,
        pipeline_txn_id(settings, pipeline_id),
        lambda: latest_pipeline_version(settings, serde, pipeline_id),
        attempt,
        timeout_s=timeout_s,
        producer_conf=conf,
    )
