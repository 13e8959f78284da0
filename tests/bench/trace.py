"""Where a paced request's time went, stage by stage, from the records it left on Kafka.

Each request leaves timestamps behind: the client's produce time (the ``requests``
record), the router's (the ``pool.general`` record), the worker's received / started /
finished times (its Execution record) and the worker's produce time (the final
``responses`` record); the client adds when it was scheduled and when it had the
answer. The clock is one machine's, so the differences are exact to Kafka's
millisecond timestamps. :func:`breakdown` reports every stage's p50/p99 over all
requests and over the slowest 1 %, and when in the phase the slowest ones were
scheduled — enough to tell a queue behind a burst from a stall or a slow stage.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from dspex.streams import kafka
from dspex.streams.reader import watermarks
from dspex.streams.serde import make_serde
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics
from tests.bench.stats import percentile

STAGES: tuple[tuple[str, str, str], ...] = (
    ("client_send", "scheduled", "requests"),
    ("router", "requests", "pool"),
    ("worker_fetch", "pool", "received"),
    ("worker_queue", "received", "started"),
    ("run", "started", "finished"),
    ("answer_send", "finished", "responses"),
    ("client_receive", "responses", "answered"),
)


@dataclass(frozen=True)
class Sample:
    """One paced request as the client saw it (epoch milliseconds)."""

    request_id: str
    scheduled_ms: float
    answered_ms: float


def breakdown(settings: Settings, samples: Sequence[Sample]) -> dict[str, Any]:
    """Stage percentiles over all samples and over the slowest 1 %; needs the topics' records."""
    if not samples:
        return {}
    stamps: dict[str, dict[str, float]] = {
        s.request_id: {"scheduled": s.scheduled_ms, "answered": s.answered_ms} for s in samples
    }
    since_ms = int(min(s.scheduled_ms for s in samples)) - 1000
    for short, label in (
        ("requests", "requests"),
        ("pool.general", "pool"),
        ("responses", "responses"),
    ):
        for record, timestamp in _records(settings, short, since_ms):
            found = stamps.get(str(record.get("request_id")))
            if found is not None and (label != "responses" or record.get("final", True)):
                found[label] = float(timestamp)
    for record, _ in _records(settings, "executions", since_ms):
        found = stamps.get(str(record.get("request_id")))
        if found is not None:
            timings = record["timings"]
            for key in ("received", "started", "finished"):
                found[key] = _epoch_ms(timings[f"{key}_at"])
    complete = [s for s in stamps.values() if all(k in s for _, a, b in STAGES for k in (a, b))]
    total = sorted(complete, key=lambda s: s["answered"] - s["scheduled"])
    slowest = total[-max(1, len(total) // 100) :] if total else []
    start = min(s["scheduled"] for s in stamps.values())
    return {
        "traced": len(complete),
        "of": len(samples),
        "all": _stages(complete),
        "slowest_1pct": _stages(slowest),
        "slowest_scheduled_at_s": sorted(
            round((s["scheduled"] - start) / 1000, 2) for s in slowest
        ),
    }


def _stages(rows: Iterable[dict[str, float]]) -> dict[str, dict[str, float]]:
    rows = list(rows)
    out = {}
    for name, a, b in STAGES:
        values = [r[b] - r[a] for r in rows]
        out[name] = {
            "p50": round(percentile(values, 50), 2),
            "p99": round(percentile(values, 99), 2),
        }
    return out


def _records(settings: Settings, short: str, since_ms: int) -> Iterable[tuple[dict[str, Any], int]]:
    """Every decodable record of a bench topic produced since ``since_ms``, with its timestamp."""
    topic = Topics(settings.topics).name(short)
    serde = make_serde(settings)
    consumer: Consumer = kafka.consumer(settings, f"bench-trace-{uuid.uuid4().hex}")
    try:
        ends = {p: high for p, (_, high) in watermarks(consumer, topic, 10.0).items()}
        starts = consumer.offsets_for_times(
            [TopicPartition(topic, p, since_ms) for p in ends], timeout=10
        )
        left = {tp.partition for tp in starts if 0 <= tp.offset < ends[tp.partition]}
        consumer.assign([tp for tp in starts if tp.partition in left])
        while left:
            for message in consumer.consume(1000, 1.0):
                partition, offset, value = message.partition(), message.offset(), message.value()
                if message.error() is not None or partition is None or offset is None:
                    continue
                if offset + 1 >= ends[partition]:
                    left.discard(partition)
                if value is not None:
                    yield serde.decode(value, topic=topic).record, message.timestamp()[1]
    finally:
        consumer.close()


def _epoch_ms(value: Any) -> float:
    return float(value.timestamp() * 1000) if hasattr(value, "timestamp") else float(value)
