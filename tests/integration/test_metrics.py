"""The metrics agent on a real broker: snapshots, the Prometheus endpoint, Prometheus, ``top``.

The Prometheus test runs the real ``prometheus`` binary (Debian package
``prometheus``) scraping the agent on loopback; it fails, never skips, without it.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from dspex.agents.metrics.metrics import MetricsApp, make_metrics
from dspex.schemas import records
from dspex.streams import kafka
from dspex.streams.serde import make_serde
from dspex.streams.settings import Settings, load_settings
from dspex.streams.topics import Topics
from tests.integration.brokers import free_port
from tests.integration.stack import cli_env, run_dspex
from tests.integration.tail import OpenTail, Tail, until

WINDOW_S = 2.0
SERIES = {"program_id": "qa", "pool": "general", "variant": "echo"}


def snapshot(tail: Tail, name: str, labels: dict[str, str]) -> dict[str, Any] | None:
    """The last snapshot of ``name`` with exactly ``labels`` read from the metrics topic."""
    found = [r for r in tail.of("metrics") if r["name"] == name and r["labels"] == labels]
    return found[-1] if found else None


def metrics_settings(settings: Settings) -> Settings:
    return load_settings(
        kafka=settings.kafka.model_dump(),
        topics={"prefix": settings.topics.prefix},
        metrics={"window_s": WINDOW_S, "grace_s": 0.5, "prometheus_port": free_port()},
    )


@pytest.fixture
async def agent(
    settings: Settings, create_topics: Callable[[], object]
) -> AsyncIterator[MetricsApp]:
    """A started metrics agent (2 s windows, a free port) whose faust topics are cleaned up."""
    create_topics()
    app_id = f"{settings.topics.prefix}metrics-{uuid.uuid4().hex[:8]}"
    app = make_metrics(metrics_settings(settings), app_id=app_id, registry=CollectorRegistry())
    await app.start()
    await until(lambda: app.app.consumer.assignment(), 60, "telemetry partitions assigned")
    yield app
    await app.stop()
    admin = kafka.admin_client(settings)
    internal = [t for t in admin.list_topics(timeout=10).topics if t.startswith(app_id)]
    for future in admin.delete_topics(internal, operation_timeout=30).values() if internal else []:
        future.result()


async def produce_traffic(settings: Settings) -> int:
    """100 executions (latency 1..100 ms, every 4th failed) in one window, plus noise."""
    topics, serde, producer = (
        Topics(settings.topics),
        make_serde(settings),
        kafka.producer(settings),
    )
    window_ms = int(WINDOW_S * 1000)
    now = int(time.time() * 1000)
    # a clock wait, not a guess: the executions must all fall in one fresh window
    await asyncio.sleep((window_ms - now % window_ms) / 1000 + 0.05)
    start = now - now % window_ms + window_ms
    telemetry = topics.name("telemetry")
    for i in range(1, 101):
        record = _execution(start + 50, float(i), i % 4 != 0)
        producer.produce(
            telemetry, key=b"qa", value=serde.encode("Telemetry", record, topic=telemetry)
        )
    sample = records.health(in_flight=2, breaker_state="open", memory_bytes=5_000_000)
    health = records.telemetry(
        kind="health", pool="general", worker_id="w-7", emitted_at=start + 50, health=sample
    )
    encoded = serde.encode("Telemetry", health, topic=telemetry)
    producer.produce(telemetry, key=b"w-7", value=encoded)
    late = serde.encode("Telemetry", _execution(start - 60_000, 1.0, True), topic=telemetry)
    producer.produce(telemetry, key=b"qa", value=late)
    producer.produce(telemetry, key=b"qa", value=b"not avro")
    for i in range(5):  # nobody consumes pool.general: 5 messages of lag
        producer.produce(topics.name("pool.general"), key=str(i).encode(), value=b"x")
    routing = topics.name("routing")
    producer.produce(
        routing, key=b"qa", value=serde.encode("RoutingTable", _table(), topic=routing)
    )
    assert producer.flush(30) == 0
    return start


def _execution(at_ms: int, latency_ms: float, ok: bool) -> dict[str, Any]:
    return {
        "kind": "execution",
        "request_id": str(uuid.uuid4()),
        "program_id": "qa",
        "pool": "general",
        "variant": "echo",
        "emitted_at": at_ms,
        "latency_ms": latency_ms,
        "queue_wait_ms": 2.0,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "cost_usd": 0.0001,
        "success": ok,
        "error_class": None if ok else "LMError",
    }


def _table() -> dict[str, Any]:
    variants = [
        {"name": "echo", "pool": "general", "weight": 0.9},
        {"name": "local", "pool": "gpu", "weight": 0.1},
    ]
    return {
        "program_id": "qa",
        "version": 3,
        "created_at": int(time.time() * 1000),
        "reason": "echo: +20% success",
        "variants": variants,
    }


async def test_snapshots_prometheus_endpoint_and_top(
    settings: Settings, agent: MetricsApp, tails: OpenTail
) -> None:
    snapshots = tails(["metrics"], from_beginning=True)
    start = await produce_traffic(settings)
    got = await snapshots.until(lambda t: snapshot(t, "requests", SERIES), 30, "requests")
    lag = await snapshots.until(lambda t: snapshot(t, "pool.lag", {"pool": "general"}), 10, "lag")
    pool = snapshot(snapshots, "pool.requests", {"pool": "general"})
    percentiles = [got[f"latency_p{p}_ms"] for p in (50, 95, 99)]
    print(f"\nsnapshot: count={got['count']} rate={got['rate_per_s']}/s p50/95/99={percentiles}")
    assert got["window_start"].timestamp() * 1000 == start
    assert (got["count"], got["rate_per_s"], percentiles) == (100, 50.0, [50.0, 95.0, 99.0])
    assert got["error_rate"] == 0.25 and got["tokens"] == 1500
    assert pool is not None and pool["count"] == 100
    assert lag["value"] == 5.0
    worker = {"pool": "general", "worker": "w-7"}
    in_flight = await snapshots.until(lambda t: snapshot(t, "worker.in_flight", worker), 10, "w-7")
    assert in_flight["value"] == 2.0
    assert (snapshot(snapshots, "worker.breaker_open", worker) or {}).get("value") == 1.0

    families = _scrape(agent.port)
    ok = {"program": "qa", "pool": "general", "variant": "echo", "outcome": "ok"}
    assert families[("dspex_requests_total", tuple(sorted(ok.items())))] == 75
    assert families[("dspex_telemetry_dropped_total", (("reason", "late"),))] == 1
    assert families[("dspex_telemetry_dropped_total", (("reason", "undecodable"),))] == 1
    assert families[("dspex_pool_lag_messages", (("pool", "general"),))] == 5
    await until(lambda: _weight(agent), 10, "routing weight gauge")

    frame = await asyncio.to_thread(_top_once, settings)
    print(frame)
    rows = {line.split()[1]: line for line in frame.splitlines() if line.startswith("│ ")}
    assert {"general", "optimizer", "gpu", "qa"} <= set(rows)
    assert "50.00" in rows["general"] and "25.0%" in rows["general"]
    assert "echo@general 90%" in rows["qa"]


def _weight(agent: MetricsApp) -> float | None:
    labels = {"program": "qa", "variant": "echo"}
    return agent.exporter.registry.get_sample_value("dspex_routing_weight", labels)


def _scrape(port: int | None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _top_once(settings: Settings) -> str:
    env = cli_env(settings, DSPEX_METRICS__WINDOW_S=str(WINDOW_S), COLUMNS="200")
    run = run_dspex(env, "top", "--once", timeout_s=60)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


async def test_prometheus_scrapes_the_exporter(
    settings: Settings, agent: MetricsApp, tmp_path: Path
) -> None:
    binary = shutil.which("prometheus")
    assert binary, "the prometheus binary is required: apt-get install -y prometheus"
    await produce_traffic(settings)
    await until(lambda: _scrape(agent.port), 30, "the exporter")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: dspex\n    static_configs: [{{targets: ['127.0.0.1:{agent.port}']}}]\n"
    )
    args = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        query = 'sum(dspex_requests_total{program="qa"})'
        value = await until(lambda: _query(port, query), 60, "Prometheus to scrape the exporter")
    finally:
        server.terminate()
        server.wait(30)
    print(f"\nPrometheus {query} = {value}")
    assert value == 100.0


def _query(port: int, query: str) -> float | None:
    url = f"http://127.0.0.1:{port}/api/v1/query?query={urllib.parse.quote(query)}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.loads(response.read())
    except OSError:
        return None
    results = body["data"]["result"]
    return float(results[0]["value"][1]) if results else None
