"""The metrics agent without a broker: windows, snapshots, exporter, deploy configs."""

from __future__ import annotations

import json
import math
import re
import socket
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]  # PyYAML (locked via dspy) ships no type hints
from prometheus_client import CollectorRegistry
from rich.console import Console

from dspex.agents.metrics.metrics import WORKER_GAUGES, Exporter, Metrics, serve_exporter
from dspex.agents.metrics.windows import Closed, Sample, Windows, percentile, snapshots
from dspex.agents.plumbing.messages import Consumed
from dspex.agents.sessions.sweeper import session_snapshot
from dspex.schemas import samples
from dspex.streams.cli.top import View
from dspex.streams.dashboard import board
from dspex.streams.serde import make_serde
from dspex.streams.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_700_000_040_000  # a window boundary for 60 s and 2 s windows


def execution(**fields: Any) -> dict[str, Any]:
    record = {
        "kind": "execution",
        "request_id": "r1",
        "program_id": "qa",
        "pool": "general",
        "variant": "echo",
        "emitted_at": T0,
        "latency_ms": 100.0,
        "queue_wait_ms": 10.0,
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "cost_usd": 0.001,
        "success": True,
    }
    return {**record, **fields}


def sample(**fields: Any) -> Sample:
    made = Sample.of(execution(**fields))
    assert made is not None
    return made


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(100, 0, -1)]
    assert [percentile(values, q) for q in (0.5, 0.95, 0.99, 1.0)] == [50.0, 95.0, 99.0, 100.0]
    assert percentile([7.0], 0.99) == 7.0
    assert percentile([], 0.5) is None


def test_a_closed_window_gives_counts_rates_and_percentiles() -> None:
    windows = Windows(window_s=2, grace_s=0.5, max_samples=1000)
    for i in range(1, 101):
        windows.add(sample(latency_ms=float(i), success=i % 4 != 0), now_ms=T0 + 100)
    windows.add(sample(pool="gpu", variant="local", program_id=None), now_ms=T0 + 100)
    assert windows.close_due(T0 + 2_400) == []  # still within grace
    (closed,) = windows.close_due(T0 + 2_500)
    assert (closed.start_ms, closed.end_ms) == (T0, T0 + 2_000)
    by_name = {(n, tuple(sorted(r["labels"].values()))): r for n, r in snapshots(closed, 2.0)}
    qa = by_name[("requests", ("echo", "general", "qa"))]
    assert qa["count"] == 100 and qa["rate_per_s"] == 50.0
    assert (qa["latency_p50_ms"], qa["latency_p95_ms"], qa["latency_p99_ms"]) == (50, 95, 99)
    assert qa["error_rate"] == 0.25 and qa["tokens"] == 500
    assert math.isclose(qa["cost_usd"], 0.1)
    inline = by_name[("requests", ("gpu", "inline", "local"))]
    assert inline["count"] == 1
    assert by_name[("pool.requests", ("general",))]["count"] == 100
    wait = by_name[("queue_wait", ("echo", "general", "qa"))]
    assert wait["latency_p95_ms"] == 10.0 and wait["error_rate"] == 0.0
    assert len(windows) == 0


def test_late_events_count_within_grace_and_are_refused_after() -> None:
    windows = Windows(window_s=2, grace_s=0.5, max_samples=100)
    assert windows.add(sample(emitted_at=T0 + 1_999), now_ms=T0 + 2_300)  # late, in grace
    assert windows.add(sample(emitted_at=T0 + 2_100), now_ms=T0 + 2_300)  # next window
    assert not windows.add(sample(emitted_at=T0 + 500), now_ms=T0 + 2_500)  # closed
    first, second = windows.close_due(T0 + 10_000)
    assert [b.count for b in first.buckets.values()] == [1]
    assert second.start_ms == T0 + 2_000


def test_a_future_timestamp_counts_as_now() -> None:
    windows = Windows(window_s=2, grace_s=0, max_samples=100)
    assert windows.add(sample(emitted_at=T0 + 3_600_000), now_ms=T0 + 100)
    (closed,) = windows.close_due(T0 + 2_000)
    assert closed.start_ms == T0


