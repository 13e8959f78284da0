"""EXPERIMENT, not a product router: the router's request path on confluent-kafka.

The B arm of :mod:`tests.bench.router_ab`. It runs the product router's own
``router.RouterHandler`` and ``plumbing.catalog.CompactedReader``
(the same decisions, the same records out) but consumes ``requests`` with a
confluent-kafka consumer in the ``<prefix>router`` group, the way the pool worker
does, instead of through faust. Offsets are committed only up to the lowest
request whose records are not yet acknowledged (``plumbing.offsets.OffsetTracker``).

What it leaves out, so it is no replacement for ``python -m dspex.agents router``: the
``retry`` topic, the drain of unacknowledged sends on a rebalance, resends of a
failed send. It exists to measure what the faust layer costs per request.
Run as ``python -m tests.bench.ckrouter`` with the agents' environment.
"""

from __future__ import annotations

import asyncio
import signal
import time

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from dspex.agents.plumbing.messages import Consumed, Outgoing
from dspex.agents.plumbing.offsets import OffsetTracker
from dspex.agents.router.router import RouterApp, make_router
from dspex.streams import kafka
from dspex.streams.settings import Settings, load_settings
from dspex.streams.topics import Topics

BATCH = 500
POLL_TIMEOUT_S = 0.1
COMMIT_INTERVAL_S = 0.5

TP = tuple[str, int]


class ConfluentRequestLoop:
    """Consume ``requests``, decide with the router's handler, produce, commit what is acked."""

    def __init__(self, settings: Settings, router: RouterApp) -> None:
        self._router = router
        self._consumer: Consumer = kafka.consumer(settings, f"{settings.topics.prefix}router")
        self._producer: Producer = kafka.producer(settings)
        self._topic = Topics(settings.topics).name("requests")
        self._tracker = OffsetTracker()
        self._unacked: dict[tuple[TP, int], int] = {}
        self.failed_sends = 0

    async def run(self, stop: asyncio.Event) -> None:
        self._consumer.subscribe([self._topic])
        last_commit = time.monotonic()
        try:
            while not stop.is_set():
                # consume(n, t) waits for n messages or t: wait for one, take the rest at once
                first = await asyncio.to_thread(self._consumer.consume, 1, POLL_TIMEOUT_S)
                batch = [*first, *self._consumer.consume(BATCH, 0)] if first else []
                for message in batch:
                    self._handle(message)
                self._producer.poll(0)
                if time.monotonic() - last_commit >= COMMIT_INTERVAL_S:
                    last_commit = time.monotonic()
                    self._commit()
        finally:
            await asyncio.to_thread(self._producer.flush, 10)
            self._commit()
            self._consumer.close()

    def _handle(self, message: Message) -> None:
        error = message.error()
        if error is not None:
            if error.code() != KafkaError._PARTITION_EOF:
                print(f"consume error: {error}", flush=True)
            return
        tp: TP = (str(message.topic()), int(message.partition() or 0))
        offset = int(message.offset() or 0)
        original = Consumed.from_message(message)
        outs = self._router.handler.handle_request(original)
        self._tracker.started(tp, offset)
        self._unacked[(tp, offset)] = len(outs)
        for out in outs:
            self._produce(out, tp, offset)
        if not outs:
            self._acked(tp, offset)

    def _produce(self, out: Outgoing, tp: TP, offset: int) -> None:
        def delivered(err: KafkaError | None, _: Message) -> None:
            if err is not None:
                self.failed_sends += 1  # left unacked: a restart redoes the request
                print(f"send failed topic={out.topic} error={err}", flush=True)
                return
            self._acked(tp, offset)

        headers: list[tuple[str, str | bytes | None]] | None = list(out.headers) or None
        self._producer.produce(
            out.topic, out.value, out.key, headers=headers, on_delivery=delivered
        )

    def _acked(self, tp: TP, offset: int) -> None:
        left = self._unacked.get((tp, offset), 0) - 1
        if left > 0:
            self._unacked[(tp, offset)] = left
            return
        self._unacked.pop((tp, offset), None)
        self._tracker.finished(tp, offset)

    def _commit(self) -> None:
        positions = self._tracker.uncommitted()
        if positions:
            offsets = [TopicPartition(t, p, o) for (t, p), o in positions.items()]
            try:
                self._consumer.commit(offsets=offsets, asynchronous=False)
            except KafkaException as exc:  # e.g. mid-rebalance: the next commit catches up
                print(f"commit failed: {exc}", flush=True)
                return
            self._tracker.committed(positions)


async def serve(settings: Settings) -> None:
    router = make_router(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    live = await asyncio.to_thread(kafka.admin_client(settings).list_topics, timeout=10)
    partitions = {name: len(meta.partitions) for name, meta in live.topics.items()}
    await router.reader.start(partitions)
    try:
        await asyncio.wait_for(router.reader.ready.wait(), 60)
        await ConfluentRequestLoop(settings, router).run(stop)
    finally:
        await router.reader.stop()


if __name__ == "__main__":
    asyncio.run(serve(load_settings()))
