"""Picking a program's next version number safely when several job runners finish at once.

Two optimizer jobs on one program, finishing on two runners, used to read the
latest version (N) and both publish N + 1. Kafka has no compare-and-set, so the
number is picked *inside* a transaction whose ``transactional.id`` belongs to the
program (:func:`dspex.streams.client.programs.version_txn_id`), not to the runner:

1. ``init_transactions`` with that id bumps its producer epoch: any other process
   holding the same id (another runner completing a job on this program) is
   fenced — its open transaction is aborted and its commit fails. The call returns
   only once an earlier transaction of that id is fully committed or aborted, so
   its markers are on the programs partition.
2. Re-read the programs topic (read-committed) for the program's latest version,
   and build the job's records with latest + 1.
3. Produce them and the job's consumer offset in that transaction (the offset
   commit is still fenced by the consumer group, KIP-447) and commit. The job
   runner's committer (:class:`~dspex.agents.jobs.txn.Completion`) calls
   :func:`commit_versioned` for a staged job whose result is a new version.

A runner fenced between 1 and 3 sees a fatal producer error, waits a random
moment (so two runners do not keep fencing each other) and starts again at 1
with a fresh producer: by then the winner's version is committed and visible, so
the loser takes the next number. The same id guards ``publish_program`` in the
client, so a program put by hand and a job result cannot collide either: both run
through :func:`dspex.streams.client.programs.fenced_by_program`.
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