def test_bad_values_are_left_out_of_the_aggregate_they_would_poison() -> None:
    windows = Windows(window_s=2, grace_s=0, max_samples=100)
    bad = [float("nan"), float("inf"), -5.0, None]
    for value in bad:
        windows.add(sample(latency_ms=value, queue_wait_ms=value, cost_usd=value), now_ms=T0 + 1)
    windows.add(sample(prompt_tokens=-10, completion_tokens=4), now_ms=T0 + 1)
    (closed,) = windows.close_due(T0 + 2_000)
    (bucket,) = closed.buckets.values()
    assert bucket.count == 5 and bucket.latencies.values == [100.0]
    assert bucket.tokens == 4 * 5 + 4 and math.isclose(bucket.cost_usd, 0.001)


def test_the_latency_reservoir_is_bounded() -> None:
    windows = Windows(window_s=2, grace_s=0, max_samples=10)
    for i in range(1000):
        windows.add(sample(latency_ms=float(i)), now_ms=T0 + 1)
    (closed,) = windows.close_due(T0 + 2_000)
    (bucket,) = closed.buckets.values()
    assert bucket.count == 1000 and len(bucket.latencies.values) == 10


def settings(**metrics: Any) -> Settings:
    return load_settings(metrics={"window_s": 2, "grace_s": 0.5, **metrics})


class Clock:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> float:
        return self.ms / 1000


def test_snapshots_follow_the_contract_and_the_exporter_counts_in_seconds() -> None:
    config, registry, clock = settings(), CollectorRegistry(), Clock(T0 + 100)
    serde = make_serde(config)
    metrics = Metrics(config, serde, Exporter(registry), clock=clock)
    topic = metrics.metrics_topic.replace("metrics", "telemetry")
    for good in (execution(), execution(success=False, error_class="LMError", latency_ms=3000.0)):
        original = Consumed(topic, 0, 1, value=serde.encode("Telemetry", good, topic=topic))
        assert metrics.take(original) == []
    assert metrics.take(Consumed(topic, 0, 2, key=b"k", value=b"junk"))[0].topic.endswith("dlq")
    assert not metrics.observe(execution(success=None))
    assert not metrics.observe({"kind": "health", "emitted_at": T0})
    clock.ms = T0 + 2_500
    (closed,) = metrics.due()
    outgoing = metrics.encode(closed) + metrics.lag_snapshots(closed, {"general": 7})
    decoded = [serde.decode(o.value, topic=o.topic).record for o in outgoing]
    assert [o.key for o in outgoing] == [b"requests", b"queue_wait", b"pool.requests", b"pool.lag"]
    assert decoded[0]["count"] == 2 and decoded[0]["error_rate"] == 0.5
    assert decoded[3]["value"] == 7.0 and decoded[3]["labels"] == {"pool": "general"}

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    series = {"program": "qa", "pool": "general", "variant": "echo"}
    assert value("dspex_requests_total", **series, outcome="ok") == 1
    assert value("dspex_requests_total", **series, outcome="error") == 1
    assert value("dspex_request_latency_seconds_count", **series) == 2
    assert value("dspex_request_latency_seconds_sum", **series) == 3.1
    assert value("dspex_request_latency_seconds_bucket", **series, le="0.1") == 1
    assert value("dspex_queue_wait_seconds_sum", **series) == 0.02
    assert value("dspex_tokens_total", **series) == 10
    assert math.isclose(value("dspex_cost_usd_total", **series) or 0, 0.002)
    assert value("dspex_pool_lag_messages", pool="general") == 7
    for reason in ("undecodable", "invalid"):
        assert value("dspex_telemetry_dropped_total", reason=reason) == 1
    clock.ms = T0 + 60_000
    assert not metrics.observe(execution())  # its window closed long ago
    assert value("dspex_telemetry_dropped_total", reason="late") == 1
    assert value("dspex_requests_total", **series, outcome="ok") == 1


def test_a_tenants_executions_have_series_and_counters_of_their_own() -> None:
    config, registry, clock = settings(), CollectorRegistry(), Clock(T0 + 100)
    metrics = Metrics(config, make_serde(config), Exporter(registry), clock=clock)
    for record in (execution(tenant="acme"), execution(tenant="acme"), execution()):
        assert metrics.observe(record)
    clock.ms = T0 + 2_500
    (closed,) = metrics.due()
    requests = [r for name, r in snapshots(closed, 2.0) if name == "requests"]
    assert sorted((r["labels"].get("tenant", "-"), r["count"]) for r in requests) == [
        ("-", 1),
        ("acme", 2),
    ]
    assert (
        registry.get_sample_value(
            "dspex_tenant_requests_total", {"tenant": "acme", "outcome": "ok"}
        )
        == 2
    )
    assert registry.get_sample_value("dspex_tenant_tokens_total", {"tenant": "acme"}) == 10
    series = {"program": "qa", "pool": "general", "variant": "echo", "outcome": "ok"}
    assert registry.get_sample_value("dspex_requests_total", series) == 3


