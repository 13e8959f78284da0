"""Producing a worker's records and knowing when the broker has them.

:meth:`Publisher.send` encodes and produces one record and returns a future
that resolves when the broker acknowledges it (the delivery report) or fails
with :class:`DeliveryFailed`. The worker commits a request's offset only once
every future of that request has resolved.

:class:`Producer` is the seam: the part of confluent-kafka's producer that a
publisher (and a job's progress emitter) calls, so a test can hand in a fake.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, Protocol

from confluent_kafka import KafkaError, Message

from dspex.streams import tracing
from dspex.streams.errors import RetryableError
from dspex.streams.serde import Serde

logger = logging.getLogger(__name__)

_FULL_QUEUE_BACKOFF_S = 0.005
DELIVERY_POLL_S = 0.005


DeliveryReport = Callable[[KafkaError | None, Message], None]
"""librdkafka's delivery callback: the error (None: delivered) and the message."""


class Producer(Protocol):
    """What DSPex calls on a confluent-kafka ``Producer``; ``confluent_kafka.Producer`` is one.

    Delivery reports are served by ``poll`` and ``flush`` (never inside ``produce``);
    ``len()`` counts the records whose report has not been served yet.
    """

    def produce(
        self,
        topic: str,
        value: bytes | None,
        key: str | bytes | None = None,
        *,
        on_delivery: DeliveryReport | None = None,
        headers: list[tuple[str, str | bytes | None]] | None = None,
        partition: int = -1,
    ) -> None:
        """Queue one record (partition -1: the partitioner's); BufferError when queue is full."""
        ...

    def poll(self, timeout: float = -1) -> int:
        """Serve the delivery reports that are ready; how many were served."""
        ...

    def flush(self, timeout: float = -1) -> int:
        """Wait until every record is delivered (or ``timeout``); how many are left."""
        ...

    def __len__(self) -> int: ...


class DeliveryFailed(RetryableError):
    """The broker did not acknowledge a record (librdkafka gave up on it)."""

    def __init__(self, topic: str, error: KafkaError) -> None:
        self.topic = topic
        self.error = error
        super().__init__(f"topic={topic}: delivery failed: {error.str()}")


class Publisher:
    """An idempotent producer wrapped for asyncio: produce now, await the acknowledgement."""

    def __init__(self, producer: Producer, serde: Serde, loop: asyncio.AbstractEventLoop) -> None:
        self._producer = producer
        self._serde = serde
        self._loop = loop
        self._loop_thread = threading.get_ident() if _running_loop() is loop else None
        self._wake: asyncio.Event | None = None

    async def send(
        self, topic: str, key: str | bytes | None, schema: str, record: Mapping[str, Any]
    ) -> asyncio.Future[None]:
        """Produce ``record`` as ``schema`` to ``topic``; the future resolves on delivery."""
        value = self._serde.encode(schema, record, topic=topic)
        return await self.send_bytes(topic, key, value)

    async def send_bytes(
        self,
        topic: str,
        key: str | bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes | None]] = (),
        partition: int | None = None,
    ) -> asyncio.Future[None]:
        """Produce already-encoded ``value`` (and ``headers``, to ``partition`` when given);
        the future resolves on delivery."""
        delivered: asyncio.Future[None] = self._loop.create_future()
        callback = partial(self._on_delivery, delivered, topic)
        headers = tracing.inject(headers)  # the current span's traceparent, when tracing
        extra: dict[str, Any] = {"headers": list(headers)} if headers else {}
        if partition is not None:
            extra["partition"] = partition
        while True:
            try:
                self._producer.produce(topic, value, key, on_delivery=callback, **extra)
                if self._wake is not None:
                    self._wake.set()
                return delivered
            except BufferError:  # local queue full: let deliveries drain, then try again
                self._producer.poll(0)
                await asyncio.sleep(_FULL_QUEUE_BACKOFF_S)

    def poll(self) -> int:
        """Serve delivery reports (call often, from the event loop)."""
        served: int = self._producer.poll(0)
        return served

    def waiting(self) -> int:
        """Records produced whose delivery report has not been served yet."""
        return len(self._producer)

    def wake_on_send(self, wake: asyncio.Event | None) -> None:
        """Set ``wake`` after every produce (None: stop); see :func:`serve_deliveries`."""
        self._wake = wake

    async def flush(self, timeout_s: float) -> int:
        """Wait (in a thread) until every record is delivered; returns how many are left."""
        left: int = await asyncio.to_thread(self._producer.flush, timeout_s)
        return left

    def _on_delivery(
        self, delivered: asyncio.Future[None], topic: str, err: KafkaError | None, _: Message
    ) -> None:
        if threading.get_ident() == self._loop_thread:  # poll() on the loop: settle now
            _settle(delivered, topic, err)
        else:  # flush() serves reports from a worker thread: hand over to the loop's thread
            self._loop.call_soon_threadsafe(_settle, delivered, topic, err)


async def serve_deliveries(*publishers: Publisher) -> None:
    """Serve the publishers' delivery reports on the loop until cancelled.

    While any record waits for its report they are polled every DELIVERY_POLL_S;
    an idle agent sleeps until its next send instead of waking 200 times a second.
    """
    wake = asyncio.Event()
    for publisher in publishers:
        publisher.wake_on_send(wake)
    try:
        while True:
            for publisher in publishers:
                publisher.poll()
            if any(publisher.waiting() for publisher in publishers):
                await asyncio.sleep(DELIVERY_POLL_S)
            else:  # nothing can be produced between this check and the wait: one thread
                wake.clear()
                await wake.wait()
    finally:
        for publisher in publishers:
            publisher.wake_on_send(None)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _settle(delivered: asyncio.Future[None], topic: str, err: KafkaError | None) -> None:
    if delivered.done():
        return
    if err is None:
        delivered.set_result(None)
    else:
        delivered.set_exception(DeliveryFailed(topic, err))
