"""The run's stages against a live broker: the ceiling, the pipeline, scaling, profiling.

Each stage starts what it needs and stops it before returning, also on errors.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient

from dspex.streams import kafka
from dspex.streams.client.client import AsyncClient
from dspex.streams.serde import make_serde
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics
from tests.bench import ceiling, pipeline, trace
from tests.bench.config import BenchConfig
from tests.bench.cpu import CpuMeter
from tests.bench.messages import Payloads
from tests.bench.stack import AgentProcess, Broker, agent_env, bench_settings, wait_for_members


def run_ceiling(settings: Settings, cfg: BenchConfig, broker: Broker) -> dict[str, Any]:
    """Figure 1 at linger 0 (the ceiling) and at linger 5 ms (DSPex's producer default)."""
    payloads = Payloads.build(make_serde(settings), settings.topics.prefix)
    best = _relay_figures(settings, cfg, broker, payloads, linger_ms=0)
    dspex_linger = _relay_figures(settings, cfg, broker, payloads, linger_ms=5)
    two_hop = _relay_figures(settings, cfg, broker, payloads, linger_ms=0, hops=ceiling.TWO_HOPS)
    return {
        "hops": list(ceiling.HOPS),
        "sizes_bytes": payloads.sizes(),
        "producer_tuning": ceiling.PRODUCER_TUNING,
        "consumer_tuning": ceiling.CONSUMER_TUNING,
        **best,
        "linger_5ms": dspex_linger,
        "two_hop": two_hop,
    }


def _relay_figures(
    settings: Settings,
    cfg: BenchConfig,
    broker: Broker,
    payloads: Payloads,
    linger_ms: float,
    hops: tuple[str, ...] = ceiling.HOPS,
) -> dict[str, Any]:
    prefix = f"{settings.topics.prefix}ceiling{linger_ms:g}.{len(hops)}."
    relay = ceiling.Relay(bench_settings(broker.bootstrap, prefix), payloads, linger_ms, hops)
    try:
        # warm up connections, the producer id and a freshly started broker's JIT
        ceiling.paced(relay, 200, 0.5, offset=10**8)
        ceiling.saturate(relay, cfg.ceiling_messages, cfg.ceiling_window, offset=2 * 10**8)
        meter = CpuMeter({"client": os.getpid(), "broker": broker.pid})
        meter.start()
        saturated = ceiling.saturate(relay, cfg.ceiling_messages, cfg.ceiling_window)
        saturated["cpu_percent"] = meter.stop()
        latency = ceiling.paced(relay, cfg.paced_rate, cfg.ceiling_paced_s, offset=10**7)
    finally:
        relay.close()
    return {"saturation": saturated, "paced": latency}


def probe_consume_batch(settings: Settings, wanted: int, timeout_s: float) -> dict[str, Any]:
    """How long ``Consumer.consume(wanted, timeout_s)`` blocks with one message ready.

    The worker fetches with ``consume(free_slots, poll_timeout_s)``; librdkafka
    returns only when the batch is full or the timeout expires.
    """
    topic = Topics(settings.topics).name("executions")
    consumer = kafka.consumer(settings, f"{topic}.probe")
    consumer.assign([TopicPartition(topic, 0, 0)])
    producer = kafka.producer(settings, **{"linger.ms": 0})
    waits = []
    try:
        for _ in range(3):
            producer.produce(topic, b"probe", b"probe", partition=0)
            producer.flush(10)
            started = time.perf_counter()
            got = consumer.consume(wanted, timeout_s)
            waits.append((time.perf_counter() - started) * 1000)
            if not got:
                consumer.consume(1, 5.0)
    finally:
        consumer.close()
    return {"wanted": wanted, "timeout_ms": timeout_s * 1000, "blocked_ms": round(min(waits), 1)}


class Stack:
    """The router and the general pool's worker processes of one run."""

    def __init__(self, settings: Settings, cfg: BenchConfig, broker: Broker, workdir: Path):
        self.settings = settings
        self.broker = broker
        self.workdir = workdir
        self.env = agent_env(settings, cfg.worker_in_flight)
        self.group = f"{settings.topics.prefix}pool.general"
        self.router: AgentProcess | None = None
        self.workers: list[AgentProcess] = []

    def start_router(self, profile: Path | None = None, *, module: str | None = None) -> None:
        """``python -m dspex.agents router``, or ``module`` (an experimental router) instead."""
        if module is not None:
            self.router = AgentProcess("router", [], self.env, self.workdir, profile, module)
        else:
            self.router = AgentProcess("router", ["router"], self.env, self.workdir, profile)

    def add_workers(self, total: int, profile: Path | None = None) -> None:
        while len(self.workers) < total:
            name = f"worker-{len(self.workers) + 1}"
            args = ["worker", "--pool", "general"]
            self.workers.append(AgentProcess(name, args, self.env, self.workdir, profile))

    async def wait_ready(self, admin: AdminClient) -> None:
        """The pool group and the router's group are stable with every member assigned."""
        procs = [p for p in (self.router, *self.workers) if p is not None]
        await asyncio.to_thread(wait_for_members, admin, self.group, len(self.workers), procs)
        router_group = f"{self.settings.topics.prefix}router"
        await asyncio.to_thread(wait_for_members, admin, router_group, 1, procs)

    def pids(self) -> dict[str, int | None]:
        pids: dict[str, int | None] = {"router": self.router.pid if self.router else None}
        pids.update({w.name: w.pid for w in self.workers})
        return {**pids, "client": os.getpid(), "broker": self.broker.pid}

    def stop(self) -> dict[str, int | None]:
        """Stop the workers, then the router; return their exit codes."""
        codes = {w.name: w.stop() for w in self.workers}
        if self.router is not None:
            codes["router"] = self.router.stop()
        self.workers, self.router = [], None
        return codes


async def measured(stack: Stack, work: Any) -> dict[str, Any]:
    """Await ``work`` and attach the CPU each process used meanwhile."""
    meter = CpuMeter(stack.pids())
    meter.start()
    figures: dict[str, Any] = await work
    figures["cpu_percent"] = meter.stop()
    return figures


async def run_pipeline(
    stack: Stack, admin: AdminClient, cfg: BenchConfig
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Figures 2 and 4: one-worker figures, then miss saturation at each worker count."""
    stack.start_router()
    figures: dict[str, Any] = {}
    scaling: list[dict[str, Any]] = []
    try:
        async with AsyncClient(stack.settings) as client:
            for n in cfg.scaling:
                stack.add_workers(n)
                await stack.wait_ready(admin)
                await pipeline.warm_up(client, cfg.warm_up_requests, offset=n * 10**6)
                step = await measured(
                    stack, pipeline.saturate(client, cfg.miss_requests, cache_hits=False)
                )
                scaling.append({"workers": n, **step})
                if n == 1:
                    figures = {"miss_saturation": step, **await _one_worker(stack, client, cfg)}
    finally:
        figures["exit_codes"] = stack.stop()
    return figures, scaling


async def _one_worker(stack: Stack, client: AsyncClient, cfg: BenchConfig) -> dict[str, Any]:
    tries = await pipeline.warm_cache(client)
    hits = await measured(stack, pipeline.saturate(client, cfg.hit_requests, cache_hits=True))
    rate, duration = cfg.paced_rate, cfg.paced_s
    traced: list[trace.Sample] = []
    miss = await measured(
        stack, pipeline.paced(client, rate, duration, cache_hits=False, traced=traced)
    )
    miss["stages_ms"] = await asyncio.to_thread(trace.breakdown, stack.settings, traced)
    hit = await measured(stack, pipeline.paced(client, rate, duration, cache_hits=True))
    return {
        "cache_warm_requests": tries,
        "hit_saturation": hits,
        "miss_paced": miss,
        "hit_paced": hit,
    }


async def run_profiles(
    stack: Stack, admin: AdminClient, cfg: BenchConfig, out: Path
) -> dict[str, str]:
    """Router and one worker under pyinstrument, the client in-process, at saturation."""
    from pyinstrument import Profiler

    out = out.resolve()  # the agents run in their own working directory
    files = {"router": out / "profile-router.txt", "worker": out / "profile-worker.txt"}
    stack.start_router(profile=files["router"])
    stack.add_workers(1, profile=files["worker"])
    try:
        async with AsyncClient(stack.settings) as client:
            await stack.wait_ready(admin)
            await pipeline.warm_up(client, 10, offset=9 * 10**6)
            await pipeline.saturate(client, cfg.profile_requests, cache_hits=False)
            await pipeline.warm_cache(client)
            profiler = Profiler(async_mode="disabled")
            with profiler:
                await pipeline.saturate(client, cfg.profile_requests * 2, cache_hits=True)
            files["client"] = out / "profile-client.txt"
            files["client"].write_text(profiler.output_text(unicode=True, color=False))
    finally:
        stack.stop()
    return {name: path.name for name, path in files.items() if path.exists()}
