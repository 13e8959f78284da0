"""The client's consumer on its reply topic, polled by one background thread.

It is assigned at the end of every partition before the first request is
produced, decodes each record into a :class:`~dspex.streams.client._replies.Chunk` and hands
it to the client's event loop. A record that cannot be decoded is logged with
its topic, partition and offset and skipped: it never stops the loop. While
replies are awaited, a :class:`~dspex.streams.reader.StallGuard` restarts the fetch
of a partition librdkafka stopped fetching after a broker restart.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from confluent_kafka import (
    Consumer,
    Message,
)

from dspex.streams.client._replies import Chunk
from dspex.streams.errors import DSPexError
from dspex.streams.reader import StallGuard, end_offsets
from dspex.streams.serde import Serde

logger = logging.getLogger(__name__)

STALL_CHECK_S = 5.0
"""How often, while replies are awaited, partitions are checked for a stalled fetch."""


class ReplyListener:
    """Polls the reply topic's consumer on a background thread.

    :meth:`start` assigns every partition at its high-water mark (explicit offsets,
    so positions are known before any request is produced) and starts the thread.
    Each decoded chunk goes to ``on_chunk``; ``on_idle`` runs after every poll (the
    client serves its producer's delivery reports there); ``waiting()`` says whether
    any reply is awaited (stalls are looked for only then).
    """

    def __init__(
        self,
        consumer: Consumer,
        serde: Serde,
        topic: str,
        on_chunk: Callable[[Chunk], None],
        on_idle: Callable[[], object] = lambda: None,
        waiting: Callable[[], bool] = lambda: True,
    ) -> None:
        self._consumer = consumer
        self._serde = serde
        self.topic = topic
        self._on_chunk = on_chunk
        self._on_idle = on_idle
        self._stop = threading.Event()
        self._stalls = StallGuard(consumer, interval_s=STALL_CHECK_S, wanted=waiting)
        self._thread = threading.Thread(
            target=self._run, name=f"dspex-replies-{topic}", daemon=True
        )

    def start(self, timeout_s: float = 10.0) -> None:
        """Assign all partitions at their end offsets, then start polling (blocking call)."""
        starts = end_offsets(self._consumer, self.topic, timeout_s)
        self._consumer.assign(starts)
        self._stalls.assigned(starts)
        self._thread.start()
        logger.info("listening for replies topic=%s", self.topic)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the poll thread and close the consumer (blocking call)."""
        self._stop.set()
        if self._thread.ident is None:  # never started: the consumer is still ours to close
            self._stalls.close()
            self._consumer.close()
        else:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._poll_once()
        finally:
            self._stalls.close()
            self._consumer.close()
            logger.info("stopped listening for replies topic=%s", self.topic)

    def _poll_once(self) -> None:
        try:
            message = self._consumer.poll(0.1)
            if message is not None:
                self._handle(message)
            self._on_idle()
            self._stalls.check()
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
