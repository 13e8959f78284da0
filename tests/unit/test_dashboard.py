"""The web dashboard without a broker: the board's figures, the server's routes and events.

The browser test (tests/integration/test_dashboard.py) reads the same figures from
the page in Chromium; these check the JSON the page is given and the HTTP side.
"""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dspex.schemas import records
from dspex.streams.dashboard import server
from dspex.streams.dashboard.board import Board
from dspex.streams.dashboard.server import STATIC, Dashboard
from dspex.streams.errors import BrokerUnavailable
from dspex.streams.reader import Apply
from dspex.streams.settings import load_settings

T0 = 1_700_000_040_000
MIN = 60_000


class Clock:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> float:
        return self.ms / 1000


def pool_snapshot(end: int, rate: float, **fields: Any) -> dict[str, Any]:
    return records.metric_snapshot(
        name="pool.requests",
        window_start=end - MIN,
        window_end=end,
        labels={"pool": "general"},
        count=int(rate * 60),
        rate_per_s=rate,
        latency_p95_ms=fields.get("p95"),
        error_rate=fields.get("errors", 0.0),
    )


def gauge(name: str, labels: dict[str, str], end: int, value: float) -> dict[str, Any]:
    return records.metric_snapshot(
        name=name, window_start=end - MIN, window_end=end, labels=labels, value=value
    )


def table(version: int, at: int, reason: str, **weights: float) -> dict[str, Any]:
    variants = [records.variant(name=n, weight=w) for n, w in weights.items()]
    return records.routing_table(
        program_id="qa", version=version, created_at=at, reason=reason, variants=variants
    )


def dead(at: int, stage: str, error_class: str = "InvalidRequest") -> dict[str, Any]:
    return records.dead_letter(
        original_topic="dspex.requests",
        original_partition=0,
        original_offset=1,
        error_class=error_class,
        error_message="x" * 1000,
        stage=stage,
        failed_at=at,
        component="router",
    )


def test_pool_windows_merge_requests_and_lag_and_age_out() -> None:
    clock = Clock(T0 + 3 * MIN)
    board = Board(history_s=300, window_s=60, clock=clock)
    board.take_snapshot(pool_snapshot(T0, 2.0, p95=80.0))
    board.take_snapshot(pool_snapshot(T0 + MIN, 3.5, p95=90.0, errors=0.25))
    board.take_snapshot(gauge("pool.lag", {"pool": "general"}, T0 + MIN, 12))
    points = board.state()["pools"]["general"]
    assert [(p["t"], p["rate"], p["p95"]) for p in points] == [
        (T0, 2.0, 80.0),
        (T0 + MIN, 3.5, 90.0),
    ]
    assert points[1]["lag"] == 12 and points[1]["errors"] == 0.25
    assert "lag" not in points[0]
    clock.ms = T0 + 300_000 + 1  # the first window left the history, the second not yet
    assert [p["t"] for p in board.state()["pools"]["general"]] == [T0 + MIN]


def test_workers_keep_their_latest_health_and_other_names_become_gauges() -> None:
    board = Board(history_s=900, window_s=60, clock=Clock(T0 + MIN))
    worker = {"pool": "gpu", "worker": "w1"}
    board.take_snapshot(gauge("worker.in_flight", worker, T0 + MIN, 4))
    board.take_snapshot(gauge("worker.in_flight", worker, T0, 9))  # older: ignored
    board.take_snapshot(gauge("worker.breaker_open", worker, T0 + MIN, 1))
    board.take_snapshot(gauge("session.active", {}, T0 + MIN, 7))
    state = board.state()
    assert state["workers"] == [
        {"pool": "gpu", "worker": "w1", "t": T0 + MIN, "in_flight": 4, "breaker_open": 1}
    ]
    assert state["worker_points"] == {
        "gpu/w1": [{"t": T0, "in_flight": 9}, {"t": T0 + MIN, "in_flight": 4, "breaker_open": 1}]
    }
    assert state["gauges"] == [{"name": "session.active", "labels": {}, "value": 7, "t": T0 + MIN}]


def test_routing_versions_keep_shares_and_reasons_and_a_tombstone_drops_the_program() -> None:
    board = Board(history_s=900, window_s=60, clock=Clock(T0))
    board.take_table("qa", table(2, T0, "b: +20% success", a=1.0, b=3.0))
    board.take_table("qa", table(1, T0 - MIN, "first", a=1.0))
    versions = board.state()["programs"]["qa"]["tables"]
    assert [(v["version"], v["reason"]) for v in versions] == [(1, "first"), (2, "b: +20% success")]
    assert [(v["name"], v["share"]) for v in versions[1]["variants"]] == [("a", 0.25), ("b", 0.75)]
    board.take_table("qa", None)
    assert board.state()["programs"] == {}