def test_routing_weights_follow_the_tables() -> None:
    registry = CollectorRegistry()
    exporter = Exporter(registry)

    def table(**weights: float) -> dict[str, Any]:
        variants = [{"name": n, "weight": w, "pool": "general"} for n, w in weights.items()]
        return {"program_id": "qa", "variants": variants}

    exporter.apply_routing("qa", table(a=0.7, b=0.3))
    exporter.apply_routing("qa", {**table(a=0.95, c=0.05), "pool_hints": {"general": 3}})
    hint = registry.get_sample_value("dspex_pool_recommended_consumers", {"pool": "general"})
    assert hint == 3
    weight = {
        v: registry.get_sample_value("dspex_routing_weight", {"program": "qa", "variant": v})
        for v in ("a", "b", "c")
    }
    assert weight == {"a": 0.95, "b": None, "c": 0.05}
    exporter.apply_routing("qa", None)
    assert (
        registry.get_sample_value("dspex_routing_weight", {"program": "qa", "variant": "a"}) is None
    )


def test_worker_health_sets_gauges_and_silent_workers_are_forgotten() -> None:
    config, registry, clock = settings(), CollectorRegistry(), Clock(T0)
    metrics = Metrics(config, make_serde(config), Exporter(registry), clock=clock)

    def health(worker: str, in_flight: int, breaker: str) -> dict[str, Any]:
        sample = {"in_flight": in_flight, "breaker_state": breaker, "memory_bytes": 50_000_000}
        return {"kind": "health", "pool": "general", "worker_id": worker, "health": sample}

    def value(name: str, worker: str) -> float | None:
        return registry.get_sample_value(name, {"pool": "general", "worker": worker})

    assert metrics.observe(health("w1", 3, "open"))
    assert metrics.observe(health("w2", 0, "half-open"))
    assert value("dspex_worker_in_flight", "w1") == 3
    assert value("dspex_worker_memory_bytes", "w1") == 50_000_000
    assert value("dspex_worker_breaker_open", "w1") == 1.0
    assert value("dspex_worker_breaker_open", "w2") == 0.5
    clock.ms += int(6 * config.metrics.worker_health_interval_s * 1000)
    assert metrics.observe(health("w2", 1, "closed"))
    assert value("dspex_worker_in_flight", "w1") is None  # w1 went silent: its series are gone
    assert value("dspex_worker_breaker_open", "w2") == 0.0


def test_each_live_workers_health_is_published_as_worker_snapshots() -> None:
    config, clock = settings(), Clock(T0)
    serde = make_serde(config)
    metrics = Metrics(config, serde, Exporter(CollectorRegistry()), clock=clock)
    sample = {"in_flight": 2, "breaker_state": "half-open", "memory_bytes": 7_000_000}
    metrics.observe({"kind": "health", "pool": "gpu", "worker_id": "w9", "health": sample})
    outgoing = metrics.health_snapshots(Closed(T0, T0 + 2_000, {}))
    decoded = [serde.decode(o.value, topic=o.topic).record for o in outgoing]
    assert [o.key for o in outgoing] == [name.encode() for name in WORKER_GAUGES]
    assert {r["name"]: r["value"] for r in decoded} == {
        "worker.in_flight": 2.0,
        "worker.memory_bytes": 7_000_000.0,
        "worker.breaker_open": 0.5,
    }
    assert all(r["labels"] == {"pool": "gpu", "worker": "w9"} for r in decoded)
    assert set(WORKER_GAUGES) == set(board.WORKER_GAUGES)  # the dashboard reads these names
    clock.ms += int(6 * config.metrics.worker_health_interval_s * 1000)
    metrics.observe({"kind": "health", "pool": "gpu", "worker_id": "w10", "health": sample})
    later = metrics.health_snapshots(Closed(T0, T0 + 2_000, {}))
    assert {serde.decode(o.value, topic=o.topic).record["labels"]["worker"] for o in later} == {
        "w10"
    }  # w9 went silent


