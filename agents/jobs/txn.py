"""Completing an optimizer job: its records and its consumer offset in one Kafka transaction.

:class:`Completion` wraps a confluent-kafka transactional producer. ``commit``
produces a job's records and sends the job's next offset with the consumer's
group metadata (KIP-447): the group coordinator accepts that offset only from
the partition's current owner in the current generation, so a runner that lost
the partition (a zombie) has its transaction aborted and read-committed
consumers never see its records. The transactional id is unique per runner
process; ``jobs.transaction_timeout_s`` bounds how long a runner killed in the
middle of a commit can hold back read-committed consumers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from dspex.agents.plumbing.messages import Consumed, Outgoing
from dspex.streams import kafka
from dspex.streams.settings import Settings

logger = logging.getLogger(__name__)

ATTEMPTS = 3


class Completion:
    """A transactional producer that completes jobs atomically (see the module doc)."""

    def __init__(
        self,
        settings: Settings,
        *,
        worker_id: str,
        group_id: str,
        transactional_id: str | None = None,
    ) -> None:
        self._timeout_s = settings.jobs.transaction_timeout_s
        self._worker_id = worker_id
        self._producer = kafka.producer(
            settings,
            **{
                "client.id": worker_id,
                "transactional.id": transactional_id or f"{group_id}-{worker_id}",
                "transaction.timeout.ms": int(self._timeout_s * 1000),
            },
        )
        self._producer.init_transactions(30.0)

    def commit(
        self,
        consumer: Consumer,
        origin: Consumed,
        records: Sequence[Outgoing],
        owns: Callable[[], bool],
    ) -> bool:
        """Produce ``records`` and commit ``origin``'s next offset atomically.

        False when the transaction was refused and aborted (``owns()`` says whether
        trying again makes sense); raises when the producer is fatally broken.
        """
        offsets = [TopicPartition(origin.topic, origin.partition, origin.offset + 1)]
        for attempt in range(1, ATTEMPTS + 1):
            try:
                self._producer.begin_transaction()
                for out in records:
                    self._producer.produce(out.topic, out.value, out.key)
                metadata = consumer.consumer_group_metadata()
                self._producer.send_offsets_to_transaction(offsets, metadata, self._timeout_s)
                self._producer.commit_transaction(self._timeout_s)
                return True
            except KafkaException as exc:
                if not self._abort(exc, origin, attempt) or not owns():
                    return False
        return False

    def _abort(self, exc: KafkaException, origin: Consumed, attempt: int) -> bool:
        """Abort the failed transaction; True when another attempt may succeed."""
        error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
        if error is not None and error.fatal():
            raise exc  # the producer is unusable: the process restarts with a new one
        logger.warning(
            "transaction failed %s attempt=%d worker_id=%s: %s",
            origin.where(),
            attempt,
            self._worker_id,
            exc,
        )
        try:
            self._producer.abort_transaction(self._timeout_s)
        except KafkaException:
            logger.exception("abort failed worker_id=%s", self._worker_id)
        return error is None or error.retriable() or error.txn_requires_abort()
