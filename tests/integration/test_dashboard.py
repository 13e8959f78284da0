"""The web dashboard in a real browser: Debian's Chromium, driven by Playwright.

The test produces known MetricSnapshot, RoutingTable and DeadLetter records to the
real broker, starts ``dspex dashboard`` as a user would (its own process, port 0),
opens the page in headless Chromium and reads the figures back from the tables and
the charts' data attributes; then it produces more records after the page loaded
and waits for them to appear without a reload (server-sent events). Playwright
drives the system browser (``executable_path``): ``make tools`` installs Debian's
``chromium``; without it the test fails, it never skips. The screenshot goes to
``test-artifacts/dashboard.png`` in the checkout (pytest's own temporary
directories are pruned by later runs); its path is printed and recorded as the
test's ``screenshot`` property (JUnit XML).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, sync_playwright

from dspex.schemas import records
from dspex.streams import kafka
from dspex.streams.serde import make_serde
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
WINDOW_MS = 60_000
WAIT_MS = 60_000  # generous: the machine is shared and busy


class Producer:
    """Encodes contract records and produces them to this test's topics."""

    def __init__(self, settings: Settings) -> None:
        self.now = int(time.time() * 1000) // WINDOW_MS * WINDOW_MS  # a window's end
        self.topics = Topics(settings.topics)
        self.serde = make_serde(settings)
        self.producer = kafka.producer(settings)

    def send(self, short: str, schema: str, key: str, record: dict[str, Any]) -> None:
        topic = self.topics.name(short)
        value = self.serde.encode(schema, record, topic=topic)
        self.producer.produce(topic, key=key.encode(), value=value)

    def flush(self) -> None:
        assert self.producer.flush(30) == 0, "records not delivered"

    def pool(self, pool: str, end_ms: int, rate: float, p50: float, p95: float, p99: float) -> None:
        self.requests("pool.requests", {"pool": pool}, end_ms, rate, (p50, p95, p99))

    def requests(
        self,
        name: str,
        labels: dict[str, str],
        end_ms: int,
        rate: float,
        latencies: tuple[float, float, float],
    ) -> None:
        p50, p95, p99 = latencies
        record = records.metric_snapshot(
            name=name,
            window_start=end_ms - WINDOW_MS,
            window_end=end_ms,
            labels=labels,
            count=int(rate * 60),
            rate_per_s=rate,
            latency_p50_ms=p50,
            latency_p95_ms=p95,
            latency_p99_ms=p99,
            error_rate=0.04,
        )
        self.send("metrics", "MetricSnapshot", name, record)

    def gauge(self, name: str, labels: dict[str, str], end_ms: int, value: float) -> None:
        record = records.metric_snapshot(
            name=name,
            window_start=end_ms - WINDOW_MS,
            window_end=end_ms,
            labels=labels,
            value=value,
        )
        self.send("metrics", "MetricSnapshot", name, record)

    def table(self, version: int, at_ms: int, weights: dict[str, float], reason: str) -> None:
        pools = {"echo": "general", "local": "gpu"}
        variants = [records.variant(name=n, pool=pools[n], weight=w) for n, w in weights.items()]
        record = records.routing_table(
            program_id="qa", version=version, created_at=at_ms, reason=reason, variants=variants
        )
        self.send("routing", "RoutingTable", "qa", record)

    def dead_letter(self, n: int, stage: str, error_class: str) -> None:
        record = records.dead_letter(
            original_topic=self.topics.name("requests"),
            original_partition=0,
            original_offset=n,
            original_value=b"\x00garbage",
            error_class=error_class,
            error_message=f"bad request number {n}",
            stage=stage,
            failed_at=self.now - 30_000 + n,
            component="router",
        )
        self.send("dlq", "DeadLetter", f"k{n}", record)


