"""Numbered publishes that cannot collide: the next version of a program or a pipeline.

Programs and pipelines are versioned records on compacted topics, keyed by id.
Kafka has no compare-and-set, so two publishers that each read the latest version
(N) and write N + 1 publish the same number, and after compaction one replaces the
other. :func:`fenced_publish` picks the number *inside* a transaction whose
``transactional.id`` belongs to the program or pipeline, not to the publisher:

1. ``init_transactions`` with that id bumps its producer epoch: any other process
   holding the id (a job runner completing an optimization, another ``put``) is
   fenced — its open transaction is aborted and its commit fails. The call returns
   only once an earlier transaction of that id is fully committed or aborted, so
   its markers are on the partition.
2. The latest version is read (read-committed) only then, and ``attempt`` produces
   latest + 1 in the open transaction (with whatever else belongs to it: a job's
   records and consumer offsets).
3. The commit makes it visible. A fenced attempt is aborted and made again after a
   random wait (so two publishers do not keep fencing each other) with a fresh
   producer: by then the winner's version is committed and visible, so the loser
   takes the next number.

:func:`until_visible` then waits until read-committed readers (the routers, the
pipeline agent) can see the record, so a request sent right after a ``put`` is
routed to it.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from confluent_kafka import KafkaException, Message, Producer, TopicPartition

from dspex.streams import kafka
from dspex.streams.settings import Settings

logger = logging.getLogger(__name__)

ATTEMPTS = 8
BACKOFF_S = 0.5
VISIBLE_TIMEOUT_S = 10.0
T = TypeVar("T")


def fenced_publish(
    settings: Settings,
    txn_id: str,
    latest: Callable[[], int],
    attempt: Callable[[Producer, int], T],
    *,
    timeout_s: float = 30.0,
    producer_conf: Mapping[str, Any] | None = None,
) -> T:
    """``attempt(producer, latest())`` in a transaction fenced by ``txn_id``, committed.

    Raises the last ``KafkaException`` when none of ``ATTEMPTS`` attempts committed.
    """
    error = KafkaException("no attempt made")
    conf = {"transactional.id": txn_id, **(producer_conf or {})}
    for number in range(1, ATTEMPTS + 1):
        producer = kafka.producer(settings, **conf)
        try:
            producer.init_transactions(timeout_s)  # fences the id's other holders
            newest = latest()
            producer.begin_transaction()
            result = attempt(producer, newest)
            producer.commit_transaction(timeout_s)  # flushes: delivery reports are served
            return result
        except KafkaException as exc:  # fenced by a racing publisher: re-read and renumber
            error = exc
            logger.info("publish fenced txn_id=%s attempt=%d: %s", txn_id, number, exc)
            with contextlib.suppress(KafkaException):  # a fenced producer cannot abort: fine
                producer.abort_transaction(timeout_s)
            time.sleep(random.uniform(0, BACKOFF_S * number))  # noqa: S311 - jitter
    raise error


class Delivered:
    """Where the one record an attempt produced landed (its delivery report)."""

    def __init__(self) -> None:
        self._messages: list[Message] = []

    def clear(self) -> None:
        """Forget an earlier attempt's record."""
        self._messages.clear()

    def __call__(self, _error: object, message: Message) -> None:
        """``on_delivery`` for ``produce``."""
        self._messages.append(message)

    def where(self) -> TopicPartition:
        """The record's topic, partition and offset."""
        (message,) = self._messages
        return TopicPartition(
            message.topic() or "", message.partition() or 0, message.offset() or 0
        )


def until_visible(settings: Settings, where: TopicPartition, what: str) -> None:
    """Wait until read-committed readers can see the record at ``where``.

    A commit returns once the coordinator has decided it; the markers reach the
    partition a moment later. A read-committed reader sees the record once the
    partition's last stable offset is past it: one ListOffsets request per look.
    Logs a warning (naming ``what``) and returns after ``VISIBLE_TIMEOUT_S``.
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
                logger.warning("%s not yet visible after %.0fs", what, VISIBLE_TIMEOUT_S)
                return
            time.sleep(0.02)
    finally:
        consumer.close()
