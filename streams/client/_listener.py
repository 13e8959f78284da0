"""The client's consumer on its reply topic, polled by one background thread.

It is assigned at the end of every partition before the first request is
produced, decodes each record into a :class:`~dspex.streams.client._replies.Chunk` and hands
it to the client's event loop. A record that cannot be decoded is logged with
its topic, partition and offset and skipped: it never stops the loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from dspex.streams.client._replies import Chunk
from dspex.streams.errors import BrokerUnavailable, ConfigError, DSPexError
from dspex.streams.serde import Serde

logger = logging.getLogger(__name__)


class ReplyListener:
    """Polls the reply topic's consumer on a background thread.

    :meth:`start` assigns every partition at its high-water mark (explicit offsets,
    so positions are known before any request is produced) and starts the thread.
    Each decoded chunk goes to ``on_chunk``; ``on_idle`` runs after every poll (the
    client serves its producer's delivery reports there).
    """

    def __init__(
        self,
        consumer: Consumer,
        serde: Serde,
        topic: str,
        on_chunk: Callable[[Chunk], None],
        on_idle: Callable[[], object] = lambda: None,
    ) -> None:
        self._consumer = consumer
        self._serde = serde
        self.topic = topic
        self._on_chunk = on_chunk
        self._on_idle = on_idle
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"dspex-replies-{topic}", daemon=True
        )

    def start(self, timeout_s: float = 10.0) -> None:
        """Assign all partitions at their end offsets, then start polling (blocking call)."""
        self._consumer.assign(end_offsets(self._consumer, self.topic, timeout_s))
        self._thread.start()
        logger.info("listening for replies topic=%s", self.topic)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the poll thread and close the consumer (blocking call)."""
        self._stop.set()
        if self._thread.ident is None:  # never started: the consumer is still ours to close
            self._consumer.close()
        else:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._poll_once()
        finally:
            self._consumer.close()
            logger.info("stopped listening for replies topic=%s", self.topic)

    def _poll_once(self) -> None:
        try:
            message = self._consumer.poll(0.1)
            if message is not None:
                self._handle(message)
            self._on_idle()
        except Exception:  # a broken poll must not end the replies of every request
            logger.exception("reply poll failed topic=%s", self.topic)
            self._stop.wait(0.5)

    def _handle(self, message: Message) -> None:
        where = f"topic={message.topic()} partition={message.partition()} offset={message.offset()}"
        if message.error() is not None:
            logger.warning("consumer error %s: %s", where, message.error())
            return
        try:
            decoded = self._serde.decode(
                message.value() or b"", topic=self.topic, expect="Response"
            )
            chunk = Chunk.from_record(decoded.record)
        except DSPexError as exc:
            logger.warning("skipping undecodable reply %s: %s", where, exc)
            return
        except Exception:  # never let one bad record stop the client's replies
            logger.exception("skipping reply that failed to convert %s", where)
            return
        self._on_chunk(chunk)


def end_offsets(consumer: Consumer, topic: str, timeout_s: float) -> list[TopicPartition]:
    """Every partition of ``topic`` at its current high-water mark."""
    marks = watermarks(consumer, topic, timeout_s)
    return [TopicPartition(topic, partition, high) for partition, (_, high) in marks.items()]


def watermarks(consumer: Consumer, topic: str, timeout_s: float) -> dict[int, tuple[int, int]]:
    """``{partition: (low, high)}`` for every partition of ``topic``.

    A topic created a moment ago may be unknown or leaderless for a while:
    transient errors are retried until ``timeout_s`` has passed.
    """
    give_up = time.monotonic() + timeout_s
    while True:
        try:
            return _watermarks(consumer, topic, timeout_s)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            code = error.code() if isinstance(error, KafkaError) else None
            if code not in _TRANSIENT or time.monotonic() > give_up:
                raise _offsets_error(topic, code, exc) from exc
            time.sleep(0.2)


def scan_to_end(consumer: Consumer, topic: str, timeout_s: float) -> Iterator[Message]:
    """Every record of ``topic`` from the beginning up to the end offsets seen at the start.

    Raises BrokerUnavailable when that end is not reached within ``timeout_s``.
    """
    marks = watermarks(consumer, topic, timeout_s)
    ends = {partition: high for partition, (low, high) in marks.items() if high > low}
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
    give_up = time.monotonic() + timeout_s
    while ends:
        if time.monotonic() > give_up:
            raise BrokerUnavailable(f"topic={topic}: not read to its end within {timeout_s}s")
        message = consumer.poll(0.2)
        if message is not None and message.error() is None:
            yield message
        # positions, not offsets: a compacted partition has holes
        for tp in consumer.position([TopicPartition(topic, p) for p in ends]):
            if tp.offset >= ends[tp.partition]:
                del ends[tp.partition]


def _offsets_error(topic: str, code: int | None, exc: KafkaException) -> DSPexError:
    if code == KafkaError.UNKNOWN_TOPIC_OR_PART:
        return ConfigError(f"topic {topic} does not exist: create it first")
    return BrokerUnavailable(f"topic={topic}: cannot read offsets: {exc}")


def _watermarks(consumer: Consumer, topic: str, timeout_s: float) -> dict[int, tuple[int, int]]:
    metadata = consumer.list_topics(topic, timeout=timeout_s).topics[topic]
    if metadata.error is not None:
        raise KafkaException(metadata.error)
    marks: dict[int, tuple[int, int]] = {}
    for partition in sorted(metadata.partitions):
        found = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout_s)
        if found is None:
            raise BrokerUnavailable(
                f"topic={topic} partition={partition}: no offsets in {timeout_s}s"
            )
        marks[partition] = (found[0], found[1])
    return marks


_TRANSIENT = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
    }
)