@pytest.fixture
def dashboard_url(settings: Settings, create_topics: Callable[[], object]) -> Iterator[str]:
    """``dspex dashboard --port 0`` in its own process; its URL, read from what it prints."""
    create_topics()
    env = {
        **os.environ,
        "DSPEX_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers or "",
        "DSPEX_TOPICS__PREFIX": settings.topics.prefix,
    }
    command = [sys.executable, "-m", "dspex.streams", "dashboard", "--port", "0"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        found = re.search(r"http://[\d.]+:\d+/", line)
        assert found, f"no URL in {line!r}"
        yield found.group(0)
    finally:
        process.terminate()
        process.wait(30)


def text(page: Page, selector: str) -> str:
    return page.locator(selector).inner_text().strip()


def wait_text(page: Page, selector: str, expected: str) -> None:
    page.wait_for_function(
        "([s, e]) => document.querySelector(s)?.textContent.trim() === e",
        arg=[selector, expected],
        timeout=WAIT_MS,
    )


def chart_last(page: Page, selector: str) -> dict[str, Any]:
    last: dict[str, Any] = json.loads(page.locator(selector).get_attribute("data-last") or "{}")
    return last


def test_the_dashboard_shows_the_records_and_updates_live(
    settings: Settings,
    dashboard_url: str,
    pytestconfig: pytest.Config,
    record_property: Callable[[str, object], None],
) -> None:
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is missing: run `make tools`"
    out = Producer(settings)
    now = out.now
    out.pool("general", now - WINDOW_MS, 12.5, 40, 95, 120)
    out.pool("general", now, 7.25, 41, 96, 121)
    out.gauge("pool.lag", {"pool": "general"}, now, 17)
    worker = {"pool": "general", "worker": "w-1"}
    out.gauge("worker.in_flight", worker, now, 3)
    out.gauge("worker.memory_bytes", worker, now, 100 * 1024 * 1024)
    out.gauge("worker.breaker_open", worker, now, 1)
    out.gauge("pipeline.active_runs", {"pipeline_id": "triage"}, now, 2)
    series = {"program_id": "qa", "pool": "gpu", "variant": "local"}
    out.requests("requests", series, now, 5.5, (300, 650, 700))
    out.table(1, now - 90_000, {"echo": 1.0}, "initial table")
    out.table(2, now - 30_000, {"echo": 0.25, "local": 0.75}, "local: +20% success")
    for n in range(3):
        out.dead_letter(n, "validate", "InvalidRequest")
    out.flush()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 2200})
        page.goto(dashboard_url)
        wait_text(page, '#pool-table tr[data-pool="general"] td[data-field="rate"]', "7.25")
        wait_text(page, "#dlq-total", "3")
        wait_text(page, '#worker-table tr[data-worker="w-1"] td[data-field="in_flight"]', "3")
        wait_text(page, '.program[data-program="qa"] .current', "version 2")

        general = '#pool-table tr[data-pool="general"]'
        assert text(page, f'{general} td[data-field="p50"]') == "41"
        assert text(page, f'{general} td[data-field="p95"]') == "96"
        assert text(page, f'{general} td[data-field="p99"]') == "121"
        assert text(page, f'{general} td[data-field="errors"]') == "4.0%"
        assert text(page, f'{general} td[data-field="lag"]') == "17"
        assert page.locator("#chart-throughput").get_attribute("data-points") == "2"
        assert chart_last(page, "#chart-throughput") == {"general": 7.25}
        assert chart_last(page, '[data-chart="latency"][data-pool="general"]') == {
            "p50": 41,
            "p95": 96,
            "p99": 121,
        }
        assert page.locator("#chart-throughput canvas").count() == 1  # uPlot drew it

        w1 = '#worker-table tr[data-worker="w-1"]'
        assert text(page, f'{w1} td[data-field="memory"]') == "100.0"
        assert text(page, f'{w1} td[data-field="breaker"]') == "open"
        assert chart_last(page, "#chart-in-flight") == {"general/w-1": 3}

        qa = '.program[data-program="qa"]'
        assert text(page, f'{qa} .weights tr[data-variant="local"] td[data-field="share"]') == (
            "75.0%"
        )
        assert text(page, f'{qa} .changes tr[data-version="2"] td[data-field="reason"]') == (
            "local: +20% success"
        )
        assert page.locator(f'{qa} [data-chart="weights"]').get_attribute("data-points") == "2"
        local = f'{qa} .variants tr[data-variant="local"]'
        assert text(page, f'{local} td[data-field="rate"]') == "5.50"
        assert text(page, f'{local} td[data-field="p95"]') == "650"

        dlq = '#dlq-table tr[data-component="router"][data-stage="validate"]'
        assert text(page, f'{dlq}[data-error-class="InvalidRequest"] td[data-field="count"]') == "3"
        assert (
            text(page, '#gauge-table tr[data-gauge="pipeline.active_runs"] td[data-field="value"]')
            == "2"
        )
        assert text(page, "#status") == "live"

        # produced after the page loaded: it must appear without a reload
        loaded_version = int(page.locator("body").get_attribute("data-version") or "-1")
        out.pool("general", now + WINDOW_MS, 33.5, 42, 97, 122)
        out.table(3, now, {"echo": 0.5, "local": 0.5}, "echo recovered")
        out.dead_letter(3, "decode", "CorruptRecord")
        out.flush()
        wait_text(page, f'{general} td[data-field="rate"]', "33.50")
        wait_text(page, f"{qa} .current", "version 3")
        wait_text(page, "#dlq-total", "4")
        assert int(page.locator("body").get_attribute("data-version") or "-1") > loaded_version
        assert chart_last(page, "#chart-throughput") == {"general": 33.5}
        assert page.locator(f'{qa} [data-chart="weights"]').get_attribute("data-points") == "3"
        assert text(page, f'{qa} .changes tr[data-version="3"] td[data-field="reason"]') == (
            "echo recovered"
        )

        ARTIFACTS.mkdir(exist_ok=True)
        screenshot = ARTIFACTS / "dashboard.png"
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    assert screenshot.stat().st_size > 10_000
    record_property("screenshot", str(screenshot))
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    if reporter:
        reporter.write_line(f"\ndashboard screenshot: {screenshot}")
