"""Tumbling windows over execution telemetry: the pure half of the metrics agent.

A :class:`Sample` is one execution Telemetry record, cleaned: values that cannot
be right (negative, NaN or infinite latencies, negative tokens or costs) are
dropped from the aggregate they would poison, while the execution still counts.
:class:`Windows` files each sample by *event time* (``emitted_at``) into a
tumbling window per series (program, pool, variant), and closes a window once
the wall clock passes its end plus a grace period, so telemetry arriving a
little out of order is still counted where it belongs. Closed windows become
MetricSnapshot records (:func:`snapshots`). No Kafka here: unit-tested as is.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dspex.schemas import records
from dspex.schemas.records import Record
from dspex.schemas.times import to_ms

SeriesKey = tuple[str, str, str, str]  # (program, pool, variant, tenant or "")
INLINE = "inline"  # program label of inline signatures (no program_id)
UNKNOWN = "unknown"


class BadTelemetry(ValueError):
    """An execution record that cannot be counted (no outcome, no timestamp)."""


def _finite(value: Any, *, scale: float = 1.0) -> float | None:
    """A non-negative finite float, else ``None``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number * scale if math.isfinite(number) and number >= 0 else None


def _label(value: Any, default: str) -> str:
    return str(value)[:100] if isinstance(value, str) and value else default


@dataclass(frozen=True, slots=True)
class Sample:
    """One execution as the metrics count it."""

    program: str
    pool: str
    variant: str
    at_ms: int
    success: bool
    latency_ms: float | None = None
    queue_wait_ms: float | None = None
    tokens: int = 0
    cost_usd: float = 0.0
    tenant: str = ""
    """The tenant the router stamped on the request (docs/tenants.md); "": shared topics."""

    @property
    def key(self) -> SeriesKey:
        return (self.program, self.pool, self.variant, self.tenant)

    @property
    def outcome(self) -> str:
        return "ok" if self.success else "error"

    @classmethod
    def of(cls, record: Mapping[str, Any]) -> Sample | None:
        """The sample of a decoded Telemetry record: an execution, or a pipeline stage (kind
        ``stage``, program ``<pipeline>/<stage>``); ``None`` for other kinds."""
        if record.get("kind") not in ("execution", "stage"):
            return None
        success, at_ms = record.get("success"), to_ms(record.get("emitted_at"))
        if not isinstance(success, bool):
            raise BadTelemetry("execution telemetry without success")
        if at_ms is None:
            raise BadTelemetry("execution telemetry without emitted_at")
        tokens = sum(
            max(0, int(record.get(f) or 0)) for f in ("prompt_tokens", "completion_tokens")
        )
        return cls(
            program=_label(record.get("program_id"), INLINE),
            pool=_label(record.get("pool"), UNKNOWN),
            variant=_label(record.get("variant"), UNKNOWN),
            at_ms=at_ms,
            success=success,
            latency_ms=_finite(record.get("latency_ms")),
            queue_wait_ms=_finite(record.get("queue_wait_ms")),
            tokens=tokens,
            cost_usd=_finite(record.get("cost_usd")) or 0.0,
            tenant=_label(record.get("tenant"), ""),
        )


@dataclass
class Reservoir:
    """Up to ``size`` values, a uniform sample of all offered (exact until it fills)."""

    size: int
    values: list[float] = field(default_factory=list)
    seen: int = 0

    def offer(self, value: float, rng: random.Random) -> None:
        self.seen += 1
        if len(self.values) < self.size:
            self.values.append(value)
            return
        slot = rng.randrange(self.seen)
        if slot < self.size:
            self.values[slot] = value


@dataclass
class Bucket:
    """One series' aggregate in one window."""

    size: int
    count: int = 0
    errors: int = 0
    tokens: int = 0
    cost_usd: float = 0.0
    latencies: Reservoir = field(init=False)
    waits: Reservoir = field(init=False)

    def __post_init__(self) -> None:
        self.latencies, self.waits = Reservoir(self.size), Reservoir(self.size)

    def add(self, sample: Sample, rng: random.Random) -> None:
        self.count += 1
        self.errors += 0 if sample.success else 1
        self.tokens += sample.tokens
        self.cost_usd += sample.cost_usd
        if sample.latency_ms is not None:
            self.latencies.offer(sample.latency_ms, rng)
        if sample.queue_wait_ms is not None:
            self.waits.offer(sample.queue_wait_ms, rng)

    def merge(self, other: Bucket) -> None:
        """Fold ``other`` in (pool totals); latency samples are concatenated."""
        self.count += other.count
        self.errors += other.errors
        self.tokens += other.tokens
        self.cost_usd += other.cost_usd
        self.latencies.values.extend(other.latencies.values)
        self.waits.values.extend(other.waits.values)


