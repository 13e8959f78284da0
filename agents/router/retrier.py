"""The router's retrier: sends each record of the retry delay tiers back to its pool once due.

A worker writes a transiently failed attempt to ``retry.1s``, ``retry.5s`` or
``retry.30s`` (the shortest tier that holds its backoff,
:func:`dspex.agents.plumbing.retry.tier_topic`) with a ``dspex-not-before``
header. The retrier is a consumer-group member of its own (``<router
group>-retrier``) on those topics, in a thread beside the router's request loop.
For each record, in partition order:

* due (``not-before`` passed): its bytes and headers go to ``pool.<pool>``
  (or a bad record to the DLQ, :meth:`RouterHandler.handle_retry`); once the
  broker has it, the record's offset is committed;
* not due: the partition is **paused** and sought back to the record, and
  resumed when it is due. Nothing waits in memory but that deadline; a router
  killed meanwhile has committed nothing past the record, so the next retrier
  reads it again from Kafka and forwards it when due — no retry is lost. Other
  partitions and tiers go on meanwhile.

Records are forwarded at least once: a retrier killed between forwarding and
committing forwards that record again (the worker recognises an attempt it
already handled). On stop the retrier just closes: waiting records stay on
their topics for whoever consumes them next.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from dspex.agents.plumbing.messages import Consumed, Outgoing
from dspex.streams import kafka
from dspex.streams.settings import Settings

logger = logging.getLogger(__name__)

Handle = Callable[[Consumed], tuple[float, list[Outgoing]]]
"""A retry record -> (seconds until due, the records to send once due)."""

POLL_S = 0.2
SEND_TIMEOUT_S = 30.0


class Retrier:
    """Forwards due retry records, pausing partitions whose first record is not due yet."""

    def __init__(
        self,
        settings: Settings,
        handle: Handle,
        *,
        topics: Sequence[str],
        group_id: str,
        client_id: str,
        instance_id: str | None = None,
    ) -> None:
        self._instance_id = instance_id
        self._settings = settings
        self._handle = handle
        self._topics = list(topics)
        self._group_id = group_id
        self._client_id = client_id
        self._paused: dict[tuple[str, int], float] = {}  # partition -> monotonic due time
        self.forwarded = 0
        self.pauses = 0

    def run(self, stop: threading.Event) -> None:
        """Consume the tiers until ``stop`` is set (blocks; run it in a thread)."""
        session_ms = int(self._settings.reliability.session_timeout_s * 1000)
        self._consumer = kafka.consumer(
            self._settings,
            self._group_id,
            **{
                "client.id": self._client_id,
                "session.timeout.ms": session_ms,
                "heartbeat.interval.ms": max(500, session_ms // 5),
                "partition.assignment.strategy": "cooperative-sticky",
                # a static member, like the router's loop: a restart keeps its partitions
                **({"group.instance.id": self._instance_id} if self._instance_id else {}),
            },
        )
        self._producer = kafka.producer(self._settings, **{"client.id": self._client_id})
        self._consumer.subscribe(self._topics, on_revoke=self._forget, on_lost=self._forget)
        logger.info("retrier started group=%s topics=%s", self._group_id, ",".join(self._topics))
        try:
            while not stop.is_set():
                self._step(stop)
        finally:
            self._consumer.close()
            self._producer.flush(5.0)
            logger.info(
                "retrier stopped forwarded=%d pauses=%d waiting_partitions=%d",
                self.forwarded,
                self.pauses,
                len(self._paused),
            )

    def _step(self, stop: threading.Event) -> None:
        self._resume_due()
        message = self._consumer.poll(self._poll_s())
        if message is None:
            return
        error = message.error()
        if error is not None:
            if error.code() != KafkaError._PARTITION_EOF:
                logger.warning("retrier consumer error: %s", error.str())
            return
        if (message.topic(), message.partition()) in self._paused:
            return  # fetched before the pause took effect: read again after the resume
        self._on_record(Consumed.from_message(message), message, stop)

    def _on_record(self, consumed: Consumed, message: Message, stop: threading.Event) -> None:
        delay_s, outs = self._handle(consumed)
        tp = TopicPartition(consumed.topic, consumed.partition, consumed.offset)
        if delay_s > 0:
            self._wait(tp, delay_s)
            return
        if not self._send(outs, consumed, stop):
            return  # stopping: not committed, the next retrier forwards it
        try:
            self._consumer.commit(message=message, asynchronous=False)
        except KafkaException as exc:  # e.g. revoked meanwhile: its next owner forwards it again
            logger.warning("retry forwarded, commit failed %s: %s", consumed.where(), exc)
        self.forwarded += 1

    def _wait(self, tp: TopicPartition, delay_s: float) -> None:
        """Pause ``tp`` at the record until it is due (nothing past it is read meanwhile)."""
        try:
            self._consumer.pause([tp])
            self._consumer.seek(tp)
        except KafkaException as exc:  # not assigned any more: its next owner waits for it
            logger.info("cannot pause %s[%d]: %s", tp.topic, tp.partition, exc)
            return
        self._paused[(tp.topic, tp.partition)] = time.monotonic() + delay_s
        self.pauses += 1
        logger.debug("retry waits %s[%d]@%d in_s=%.3f", tp.topic, tp.partition, tp.offset, delay_s)

    def _resume_due(self) -> None:
        now = time.monotonic()
        due = [key for key, at in self._paused.items() if at <= now]
        if not due:
            return
        for key in due:
            del self._paused[key]
        try:
            self._consumer.resume([TopicPartition(t, p) for t, p in due])
        except KafkaException as exc:
            logger.info("cannot resume %s: %s", due, exc)

    def _poll_s(self) -> float:
        if not self._paused:
            return POLL_S
        return max(0.0, min(POLL_S, min(self._paused.values()) - time.monotonic()))

    def _send(self, outs: list[Outgoing], consumed: Consumed, stop: threading.Event) -> bool:
        """Produce ``outs`` until the broker has them all; False when stopped first."""
        attempt = 0
        while outs:
            failed = self._produce_all(outs)
            if not failed:
                return True
            attempt += 1
            if attempt == 1 or attempt % 10 == 0:
                logger.warning(
                    "forwarding failed %s attempt=%d; resending", consumed.where(), attempt
                )
            if stop.wait(min(2.0**attempt * 0.1, 5.0)):
                return False
            outs = failed
        return True

    def _produce_all(self, outs: list[Outgoing]) -> list[Outgoing]:
        """Produce and flush ``outs``; those the broker did not acknowledge."""
        acked: set[int] = set()

        def report(err: KafkaError | None, _: Message, index: int) -> None:
            if err is None:
                acked.add(index)

        for index, out in enumerate(outs):
            self._producer.produce(
                out.topic,
                out.value,
                out.key,
                headers=list(out.headers),
                on_delivery=functools.partial(report, index=index),
            )
        self._producer.flush(SEND_TIMEOUT_S)
        return [out for index, out in enumerate(outs) if index not in acked]

    def _forget(self, _: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._paused.pop((tp.topic, tp.partition), None)
