"""Completing optimizer jobs: their records and their consumer offsets in one Kafka transaction.

:class:`Completion` is the job runner's :class:`~dspex.agents.plumbing.loop.Committer`:
the runner *stages* a finished job's records, and when the consumer loop commits
that job's offset, ``commit`` produces the staged records and sends the offsets
with the consumer's group metadata (KIP-447) in one transaction. The group
coordinator accepts those offsets only from the partition's current owner in the
current generation, so a runner that lost the partition (a zombie) has its
transaction aborted and read-committed consumers never see its records. Records
staged for a partition that moved are dropped (``forget``, ``discard``): the new
owner runs the job again. The transactional id is unique per runner process;
``jobs.transaction_timeout_s`` bounds how long a runner killed in the middle of a
commit can hold back read-committed consumers.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from dspex.agents.jobs.versions import Versioned, commit_versioned
from dspex.agents.plumbing.messages import Consumed, Outgoing
from dspex.streams import kafka
from dspex.streams.errors import BrokerUnavailable
from dspex.streams.settings import Settings

logger = logging.getLogger(__name__)

TP = tuple[str, int]


@dataclass(frozen=True)
class _Staged:
    records: Sequence[Outgoing]
    note: str
    versioned: Versioned | None = None


class Completion:
    """A transactional producer that completes jobs atomically (see the module doc)."""

    def __init__(
        self,
        settings: Settings,
        *,
        worker_id: str,
        group_id: str,
    ) -> None:
        self._settings = settings
        self._timeout_s = settings.jobs.transaction_timeout_s
        self._worker_id = worker_id
        self._lock = threading.Lock()  # staged on the event loop, committed on the kafka thread
        self._staged: dict[TP, dict[int, _Staged]] = {}
        self._producer = kafka.producer(
            settings,
            **{
                "client.id": worker_id,
                "transactional.id": f"{group_id}-{worker_id}",
                "transaction.timeout.ms": int(self._timeout_s * 1000),
            },
        )
        self._producer.init_transactions(30.0)

    def stage(
        self,
        origin: Consumed,
        records: Sequence[Outgoing],
        note: str = "",
        versioned: Versioned | None = None,
    ) -> None:
        """Publish ``records`` with ``origin``'s offset; ``note`` is logged once committed.

        A ``versioned`` result becomes its program's next version, its number picked
        when it is committed (:func:`~dspex.agents.jobs.versions.commit_versioned`).
        """
        with self._lock:
            by_offset = self._staged.setdefault((origin.topic, origin.partition), {})
            by_offset[origin.offset] = _Staged(tuple(records), note, versioned)

    def commit(self, consumer: Consumer, offsets: list[TopicPartition]) -> None:
        """Produce what is staged below ``offsets`` and commit those offsets, atomically.

        Raises ``KafkaException`` when the transaction was refused and aborted (the
        staged records stay for the next try), :class:`BrokerUnavailable` when the
        producer is fatally broken (the process must restart with a new one).
        """
        due = self._due(offsets)
        for key, staged in sorted(due.items()):
            if staged.versioned is not None:  # its own transaction, fenced per program
                self._commit_versioned(consumer, key, staged)
                del due[key]
        try:
            self._producer.begin_transaction()
            for staged in due.values():
                for out in staged.records:
                    self._producer.produce(out.topic, out.value, out.key)
            metadata = consumer.consumer_group_metadata()
            self._producer.send_offsets_to_transaction(offsets, metadata, self._timeout_s)
            self._producer.commit_transaction(self._timeout_s)
        except KafkaException as exc:
            self._abort(exc, offsets)
            raise
        with self._lock:
            for (topic, partition, offset), staged in due.items():
                self._staged.get((topic, partition), {}).pop(offset, None)
                if staged.note:
                    logger.info("%s", staged.note)

    def _commit_versioned(
        self, consumer: Consumer, key: tuple[str, int, int], staged: _Staged
    ) -> None:
        """Publish one versioned job with its own offset (+1), under the next free version."""
        topic, partition, offset = key
        assert staged.versioned is not None  # noqa: S101 - the caller checked
        built = commit_versioned(
            self._settings,
            consumer,
            staged.versioned,
            staged.records,
            [TopicPartition(topic, partition, offset + 1)],
            worker_id=self._worker_id,
            timeout_s=self._timeout_s,
        )
        with self._lock:
            self._staged.get((topic, partition), {}).pop(offset, None)
        logger.info("%s %s", staged.note, built.summary)

    def forget(self, partitions: set[TP]) -> None:
        """Drop what is staged for ``partitions`` (revoked or lost: the new owner redoes it)."""
        with self._lock:
            for tp in partitions:
                self._staged.pop(tp, None)

    def discard(self, tp: TP, offset: int) -> None:
        """Drop what is staged for one message whose partition moved while it ran."""
        with self._lock:
            self._staged.get(tp, {}).pop(offset, None)

    def _due(self, offsets: list[TopicPartition]) -> dict[tuple[str, int, int], _Staged]:
        with self._lock:
            return {
                (p.topic, p.partition, offset): staged
                for p in offsets
                for offset, staged in sorted(self._staged.get((p.topic, p.partition), {}).items())
                if offset < p.offset
            }

    def _abort(self, exc: KafkaException, offsets: list[TopicPartition]) -> None:
        error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
        if error is not None and error.fatal():
            raise BrokerUnavailable(
                f"worker_id={self._worker_id}: transactional producer failed: {error.str()}"
            ) from exc
        where = ",".join(f"{p.topic}[{p.partition}]@{p.offset}" for p in offsets)
        logger.warning(
            "transaction failed offsets=%s worker_id=%s: %s", where, self._worker_id, exc
        )
        try:
            self._producer.abort_transaction(self._timeout_s)
        except KafkaException:
            logger.exception("abort failed worker_id=%s", self._worker_id)