def test_dead_letters_are_counted_by_cause_and_minute() -> None:
    clock = Clock(T0 + 2 * MIN)
    board = Board(history_s=600, window_s=60, clock=clock)
    for at, stage in ((T0 + 1, "validate"), (T0 + MIN + 5, "validate"), (T0 + 2, "decode")):
        board.take_dead_letter(dead(at, stage))
    dlq = board.state()["dlq"]
    assert dlq["total"] == 3 and not dlq["capped"]
    assert [(d["stage"], d["count"]) for d in dlq["by"]] == [("validate", 2), ("decode", 1)]
    assert dlq["per_minute"] == [[T0, 2], [T0 + MIN, 1]]
    assert [d["t"] for d in dlq["recent"]] == [T0 + MIN + 5, T0 + 2, T0 + 1]
    assert len(dlq["recent"][0]["message"]) == 300
    clock.ms = T0 + 600_000 + 10  # the first minute's letters left the history
    assert board.state()["dlq"]["total"] == 1


class FakeFollower:
    """Hands queued (topic, key, record) triples to the dashboard, as a TopicFollower would."""

    def __init__(self) -> None:
        self.queue: list[tuple[str, str, dict[str, Any] | None]] = []
        self.lock = threading.Lock()
        self.closed = False
        self.failing: Exception | None = None

    def poll(self, seconds: float, apply: Apply) -> None:
        if self.failing is not None:
            raise self.failing
        with self.lock:
            queued, self.queue = self.queue, []
        for topic, key, record in queued:
            apply(topic, key, record)
        threading.Event().wait(min(seconds, 0.05))

    def add(self, topic: str, key: str, record: dict[str, Any] | None) -> None:
        with self.lock:
            self.queue.append((topic, key, record))

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def served() -> Iterator[tuple[Dashboard, FakeFollower]]:
    follower = FakeFollower()
    dashboard = Dashboard(load_settings(), port=0, follower=follower)
    dashboard.start()
    yield dashboard, follower
    dashboard.stop()
    assert follower.closed


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, "", b""


def test_the_page_and_the_vendored_chart_library_are_served(
    served: tuple[Dashboard, FakeFollower],
) -> None:
    dashboard, _ = served
    status, kind, page = get(dashboard.url)
    assert (status, kind) == (200, "text/html")
    assert b'src="/static/vendor/uplot/uPlot.iife.min.js"' in page
    assert b"http" not in page.replace(b"http-equiv", b"")  # nothing fetched from elsewhere
    status, kind, script = get(dashboard.url + "static/vendor/uplot/uPlot.iife.min.js")
    assert status == 200 and "javascript" in kind and b"uPlot" in script
    assert get(dashboard.url + "static/../server.py")[0] == 404
    assert get(dashboard.url + "static/%2e%2e/server.py")[0] == 404
    assert get(dashboard.url + "nothing")[0] == 404


def test_state_and_events_follow_the_records(served: tuple[Dashboard, FakeFollower]) -> None:
    dashboard, follower = served
    follower.add(dashboard.routing, "qa", table(1, T0, "first", a=1.0))
    events = urllib.request.urlopen(dashboard.url + "api/events", timeout=30)  # noqa: S310
    try:
        first = _next_state(events)
        if "qa" not in first["programs"]:  # the record may land just after the first event
            first = _next_state(events)
        assert first["programs"]["qa"]["tables"][0]["reason"] == "first"
        follower.add(dashboard.dlq, "k", dead(int(dashboard.board.clock() * 1000), "decode"))
        second = _next_state(events)
        assert second["version"] > first["version"] and second["dlq"]["total"] == 1
    finally:
        events.close()
    status, kind, body = get(dashboard.url + "api/state")
    assert (status, kind) == (200, "application/json")
    assert json.loads(body)["dlq"]["total"] == 1


def _next_state(events: Any) -> dict[str, Any]:
    """The next ``state`` event of a server-sent event stream."""
    kind = None
    for raw in events:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            kind = line.removeprefix("event: ")
        elif line.startswith("data: ") and kind == "state":
            state: dict[str, Any] = json.loads(line.removeprefix("data: "))
            return state
    raise AssertionError("the event stream ended")


def test_unreadable_topics_are_shown_on_the_page_until_they_can_be_read(
    served: tuple[Dashboard, FakeFollower], monkeypatch: pytest.MonkeyPatch
) -> None:
    dashboard, follower = served
    monkeypatch.setattr(server, "RETRY_S", 0.05)
    follower.failing = BrokerUnavailable("topic=t.metrics: cannot read offsets: no leader")
    seen = dashboard.board.version
    assert dashboard.wait_for_change(seen, 30)
    state = json.loads(get(dashboard.url + "api/state")[2])
    assert state["problem"] == "topic=t.metrics: cannot read offsets: no leader"
    follower.failing = None
    assert dashboard.wait_for_change(state["version"], 30)
    assert json.loads(get(dashboard.url + "api/state")[2])["problem"] is None


def test_a_taken_port_gives_a_free_one() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        dashboard = Dashboard(load_settings(), port=port, follower=FakeFollower())
    try:
        assert dashboard.port != port and dashboard.url == f"http://127.0.0.1:{dashboard.port}/"
    finally:
        dashboard.stop()


def test_the_chart_library_ships_with_its_licence() -> None:
    vendor = STATIC / "vendor" / "uplot"
    assert "MIT License" in (vendor / "LICENSE").read_text()
    assert "uPlot 1.6.32" in (vendor / "SOURCE").read_text()
    assert {p.name for p in STATIC.iterdir()} >= {"index.html", "dashboard.js", "dashboard.css"}
    assert isinstance(STATIC, Path)
