"""Answers already given: so a redone request never contradicts its first answer.

Delivery is at-least-once: a process killed after answering a request but before
committing its offset leaves the request to be done again by the partition's next
owner. Doing it again is harmless while it gives the same answer; it is not when
the deadline has passed meanwhile: the first answer was ``ok``, the redo would say
``overloaded``. So before a *possibly redone* request (one consumed below the end
the partition had when this process was assigned it, see
:attr:`dspex.agents.plumbing.messages.Consumed.maybe_redone`) is answered with a
passed deadline, its reply topic is searched for a final answer from the request's
creation on; if there is one, the redo says nothing.

The search reads each partition of the reply topic from the request's creation time
to its end once and keeps the final answers it saw (bounded), so a burst of redone
requests after a crash costs one scan, continued incrementally.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable

from confluent_kafka import OFFSET_END, Consumer, KafkaException, TopicPartition

from dspex.streams import kafka
from dspex.streams.errors import DSPexError
from dspex.streams.reader import scan_range, watermarks
from dspex.streams.serde import Serde
from dspex.streams.settings import Settings

__all__ = ["AnswerFinder", "FinalStatusLookup", "answered_before"]

FinalStatusLookup = Callable[[str, str, int], "str | None"]
"""``(reply topic, request id, created ms) -> final status or None`` (blocking)."""

logger = logging.getLogger(__name__)

# An answer is produced after its request was created; the clocks of the client and
# the broker may disagree by this much.
CLOCK_SKEW_MS = 5_000
_BATCH = 500


async def answered_before(
    lookup: FinalStatusLookup, where: str, topic: str, request_id: str, created_ms: int
) -> bool:
    """Whether ``lookup`` finds a final answer to ``request_id`` (logged); off the event loop."""
    status = await asyncio.to_thread(lookup, topic, request_id, created_ms)
    if status is None:
        return False
    logger.info(
        "not redoing a request answered before %s request_id=%s status=%s",
        where,
        request_id,
        status,
    )
    return True


class AnswerFinder:
    """Final answers found on reply topics, by request id (thread-safe, blocking calls)."""

    def __init__(
        self, settings: Settings, serde: Serde, *, timeout_s: float = 10.0, capacity: int = 200_000
    ) -> None:
        self._settings = settings
        self._serde = serde
        self._timeout_s = timeout_s
        self._capacity = capacity
        self._lock = threading.Lock()
        self._answers: OrderedDict[str, str] = OrderedDict()  # request id -> final status
        self._next: dict[str, dict[int, int]] = {}  # topic -> partition -> next offset to read
        self._since: dict[str, int] = {}  # topic -> the time the first scan started from
        self.scans = 0

    def final_status(self, topic: str, request_id: str, created_ms: int) -> str | None:
        """The status of a final answer to ``request_id`` on ``topic``, else None.

        A broker that cannot be read counts as "no answer found" (logged): the redo
        then answers as it would have, which is what happened before this check.
        """
        with self._lock:
            if request_id in self._answers:
                return self._answers[request_id]
            try:
                self._scan(topic, created_ms - CLOCK_SKEW_MS)
            except (KafkaException, DSPexError) as exc:
                logger.warning("cannot look for earlier answers topic=%s error=%s", topic, exc)
                return None
            return self._answers.get(request_id)

    def _scan(self, topic: str, since_ms: int) -> None:
        if since_ms < self._since.get(topic, since_ms + 1):  # from earlier than before: anew
            self._next.pop(topic, None)
            self._since[topic] = since_ms
        consumer = kafka.consumer(self._settings, f"dspex-answers-{uuid.uuid4().hex}")
        try:
            self.scans += 1
            marks = watermarks(consumer, topic, self._timeout_s)
            ends = {partition: high for partition, (_, high) in marks.items()}
            starts = self._next.get(topic) or self._offsets_at(consumer, topic, since_ms, ends)
            for message in scan_range(consumer, topic, starts, ends, self._timeout_s):
                self._keep(topic, message.value())
            self._next[topic] = ends
        finally:
            consumer.close()

    def _offsets_at(
        self, consumer: Consumer, topic: str, since_ms: int, ends: dict[int, int]
    ) -> dict[int, int]:
        wanted = [TopicPartition(topic, p, max(since_ms, 0)) for p in ends]
        found = consumer.offsets_for_times(wanted, timeout=self._timeout_s)
        return {tp.partition: ends[tp.partition] if tp.offset in (-1, OFFSET_END) else tp.offset
                for tp in found}  # fmt: skip

    def _keep(self, topic: str, value: bytes | None) -> None:
        if not value:
            return
        try:
            record = self._serde.decode(value, topic=topic, expect="Response").record
        except DSPexError:
            return  # not ours to judge: whoever consumes the topic reports it
        if record.get("final"):
            self._answers[str(record["request_id"])] = str(record["status"])
            if len(self._answers) > self._capacity:
                self._answers.popitem(last=False)
