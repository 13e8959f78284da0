"""What the web dashboard shows, folded from records: the pure half of the dashboard.

:class:`Board` takes the records a :class:`~dspex.streams.reader.TopicFollower`
reads from ``metrics`` (MetricSnapshots), ``routing`` (RoutingTables, whole) and
``dlq`` (DeadLetters) and keeps the last ``history_s`` seconds of them in the shape
the page draws: one point per closed window and pool, the latest health of each
worker, every routing-table version still on the topic per program, and dead
letters counted by where and why they failed. :meth:`Board.state` is the JSON the
page receives, first from ``/api/state`` and then on every change over server-sent
events. No Kafka and no HTTP here: unit-tested as is.

MetricSnapshots with names the board does not know (``pipeline.*``, ``session.*``
or any other) are kept as gauges, latest per name and labels, and shown in the
page's "Pipeline runs, sessions and other metrics" panel: a producer of such
figures needs no dashboard change.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dspex.schemas.records import Record
from dspex.schemas.times import to_ms

POOL_FIELDS = {
    "rate_per_s": "rate",
    "count": "count",
    "latency_p50_ms": "p50",
    "latency_p95_ms": "p95",
    "latency_p99_ms": "p99",
    "error_rate": "errors",
}
WORKER_GAUGES = {
    "worker.in_flight": "in_flight",
    "worker.memory_bytes": "memory_bytes",
    "worker.breaker_open": "breaker_open",
}
KNOWN = {"pool.requests", "pool.lag", "requests", "queue_wait", *WORKER_GAUGES}
MAX_TABLES = 200  # routing-table versions kept per program
MAX_DEAD = 50_000  # dead letters kept for counting; beyond it the oldest go and counts say "+"
RECENT_DEAD = 20  # dead letters listed one by one
MESSAGE_CHARS = 300

Json = dict[str, Any]


def _ms(value: Any) -> int:
    return to_ms(value) or 0


def _labels_key(labels: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


@dataclass
class Board:
    """The dashboard's state: fed one record at a time, read as JSON."""

    history_s: float
    window_s: float
    clock: Callable[[], float] = time.time
    version: int = 0
    pools: dict[str, dict[int, Json]] = field(default_factory=dict)
    workers: dict[tuple[str, str], Json] = field(default_factory=dict)
    worker_points: dict[tuple[str, str], dict[int, Json]] = field(default_factory=dict)
    series: dict[tuple[str, str, str], Json] = field(default_factory=dict)
    tables: dict[str, dict[int, Json]] = field(default_factory=dict)
    dead: list[Json] = field(default_factory=list)
    dead_dropped: int = 0
    problem: str | None = None  # why the topics cannot be read now, shown on the page
    gauges: dict[tuple[str, tuple[tuple[str, str], ...]], Json] = field(default_factory=dict)

    # ---- records in ---------------------------------------------------------------

    def take_snapshot(self, record: Record) -> None:
        """One MetricSnapshot from the ``metrics`` topic."""
        name, labels = str(record["name"]), dict(record.get("labels") or {})
        end = _ms(record.get("window_end"))
        if name in ("pool.requests", "pool.lag") and labels.get("pool"):
            point = self.pools.setdefault(labels["pool"], {}).setdefault(end, {"t": end})
            if name == "pool.lag":
                point["lag"] = record.get("value")
            else:
                point.update({short: record.get(f) for f, short in POOL_FIELDS.items()})
        elif name in WORKER_GAUGES and labels.get("worker"):
            self._take_worker(labels, WORKER_GAUGES[name], record.get("value"), end)
        elif name == "requests":
            self._take_series(labels, record, end)
        elif name not in KNOWN:
            self._take_gauge(name, labels, record, end)
        self.version += 1

    def _take_worker(self, labels: Mapping[str, str], what: str, value: Any, end: int) -> None:
        key = (labels.get("pool", ""), labels["worker"])
        self.worker_points.setdefault(key, {}).setdefault(end, {"t": end})[what] = value
        worker = self.workers.setdefault(key, {"pool": key[0], "worker": key[1], "t": end})
        if end >= worker["t"]:
            worker["t"] = end
            worker[what] = value

    def _take_series(self, labels: Mapping[str, str], record: Record, end: int) -> None:
        key = (labels.get("program_id", ""), labels.get("pool", ""), labels.get("variant", ""))
        latest = self.series.get(key)
        if latest is None or latest["t"] <= end:
            fields = {short: record.get(f) for f, short in POOL_FIELDS.items()}
            self.series[key] = {"program": key[0], "pool": key[1], "variant": key[2], "t": end}
            self.series[key].update(fields)

    def _take_gauge(self, name: str, labels: dict[str, str], record: Record, end: int) -> None:
        key = (name, _labels_key(labels))
        latest = self.gauges.get(key)
        if latest is None or latest["t"] <= end:
            value = record.get("value")
            self.gauges[key] = {
                "name": name,
                "labels": labels,
                "value": value if value is not None else record.get("count"),
                "t": end,
            }

    def take_table(self, key: str, record: Record | None) -> None:
        """One RoutingTable (``None``: the program's table was deleted)."""
        self.version += 1
        if record is None:
            self.tables.pop(key, None)
            return
        variants = record.get("variants") or []
        total = sum(max(0.0, float(v["weight"])) for v in variants)
        versions = self.tables.setdefault(str(record["program_id"]), {})
        versions[int(record["version"])] = {
            "version": int(record["version"]),
            "t": _ms(record.get("created_at")),
            "objective": record.get("objective", ""),
            "reason": record.get("reason", ""),
            "variants": [
                {
                    "name": v["name"],
                    "pool": v.get("pool"),
                    "model": v.get("model"),
                    "weight": float(v["weight"]),
                    "share": max(0.0, float(v["weight"])) / total if total > 0 else 0.0,
                }
                for v in variants
            ],
        }
        for old in sorted(versions)[:-MAX_TABLES]:
            del versions[old]

    def take_dead_letter(self, record: Record) -> None:
        """One DeadLetter from the ``dlq`` topic."""
        self.version += 1
        if len(self.dead) >= MAX_DEAD:
            self.dead = self.dead[MAX_DEAD // 10 :]  # seldom: one cut of a tenth
            self.dead_dropped += MAX_DEAD // 10
        self.dead.append(
            {
                "t": _ms(record.get("failed_at")),
                "component": record.get("component", ""),
                "stage": record.get("stage", ""),
                "error_class": record.get("error_class", ""),
                "message": str(record.get("error_message", ""))[:MESSAGE_CHARS],
                "topic": record.get("original_topic", ""),
                "request_id": record.get("request_id"),
            }
        )

    # ---- JSON out -----------------------------------------------------------------

    def forget_old(self) -> None:
        """Drop what ended before the history began (routing versions stay: they are few)."""
        since = self.since_ms()
        for points in self.pools.values():
            for t in [t for t in points if t < since]:
                del points[t]
        self.workers = {k: v for k, v in self.workers.items() if v["t"] >= since}
        for key, points in list(self.worker_points.items()):
            kept = {t: p for t, p in points.items() if t >= since}
            if kept:
                self.worker_points[key] = kept
            else:
                del self.worker_points[key]
        self.series = {k: v for k, v in self.series.items() if v["t"] >= since}
        self.gauges = {k: v for k, v in self.gauges.items() if v["t"] >= since}
        # partitions interleave: dead letters arrive roughly, not strictly, in time order
        self.dead = [d for d in self.dead if d["t"] >= since]

    def since_ms(self) -> int:
        return int((self.clock() - self.history_s) * 1000)

    def state(self) -> Json:
        """Everything the page draws, as JSON-ready values."""
        self.forget_old()
        return {
            "version": self.version,
            "now": int(self.clock() * 1000),
            "problem": self.problem,
            "history_s": self.history_s,
            "window_s": self.window_s,
            "pools": {p: [pts[t] for t in sorted(pts)] for p, pts in sorted(self.pools.items())},
            "workers": [self.workers[k] for k in sorted(self.workers)],
            "worker_points": {
                f"{pool}/{worker}": [points[t] for t in sorted(points)]
                for (pool, worker), points in sorted(self.worker_points.items())
            },
            "programs": self._programs(),
            "dlq": self._dlq(),
            "gauges": [self.gauges[k] for k in sorted(self.gauges)],
        }

    def _programs(self) -> dict[str, Json]:
        names = sorted({*self.tables, *(program for program, _, _ in self.series)})
        return {
            name: {
                "tables": [v for _, v in sorted(self.tables.get(name, {}).items())],
                "series": [self.series[k] for k in sorted(self.series) if k[0] == name],
            }
            for name in names
        }

    def _dlq(self) -> Json:
        by = Counter((d["component"], d["stage"], d["error_class"]) for d in self.dead)
        minute = Counter(d["t"] - d["t"] % 60_000 for d in self.dead)
        return {
            "total": len(self.dead),
            "capped": self.dead_dropped > 0,  # more than MAX_DEAD: the oldest were let go
            "by": [
                {"component": c, "stage": s, "error_class": e, "count": n}
                for (c, s, e), n in sorted(by.items(), key=lambda item: (-item[1], item[0]))
            ],
            "per_minute": [[t, minute[t]] for t in sorted(minute)],
            "recent": sorted(self.dead, key=lambda d: -d["t"])[:RECENT_DEAD],
        }
