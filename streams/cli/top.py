"""``dspex top``: a live terminal view of the pools and the current routing tables.

Pool rows come from the metrics agent's latest snapshots on the ``metrics``
topic (``pool.requests`` and ``pool.lag``), read from a few windows before the
end; routing tables from the compacted ``routing`` topic, read whole. No
consumer group is joined and nothing is committed: any number of people can
watch.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any

import typer
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, TopicPartition
from rich.console import Group
from rich.live import Live
from rich.table import Table

from dspex.schemas.records import Record
from dspex.streams import kafka
from dspex.streams.cli._app import app, err, out, settings_of
from dspex.streams.errors import DSPexError
from dspex.streams.serde import Serde, make_serde
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics

CATCH_UP_S = 10.0
WINDOWS_BACK = 3  # read this many metric windows before the end


@dataclass
class View:
    """The latest pool snapshots and routing tables seen."""

    pools: list[str]
    requests: dict[str, Record] = field(default_factory=dict)
    lags: dict[str, Record] = field(default_factory=dict)
    tables: dict[str, Record] = field(default_factory=dict)

    def take_snapshot(self, record: Record) -> None:
        pool = (record.get("labels") or {}).get("pool")
        latest = {"pool.requests": self.requests, "pool.lag": self.lags}.get(record["name"])
        if pool is None or latest is None:
            return
        previous = latest.get(pool)
        if previous is None or _end(previous) <= _end(record):
            latest[pool] = record

    def take_table(self, key: str, record: Record | None) -> None:
        if record is None:
            self.tables.pop(key, None)
        else:
            self.tables[record["program_id"]] = record

    def render(self) -> Group:
        return Group(self._pool_table(), self._routing_table())

    def _pool_table(self) -> Table:
        table = Table(title="pools (last closed window)", title_justify="left")
        for column in ("pool", "req/s", "p50 ms", "p95 ms", "errors", "lag", "window end"):
            table.add_column(column, justify="left" if column == "pool" else "right")
        for pool in sorted({*self.pools, *self.requests, *self.lags}):
            snap, lag = self.requests.get(pool) or {}, self.lags.get(pool) or {}
            table.add_row(
                pool,
                _num(snap.get("rate_per_s"), "{:.2f}"),
                _num(snap.get("latency_p50_ms"), "{:.0f}"),
                _num(snap.get("latency_p95_ms"), "{:.0f}"),
                _num(snap.get("error_rate"), "{:.1%}"),
                _num(lag.get("value"), "{:.0f}"),
                _clock(snap.get("window_end") or lag.get("window_end")),
            )
        return table

    def _routing_table(self) -> Table:
        table = Table(title="routing", title_justify="left")
        for column in ("program", "version", "weights", "reason"):
            table.add_column(column)
        for program, record in sorted(self.tables.items()):
            weights = ", ".join(
                f"{v['name']}@{v['pool']} {v['weight']:.0%}" for v in record.get("variants", [])
            )
            table.add_row(program, str(record.get("version")), weights, record.get("reason", ""))
        return table


def _end(record: Record) -> float:
    end = record.get("window_end")
    return end.timestamp() if isinstance(end, datetime) else float(end or 0)


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None or value == "" else fmt.format(value)


def _clock(value: Any) -> str:
    return value.astimezone().strftime("%H:%M:%S") if isinstance(value, datetime) else "-"


class Feed:
    """A group-less consumer on the metrics (tail) and routing (whole) topics."""

    def __init__(self, settings: Settings, view: View) -> None:
        topics = Topics(settings.topics)
        self.metrics, self.routing = topics.name("metrics"), topics.name("routing")
        self.serde: Serde = make_serde(settings)
        self.view = view
        self.consumer: Consumer = kafka.consumer(settings, f"dspex-top-{uuid.uuid4().hex}")
        back_ms = int(WINDOWS_BACK * settings.metrics.window_s * 1000)
        self.pending = self._assign(int(time.time() * 1000) - back_ms)

    def _assign(self, since_ms: int) -> dict[tuple[str, int], int]:
        """Assign every partition; returns the end offsets to catch up with."""
        metrics = self._partitions(self.metrics, since_ms)
        found = self.consumer.offsets_for_times(metrics, timeout=CATCH_UP_S)
        starts = [*found, *self._partitions(self.routing, OFFSET_BEGINNING)]
        ends = {}
        for tp in starts:
            low, high = self.consumer.get_watermark_offsets(tp, timeout=CATCH_UP_S)
            if tp.offset == OFFSET_BEGINNING:
                tp.offset = low
            if 0 <= tp.offset < high:
                ends[(tp.topic, tp.partition)] = high
            else:  # nothing recent (or empty): only what arrives from now on
                tp.offset = OFFSET_END
        self.consumer.assign(starts)
        return ends

    def _partitions(self, topic: str, offset: int) -> list[TopicPartition]:
        metadata = self.consumer.list_topics(topic, timeout=CATCH_UP_S).topics[topic]
        if metadata.error is not None or not metadata.partitions:
            raise DSPexError(f"topic={topic}: not found; run `dspex topics create`")
        return [TopicPartition(topic, p, offset) for p in sorted(metadata.partitions)]

    def poll(self, seconds: float) -> None:
        """Apply every record that arrives within ``seconds``."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            message = self.consumer.poll(min(left, 0.2))
            if message is None or message.error():
                continue
            self._apply(message)

    def catch_up(self, timeout_s: float = CATCH_UP_S) -> None:
        """Read until the end offsets seen at start (or ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while self.pending and time.monotonic() < deadline:
            self.poll(0.2)

    def _apply(self, message: Any) -> None:
        topic, partition, offset = str(message.topic()), message.partition(), message.offset()
        if self.pending.get((topic, partition), 0) <= offset + 1:
            self.pending.pop((topic, partition), None)
        if message.value() is None:
            if topic == self.routing:
                self.view.take_table((message.key() or b"").decode(), None)
            return
        try:
            record = self.serde.decode(message.value(), topic=topic).record
        except DSPexError as exc:
            err.print(f"[dim]skipped topic={topic} offset={offset}: {exc}[/]")
            return
        if topic == self.routing:
            self.view.take_table((message.key() or b"").decode(), record)
        else:
            self.view.take_snapshot(record)

    def close(self) -> None:
        self.consumer.close()


@app.command("top")
def top(
    ctx: typer.Context,
    once: Annotated[bool, typer.Option(help="Print one frame and exit.")] = False,
    refresh: Annotated[float, typer.Option(help="Seconds between frames.")] = 1.0,
) -> None:
    """Live view: per pool throughput, p50/p95 latency, error rate and lag; routing tables."""
    settings = settings_of(ctx)
    view = View(pools=[name for name, _ in settings.pools.items()])
    feed = Feed(settings, view)
    try:
        feed.catch_up()
        if once:
            out.print(view.render())
            return
        _live(feed, view, max(refresh, 0.1))
    finally:
        feed.close()


def _live(feed: Feed, view: View, refresh: float) -> None:
    with Live(view.render(), console=out, refresh_per_second=max(1.0, 1 / refresh)) as live:
        try:
            while True:
                feed.poll(refresh)
                live.update(view.render())
        except KeyboardInterrupt:
            return
