"""Figure 1, the Kafka ceiling: a bare confluent-kafka 3-hop relay in one Python process.

client -> ``requests`` -> relay -> ``pool.general`` -> relay -> ``responses`` -> client
(a cache miss's path), and the 2-hop relay client -> ``requests`` -> relay ->
``responses`` -> client (a cache hit's path),
with the serde's encoded sizes of the real records, an idempotent ``acks=all``
producer (DSPex's guarantees) batching up to 10,000 messages, and no decoding, DSPy
or bookkeeping: the most this machine's broker and one Python process can move.
It runs twice: ``linger.ms=0`` (lowest latency) and ``linger.ms=5`` (DSPex's producer
default; fuller batches at saturation); the ceiling is the better of the two.
Consumers keep librdkafka's default ``fetch.wait.max.ms`` (500: a fetch returns as
soon as data arrives); lowering it made the idle broker burn most of a core.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, Message, Producer, TopicPartition

from dspex.streams import kafka
from dspex.streams.ops.admin import ensure_topics
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics
from tests.bench.messages import Payloads
from tests.bench.stats import latency_ms, rate

HOPS = ("requests", "pool.general", "responses")
TWO_HOPS = ("requests", "responses")
PRODUCER_TUNING: dict[str, Any] = {
    "linger.ms": 0,
    "batch.num.messages": 10_000,
    "queue.buffering.max.messages": 200_000,
    "compression.type": "none",
}
CONSUMER_TUNING: dict[str, Any] = {"enable.partition.eof": False}
_BATCH = 1_000


@dataclass
class Relay:
    """The hops' clients in one thread; ``pump()`` moves whatever is ready."""

    settings: Settings
    payloads: Payloads
    linger_ms: float = 0
    hops: tuple[str, ...] = HOPS
    sent_at: dict[bytes, float] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        topics = Topics(self.settings.topics)
        self.names = [topics.name(short) for short in self.hops]
        ensure_topics(
            kafka.admin_client(self.settings),
            [(n, topics.spec(s)) for n, s in zip(self.names, self.hops, strict=True)],
        )
        self.producer: Producer = kafka.producer(
            self.settings, **{**PRODUCER_TUNING, "linger.ms": self.linger_ms}
        )
        parts = [topics.spec(short).partitions for short in self.hops]
        self.consumers = [self._consumer(n, p) for n, p in zip(self.names, parts, strict=True)]
        # what each relay step forwards: a pool record, then the response
        self.forwards = [self.payloads.pool, self.payloads.response][-(len(self.hops) - 1) :]

    def _consumer(self, topic: str, partitions: int) -> Consumer:
        group = f"{topic}.relay{self.linger_ms:g}.{len(self.hops)}"
        consumer = kafka.consumer(self.settings, group, **CONSUMER_TUNING)
        consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
        return consumer

    def send(self, i: int, scheduled: float | None = None) -> None:
        key = str(i).encode()
        self.sent_at[key] = scheduled if scheduled is not None else time.perf_counter()
        self._produce(self.names[0], key, self.payloads.request)

    def pump(self) -> None:
        *steps, responses = self.consumers
        for consumer, topic, value in zip(steps, self.names[1:], self.forwards, strict=True):
            for msg in _ok(consumer.consume(_BATCH, 0)):
                self._produce(topic, msg.key(), value)
        now = time.perf_counter()
        for msg in _ok(responses.consume(_BATCH, 0.0005)):
            started = self.sent_at.pop(msg.key() or b"", None)
            if started is not None:
                self.latencies.append(now - started)
        self.producer.poll(0)

    def _produce(self, topic: str, key: bytes | None, value: bytes) -> None:
        while True:
            try:
                self.producer.produce(topic, value, key)
                return
            except BufferError:
                self.producer.poll(0.01)

    def close(self) -> None:
        self.producer.flush(10)
        for consumer in self.consumers:
            consumer.close()


def _ok(messages: list[Message]) -> list[Message]:
    return [m for m in messages if m.error() is None]


def saturate(
    relay: Relay, count: int, window: int, offset: int = 0, give_up_s: float = 120
) -> dict[str, Any]:
    """Send ``count`` requests as fast as the relay answers (at most ``window`` outstanding)."""
    relay.latencies.clear()
    relay.sent_at.clear()
    started = time.perf_counter()
    sent = 0
    while len(relay.latencies) < count and time.perf_counter() - started < give_up_s:
        while sent < count and len(relay.sent_at) < window:
            relay.send(offset + sent)
            sent += 1
        relay.pump()
    elapsed = time.perf_counter() - started
    answered = len(relay.latencies)
    return {
        "messages": count,
        "elapsed_s": round(elapsed, 3),
        "per_s": rate(answered, elapsed),
        "lost": count - answered,
    }


def paced(
    relay: Relay, per_s: float, duration_s: float, offset: int, give_up_s: float = 30
) -> dict[str, Any]:
    """Open loop at ``per_s``: latency from each message's scheduled send time to its answer."""
    relay.latencies.clear()
    relay.sent_at.clear()
    count = max(int(per_s * duration_s), 1)
    start = time.perf_counter() + 0.05
    sent = 0
    while len(relay.latencies) < count and time.perf_counter() - start < duration_s + give_up_s:
        now = time.perf_counter()
        while sent < count and start + sent / per_s <= now:
            relay.send(offset + sent, start + sent / per_s)
            sent += 1
        relay.pump()
    return {
        "rate_per_s": per_s,
        **latency_ms(relay.latencies),
        "lost": count - len(relay.latencies),
    }
