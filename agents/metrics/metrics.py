"""The metrics agent: telemetry in, MetricSnapshots on ``metrics`` and Prometheus metrics out.

:class:`Metrics` is the logic, free of faust: it decodes one telemetry record,
updates the Prometheus series (:class:`Exporter`) and files the execution into
its tumbling window (:mod:`dspex.agents.metrics.windows`); closed windows become
MetricSnapshots. :class:`MetricsApp` wires it into a faust app: one agent on
``telemetry``, a timer that closes due windows and adds each pool's consumer lag
(``pool.lag``) and each live worker's health (``worker.*``), the Prometheus HTTP
server (on a free port when the configured one is taken), and optionally a
reader of the ``routing`` topic for ``dspex_routing_weight``.

Windows live in memory, not in faust tables: every number here is derived from
``telemetry`` and the pools' offsets, and ``docs/metrics.md`` says what a restart
costs. Start it with ``make_metrics(settings).run()``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from dspex.agents.metrics.windows import BadTelemetry, Closed, Sample, Windows, gauge, snapshots
from dspex.agents.plumbing.catalog import CompactedReader
from dspex.agents.plumbing.faustapp import faust_app, send, serve_until_signalled
from dspex.agents.plumbing.messages import Consumed, ErrorInfo, Outgoing
from dspex.agents.plumbing.records import dead_letter
from dspex.schemas.records import Record
from dspex.streams import kafka
from dspex.streams.errors import SerdeError
from dspex.streams.ops.admin import require_topics
from dspex.streams.reader import group_lag
from dspex.streams.serde import Serde, make_serde
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics

logger = logging.getLogger(__name__)

COMPONENT = "metrics"
ADMIN_TIMEOUT_S = 10.0
SERIES = ("program", "pool", "variant")
# seconds: from a cached answer (ms) to a slow optimizer job (minutes)
_BREAKER_LEVEL = {"open": 1.0, "half-open": 0.5, "closed": 0.0}
WORKER_GAUGES = ("worker.in_flight", "worker.memory_bytes", "worker.breaker_open")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Exporter:
    """The Prometheus series; ``registry`` is injectable so tests can read sample values."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "dspex_requests", "Executions measured.", [*SERIES, "outcome"], registry=registry
        )
        self.latency = Histogram(
            "dspex_request_latency_seconds",
            "End-to-end latency: request created to final response.",
            SERIES,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "dspex_queue_wait_seconds",
            "Time from request creation to the start of its execution.",
            SERIES,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter("dspex_tokens", "LM tokens used.", SERIES, registry=registry)
        self.cost = Counter("dspex_cost_usd", "Estimated LM cost (USD).", SERIES, registry=registry)
        self.tenant_requests = Counter(
            "dspex_tenant_requests",
            "Executions measured, per tenant (docs/tenants.md).",
            ["tenant", "outcome"],
            registry=registry,
        )
        self.tenant_tokens = Counter(
            "dspex_tenant_tokens", "LM tokens used, per tenant.", ["tenant"], registry=registry
        )
        self.lag = Gauge(
            "dspex_pool_lag_messages",
            "Requests not yet consumed, per pool.",
            ["pool"],
            registry=registry,
        )
        self.weight = Gauge(
            "dspex_routing_weight",
            "Routing table weight.",
            ["program", "variant"],
            registry=registry,
        )
        self.dropped = Counter(
            "dspex_telemetry_dropped",
            "Telemetry records not counted (undecodable, invalid, late).",
            ["reason"],
            registry=registry,
        )
        self.recommended = Gauge(
            "dspex_pool_recommended_consumers",
            "Consumers per pool the learning agent recommends (KEDA scales on it).",
            ["pool"],
            registry=registry,
        )
        worker = ["pool", "worker"]
        self.in_flight = Gauge(
            "dspex_worker_in_flight", "Requests a worker is running.", worker, registry=registry
        )
        self.memory = Gauge(
            "dspex_worker_memory_bytes", "Resident memory of a worker.", worker, registry=registry
        )
        self.breaker_open = Gauge(
            "dspex_worker_breaker_open",
            "1 when one of the worker's LM circuit breakers is open, 0.5 half-open, 0 closed.",
            worker,
            registry=registry,
        )
        self._variants: dict[str, set[str]] = {}
        self._workers: dict[tuple[str, str], float] = {}
        # (pool, worker) -> the WORKER_GAUGES' latest values, for the worker.* snapshots
        self.health: dict[tuple[str, str], dict[str, float]] = {}

    def observe_health(self, record: Record, now_s: float, forget_after_s: float) -> None:
        """Set one worker's gauges; forget workers silent for ``forget_after_s``."""
        sample = record.get("health") or {}
        labels = (str(record.get("pool") or ""), str(record.get("worker_id") or ""))
        values = (
            max(0, int(sample.get("in_flight") or 0)),
            max(0, int(sample.get("memory_bytes") or 0)),
            _BREAKER_LEVEL.get(str(sample.get("breaker_state")), 0.0),
        )
        gauges = (self.in_flight, self.memory, self.breaker_open)
        for series, value in zip(gauges, values, strict=True):
            series.labels(*labels).set(value)
        self.health[labels] = {n: float(v) for n, v in zip(WORKER_GAUGES, values, strict=True)}
        self._workers[labels] = now_s
        for gone in [w for w, seen in self._workers.items() if now_s - seen > forget_after_s]:
            del self._workers[gone]
            del self.health[gone]
            for series in (self.in_flight, self.memory, self.breaker_open):
                series.remove(*gone)

    def observe(self, sample: Sample) -> None:
        """Count one execution."""
        labels = sample.key[:3]  # per-tenant series: MetricSnapshot labels, dspex_tenant_*
        if sample.tenant:
            self.tenant_requests.labels(sample.tenant, sample.outcome).inc()
            self.tenant_tokens.labels(sample.tenant).inc(sample.tokens)
        self.requests.labels(*labels, sample.outcome).inc()
        if sample.latency_ms is not None:
            self.latency.labels(*labels).observe(sample.latency_ms / 1000.0)
        if sample.queue_wait_ms is not None:
            self.queue_wait.labels(*labels).observe(sample.queue_wait_ms / 1000.0)
        self.tokens.labels(*labels).inc(sample.tokens)
        self.cost.labels(*labels).inc(sample.cost_usd)

    def apply_routing(self, key: str, table: Record | None) -> None:
        """Follow one ``routing`` record: set each variant's weight, forget dropped variants."""
        program = table["program_id"] if table is not None else key
        now = {v["name"]: float(v["weight"]) for v in (table or {}).get("variants", [])}
        for gone in self._variants.get(program, set()) - set(now):
            self.weight.remove(program, gone)
        for variant, weight in now.items():
            self.weight.labels(program, variant).set(weight)
        self._variants[program] = set(now)
        for pool, consumers in ((table or {}).get("pool_hints") or {}).items():
            self.recommended.labels(pool).set(consumers)  # the latest table's view of all load


@dataclass
class Metrics:
    """Telemetry in, windows and exporter updated, snapshots out; no faust."""

    settings: Settings
    serde: Serde
    exporter: Exporter
    clock: Callable[[], float] = time.time
    windows: Windows = field(init=False)

    def __post_init__(self) -> None:
        config = self.settings.metrics
        self.windows = Windows(config.window_s, config.grace_s, config.max_samples)
        topics = Topics(self.settings.topics)
        self.metrics_topic = topics.name("metrics")
        self.dlq_topic = topics.name("dlq")

    def take(self, original: Consumed) -> list[Outgoing]:
        """One telemetry record; an undecodable one becomes a DeadLetter."""
        try:
            if original.value is None:
                raise SerdeError("tombstone where Telemetry was expected", topic=original.topic)
            decoded = self.serde.decode(original.value, topic=original.topic, expect="Telemetry")
        except SerdeError as exc:
            logger.warning("undecodable telemetry %s error=%s", original.where(), exc)
            self.exporter.dropped.labels("undecodable").inc()
            return [self._dead_letter(original, exc)]
        self.observe(decoded.record, original)
        return []

    def observe(self, record: Record, original: Consumed | None = None) -> bool:
        """Count one decoded Telemetry record; ``False`` when it was not counted."""
        if record.get("kind") == "health" and record.get("health") is not None:
            forget = 5 * self.settings.metrics.worker_health_interval_s
            self.exporter.observe_health(record, self.clock(), forget)
            return True
        try:
            sample = Sample.of(record)
        except BadTelemetry as exc:
            where = original.where() if original else ""
            logger.info("invalid telemetry %s error=%s", where, exc)
            self.exporter.dropped.labels("invalid").inc()
            return False
        if sample is None:
            return False
        if not self.windows.add(sample, self._now_ms()):
            self.exporter.dropped.labels("late").inc()
            return False
        self.exporter.observe(sample)
        return True

    def due(self) -> list[Closed]:
        """Windows to publish now."""
        return self.windows.close_due(self._now_ms())

    def encode(self, closed: Closed) -> list[Outgoing]:
        """The MetricSnapshots of one closed window, keyed by metric name."""
        window_s = self.settings.metrics.window_s
        return [self.snapshot(name, r) for name, r in snapshots(closed, window_s)]

    def lag_snapshots(self, closed: Closed, lags: Mapping[str, int]) -> list[Outgoing]:
        """``pool.lag`` snapshots (value = messages behind) for the window just closed."""
        out = []
        for pool, lag in sorted(lags.items()):
            self.exporter.lag.labels(pool).set(lag)
            record = gauge("pool.lag", {"pool": pool}, closed.start_ms, closed.end_ms, float(lag))
            out.append(self.snapshot("pool.lag", record))
        return out

    def health_snapshots(self, closed: Closed) -> list[Outgoing]:
        """``worker.*`` snapshots (value = the latest sample) of every worker heard lately."""
        out = []
        for (pool, worker), values in sorted(self.exporter.health.items()):
            labels = {"pool": pool, "worker": worker}
            for name, value in values.items():
                record = gauge(name, labels, closed.start_ms, closed.end_ms, value)
                out.append(self.snapshot(name, record))
        return out

    def snapshot(self, name: str, record: Record) -> Outgoing:
        value = self.serde.encode("MetricSnapshot", record, topic=self.metrics_topic)
        return Outgoing(self.metrics_topic, name.encode("utf-8"), value)

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _dead_letter(self, original: Consumed, exc: Exception) -> Outgoing:
        failure = ErrorInfo.from_exception(exc, "decode")
        record = dead_letter(original, failure, component=COMPONENT, failed_at_ms=self._now_ms())
        value = self.serde.encode("DeadLetter", record, topic=self.dlq_topic)
        return Outgoing(self.dlq_topic, original.key, value)


def pool_lags(settings: Settings, groups: Mapping[str, tuple[str, str]]) -> dict[str, int]:
    """Messages behind per pool: ``groups`` maps pool -> (consumer group, topic).

    A partition the group never committed counts from its earliest offset. A pool
    whose offsets cannot be read is left out (and logged), never a crash.
    """
    lags = {}
    for pool, (group, topic) in groups.items():
        try:
            lags[pool] = group_lag(settings, group, topic, ADMIN_TIMEOUT_S)
        except Exception as exc:
            logger.warning("consumer lag unavailable pool=%s group=%s error=%s", pool, group, exc)
    return lags


class MetricsApp:
    """The metrics agent: faust app, exporter, routing reader; start/stop or ``run()``."""

    def __init__(self, settings: Settings, *, app_id: str, registry: CollectorRegistry) -> None:
        self.settings = settings
        self._topics = Topics(settings.topics)
        serde = make_serde(settings)
        self._bootstrap = kafka.bootstrap_servers(settings)
        self.app: Any = faust_app(settings, app_id, self._bootstrap)
        self.exporter = Exporter(registry)
        self.metrics = Metrics(settings, serde, self.exporter)
        views = {self._topics.name("routing"): ("RoutingTable", self.exporter.apply_routing)}
        self.reader = CompactedReader(settings, serde, views)
        self._server: Any = None
        self.port: int | None = None
        self._add_agents()

    def _add_agents(self) -> None:
        telemetry = self.app.topic(
            self._topics.name("telemetry"), key_serializer="raw", value_serializer="raw"
        )
        self.app.agent(telemetry, name="aggregate", concurrency=1)(self._aggregate)
        tick = min(1.0, max(self.settings.metrics.window_s / 4, 0.1))
        self.app.timer(tick, name="close-windows")(self._tick)

    async def _aggregate(self, stream: Any) -> None:
        async for event in stream.events():
            original = Consumed.from_faust(event.message)
            try:
                for out in self.metrics.take(original):
                    await self._send(out)
            except Exception:  # one bad record must not stop the metrics
                logger.exception("aggregating failed %s", original.where())

    async def _tick(self, _app: Any) -> None:
        try:
            await self.publish_due()
        except Exception:
            logger.exception("publishing metric snapshots failed")

    async def publish_due(self) -> int:
        """Publish every closed window (and, for the newest, the pools' lag); snapshots sent."""
        closed = self.metrics.due()
        outgoing = [out for window in closed for out in self.metrics.encode(window)]
        if closed:
            lags = await asyncio.to_thread(pool_lags, self.settings, self._lag_groups())
            outgoing += self.metrics.lag_snapshots(closed[-1], lags)
            outgoing += self.metrics.health_snapshots(closed[-1])
        for out in outgoing:
            await self._send(out)
        return len(outgoing)

    def _lag_groups(self) -> dict[str, tuple[str, str]]:
        prefix = self.settings.topics.prefix
        pools = [name for name, _ in self.settings.pools.items()]
        return {p: (f"{prefix}pool.{p}", self._topics.name(f"pool.{p}")) for p in pools}

    async def _send(self, out: Outgoing) -> None:
        await send(self.app, out)

    async def start(self) -> None:
        """Check the topics, serve Prometheus, follow routing, then start aggregating."""
        partitions = await asyncio.to_thread(self._check_topics)
        config = self.settings.metrics
        if config.prometheus_port:
            self._serve_prometheus(config.bind_host, config.prometheus_port)
        if config.routing_weights:
            routing = self._topics.name("routing")
            await self.reader.start({routing: partitions[routing]})
        await self.app.start()

    def _serve_prometheus(self, host: str, port: int) -> None:
        self._server = serve_exporter(self.exporter.registry, host, port)
        self.port = int(self._server.server_port) if self._server is not None else None

    async def stop(self) -> None:
        """Stop aggregating, the reader and the HTTP server (open windows are not published)."""
        await self.app.stop()
        await self.reader.stop()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def run(self) -> None:
        """Serve until SIGINT/SIGTERM (the ``python -m dspex.agents metrics`` entry point)."""
        serve_until_signalled(self)

    def _check_topics(self) -> dict[str, int]:
        # short-lived: an admin handle kept across a broker restart can abort the process
        names = [self._topics.name(short) for short in ("telemetry", "metrics", "routing", "dlq")]
        return require_topics(kafka.admin_client(self.settings), names, "metrics")


def serve_exporter(registry: CollectorRegistry, host: str, port: int) -> Any:
    """The Prometheus HTTP server on ``host:port``, else on a free port when that is taken.

    A second DSPex stack on one machine finds the port taken: it serves on another
    and says which in a warning. Any other failure is logged and gives ``None``: the
    snapshots must go on (Prometheus shows the target as down).
    """
    try:
        try:
            server, _ = start_http_server(port, host, registry)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or port == 0:
                raise
            server, _ = start_http_server(0, host, registry)
            logger.warning(
                "prometheus exporter port %s taken; serving on %s:%s",
                port,
                host,
                server.server_port,
            )
    except OSError as exc:
        logger.error("prometheus exporter not started host=%s port=%s error=%s", host, port, exc)
        return None
    logger.info("prometheus exporter on %s:%s", host, server.server_port)
    return server


def make_metrics(
    settings: Settings, *, app_id: str | None = None, registry: CollectorRegistry | None = None
) -> MetricsApp:
    """The metrics agent for ``settings``; ``app_id`` (faust id and consumer group) defaults
    to ``<prefix>metrics``, ``registry`` to a fresh ``CollectorRegistry``."""
    return MetricsApp(
        settings,
        app_id=app_id or f"{settings.topics.prefix}metrics",
        registry=registry if registry is not None else CollectorRegistry(),
    )
