"""``dspex top``: a live terminal view of the pools and the current routing tables.

Pool rows come from the metrics agent's latest snapshots on the ``metrics``
topic (``pool.requests`` and ``pool.lag``), read from a few windows before the
end; routing tables from the compacted ``routing`` topic, read whole. No
consumer group is joined and nothing is committed: any number of people can
watch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table

from dspex.schemas.records import Record
from dspex.streams.cli._app import app, err, out, settings_of
from dspex.streams.reader import TopicFollower
from dspex.streams.serde import make_serde
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics

CATCH_UP_S = 10.0
WINDOWS_BACK = 3  # read this many metric windows before the end
ACTIVE_S = 15 * 60.0  # a session with a turn this recent counts as active


@dataclass
class View:
    """The latest pool snapshots and routing tables seen."""

    pools: list[str]
    requests: dict[str, Record] = field(default_factory=dict)
    lags: dict[str, Record] = field(default_factory=dict)
    tables: dict[str, Record] = field(default_factory=dict)
    sessions: dict[str, Record] = field(default_factory=dict)

    def take_snapshot(self, record: Record) -> None:
        if record["name"] == "session":  # the sessions agent: one per changed session
            session_id = (record.get("labels") or {}).get("session_id")
            if session_id:
                self.sessions[session_id] = record
            return
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
        return Group(self._pool_table(), self._routing_table(), self._session_table())

    def _session_table(self, now: float | None = None, shown: int = 10) -> Table:
        """Sessions with a turn in the last ``ACTIVE_S`` seconds, most recent first."""
        now = time.time() if now is None else now
        active = [r for r in self.sessions.values() if now - _end(r) <= ACTIVE_S]
        active.sort(key=_end, reverse=True)
        title = f"active sessions ({len(active)} in the last {ACTIVE_S / 60:.0f} min)"
        table = Table(title=title, title_justify="left")
        for column in ("session", "turns", "tokens", "avg ms", "last turn"):
            table.add_column(column, justify="left" if column == "session" else "right")
        for record in active[:shown]:
            table.add_row(
                (record.get("labels") or {}).get("session_id", "?"),
                str(record.get("count") or 0),
                str(record.get("tokens") or 0),
                _num(record.get("value"), "{:.0f}"),
                _clock(record.get("window_end")),
            )
        return table

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
    """``dspex top``'s reader: the metrics topic's last few windows, the routing topic whole."""

    def __init__(self, settings: Settings, view: View) -> None:
        topics = Topics(settings.topics)
        self.metrics, self.routing = topics.name("metrics"), topics.name("routing")
        self.view = view
        back_ms = int(WINDOWS_BACK * settings.metrics.window_s * 1000)
        starts = {self.metrics: int(time.time() * 1000) - back_ms, self.routing: None}
        skip = lambda line: err.print(f"[dim]{line}[/]")  # noqa: E731
        self.follower = TopicFollower(settings, make_serde(settings), starts, on_skip=skip)

    def poll(self, seconds: float) -> None:
        """Apply every record that arrives within ``seconds``."""
        self.follower.poll(seconds, self._apply)

    def catch_up(self, timeout_s: float = CATCH_UP_S) -> None:
        """Read until the end offsets seen at start (or ``timeout_s``)."""
        self.follower.catch_up(self._apply, timeout_s)

    def _apply(self, topic: str, key: str, record: Record | None) -> None:
        if topic == self.routing:
            self.view.take_table(key, record)
        elif record is not None:
            self.view.take_snapshot(record)

    def close(self) -> None:
        self.follower.close()


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