def test_a_taken_exporter_port_gives_a_free_one() -> None:
    registry = CollectorRegistry()
    Exporter(registry).lag.labels("general").set(4)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = serve_exporter(registry, "127.0.0.1", port)
    try:
        assert server is not None and server.server_port != port
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert 'dspex_pool_lag_messages{pool="general"} 4.0' in response.read().decode()
    finally:
        server.shutdown()
        server.server_close()


def test_metrics_settings_defaults_and_environment(monkeypatch: Any) -> None:
    defaults = load_settings().metrics
    assert (defaults.window_s, defaults.prometheus_port, defaults.bind_host) == (
        60.0,
        9464,
        "127.0.0.1",
    )
    monkeypatch.setenv("DSPEX_METRICS__PROMETHEUS_PORT", "0")
    assert load_settings().metrics.prometheus_port == 0


def test_top_keeps_the_latest_window_per_pool() -> None:
    view = View(pools=["general", "gpu"])
    closed = Closed(T0, T0 + 2_000, {("qa", "general", "echo", ""): _bucket()})
    for _name, record in snapshots(closed, 2.0):
        view.take_snapshot(record)
    older = {**dict(snapshots(closed, 2.0))["pool.requests"], "window_end": T0, "count": 0}
    view.take_snapshot(older)
    assert view.requests["general"]["count"] == 3


def _bucket() -> Any:
    windows = Windows(window_s=2, grace_s=0, max_samples=10)
    for _ in range(3):
        windows.add(sample(), now_ms=T0 + 1)
    (closed,) = windows.close_due(T0 + 2_000)
    return next(iter(closed.buckets.values()))


EXPORTED = {
    "dspex_requests_total",
    "dspex_request_latency_seconds_bucket",
    "dspex_queue_wait_seconds_bucket",
    "dspex_tokens_total",
    "dspex_cost_usd_total",
    "dspex_pool_lag_messages",
    "dspex_routing_weight",
    "dspex_worker_in_flight",
    "dspex_worker_memory_bytes",
    "dspex_worker_breaker_open",
    "dspex_pool_recommended_consumers",
}


def test_prometheus_scrapes_the_exporter() -> None:
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "dspex"]
    assert job["static_configs"][0]["targets"] == ["dspex:9464"]


def test_grafana_provisioning_and_dashboard_use_exported_metrics() -> None:
    grafana = ROOT / "deploy/grafana"
    source = yaml.safe_load((grafana / "provisioning/datasources/prometheus.yml").read_text())
    assert source["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((grafana / "provisioning/dashboards/dspex.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboard = json.loads((grafana / "dashboards/dspex.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"dspex_[a-z_]+", e)}
    assert used <= EXPORTED and {"dspex_pool_lag_messages", "dspex_cost_usd_total"} <= used
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for word in ("rate", "p50", "p95", "p99", "error", "tokens", "cost", "lag"):
        assert word in titles


def test_compose_brings_up_prometheus_and_grafana() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert compose["prometheus"]["image"].startswith("prom/prometheus")
    assert compose["grafana"]["image"].startswith("grafana/grafana")
    assert compose["dspex"]["environment"]["DSPEX_METRICS__BIND_HOST"] == "0.0.0.0"  # noqa: S104
    assert compose["dspex"]["environment"]["DSPEX_DASHBOARD__BIND_HOST"] == "0.0.0.0"  # noqa: S104
    assert "127.0.0.1:9465:9465" in compose["dspex"]["ports"]  # the dashboard, host loopback


def test_top_shows_the_sessions_with_a_recent_turn() -> None:
    view = View(pools=["general"])
    now = time.time()
    for session_id, minutes_ago, turns in (("user-1", 1, 3), ("user-2", 2, 5), ("old", 60, 9)):
        state = samples.sample("SessionState")
        updated = datetime.fromtimestamp(now - minutes_ago * 60, UTC)
        counters = {**state["counters"], "turns": turns}
        state = {**state, "session_id": session_id, "updated_at": updated, "counters": counters}
        view.take_snapshot(session_snapshot(state))
    console = Console(width=200, record=True)
    console.print(view._session_table(now))
    text = console.export_text()
    assert "active sessions (2 in the last 15 min)" in text
    assert "user-1" in text and "user-2" in text and "old" not in text
    assert text.index("user-1") < text.index("user-2")  # most recent first