@dataclass(frozen=True)
class Closed:
    """A window that will not change any more: [start_ms, end_ms) and its series."""

    start_ms: int
    end_ms: int
    buckets: dict[SeriesKey, Bucket]


class Windows:
    """Tumbling event-time windows per series, closed by the wall clock after a grace."""

    def __init__(
        self, window_s: float, grace_s: float, max_samples: int, rng: random.Random | None = None
    ) -> None:
        self.window_ms = max(1, round(window_s * 1000))
        self.grace_ms = max(0, round(grace_s * 1000))
        self.max_samples = max_samples
        self._rng = rng or random.Random(0)  # noqa: S311 - reservoir sampling, not security
        self._open: dict[int, dict[SeriesKey, Bucket]] = {}

    def start_of(self, at_ms: int) -> int:
        return at_ms - at_ms % self.window_ms

    def add(self, sample: Sample, now_ms: int) -> bool:
        """File ``sample``; ``False`` when its window already closed (too late to count)."""
        at_ms = min(sample.at_ms, now_ms)  # a clock ahead of ours: count it as now
        start = self.start_of(at_ms)
        if self._closes_by(start, now_ms):
            return False
        buckets = self._open.setdefault(start, {})
        bucket = buckets.get(sample.key)
        if bucket is None:
            bucket = buckets[sample.key] = Bucket(self.max_samples)
        bucket.add(sample, self._rng)
        return True

    def close_due(self, now_ms: int) -> list[Closed]:
        """Windows whose end plus grace has passed, oldest first, removed from memory."""
        due = sorted(start for start in self._open if self._closes_by(start, now_ms))
        return [Closed(s, s + self.window_ms, self._open.pop(s)) for s in due]

    def _closes_by(self, start: int, now_ms: int) -> bool:
        return start + self.window_ms + self.grace_ms <= now_ms

    def __len__(self) -> int:
        return len(self._open)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in (0, 1]); ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def snapshots(closed: Closed, window_s: float) -> list[tuple[str, Record]]:
    """(metric name, MetricSnapshot) for every series of ``closed`` and each pool's total.

    ``requests`` (labels program_id, pool, variant, and tenant for a tenant's requests)
    and ``pool.requests`` (pool) carry
    counts, rates, end-to-end latency percentiles, error rate, tokens and cost;
    ``queue_wait`` carries queue-wait percentiles in the latency fields.
    """
    out: list[tuple[str, Record]] = []
    pools: dict[str, Bucket] = {}
    for (program, pool, variant, tenant), bucket in sorted(closed.buckets.items()):
        labels = {"program_id": program, "pool": pool, "variant": variant}
        if tenant:
            labels["tenant"] = tenant
        out.append(("requests", _record("requests", labels, closed, bucket, window_s)))
        if bucket.waits.values:
            out.append(("queue_wait", _waits(labels, closed, bucket, window_s)))
        pools.setdefault(pool, Bucket(bucket.size)).merge(bucket)
    for pool, total in sorted(pools.items()):
        out.append(
            ("pool.requests", _record("pool.requests", {"pool": pool}, closed, total, window_s))
        )
    return out


def _record(
    name: str, labels: dict[str, str], closed: Closed, bucket: Bucket, window_s: float
) -> Record:
    latencies = bucket.latencies.values
    return records.metric_snapshot(
        name=name,
        window_start=closed.start_ms,
        window_end=closed.end_ms,
        labels=labels,
        count=bucket.count,
        rate_per_s=bucket.count / window_s,
        latency_p50_ms=percentile(latencies, 0.50),
        latency_p95_ms=percentile(latencies, 0.95),
        latency_p99_ms=percentile(latencies, 0.99),
        error_rate=bucket.errors / bucket.count if bucket.count else 0.0,
        tokens=bucket.tokens,
        cost_usd=bucket.cost_usd,
    )


def _waits(labels: dict[str, str], closed: Closed, bucket: Bucket, window_s: float) -> Record:
    waits = bucket.waits.values
    return records.metric_snapshot(
        name="queue_wait",
        window_start=closed.start_ms,
        window_end=closed.end_ms,
        labels=labels,
        count=len(waits),
        rate_per_s=len(waits) / window_s,
        latency_p50_ms=percentile(waits, 0.50),
        latency_p95_ms=percentile(waits, 0.95),
        latency_p99_ms=percentile(waits, 0.99),
    )


def gauge(
    name: str, labels: Mapping[str, str], start_ms: int, end_ms: int, value: float | None
) -> Record:
    """A MetricSnapshot with only a gauge ``value`` (e.g. ``pool.lag``)."""
    return records.metric_snapshot(
        name=name, window_start=start_ms, window_end=end_ms, labels=labels, value=value
    )


def totals(records: Iterable[Record]) -> int:
    """Sum of ``count`` over snapshot records (for logs and tests)."""
    return sum(int(r.get("count") or 0) for r in records)
