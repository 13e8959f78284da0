"""The two DSPex arms of the routing benchmark: learned routing and static uniform routing.

Both run the real pipeline on the run's broker under their own topic prefix:
``AsyncClient`` -> router agent -> general-pool worker -> simulated backend ->
client, as real processes (``python -m dspex.agents router|worker|learner``). The
simulated backends are ordinary LM backends in the agents' settings
(``lm.backends.<name>``: ``openai/<name>`` with ``api_base`` at the simulation),
each falling back to the others, like LiteLLM's router retrying another
deployment. The registered program ``routing.qa`` starts with a uniform
RoutingTable over them (version 1). In the *learned* arm the learning agent
runs and replaces that table from telemetry; in the *static* arm it does not run,
so the uniform table stays.

Quality reaches the learner in one of two ways (``quality_source``): the worker
scores each answer against the gold answer every request carries
(``metadata["dspex.gold"]``, metric ``exact_match``: "worker"), or the client
sends its own exact-match score with ``send_feedback`` ("client").
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka.admin import AdminClient

from dspex.agents.worker.handler import GOLD as GOLD_KEY
from dspex.agents.worker.handler import METRIC as METRIC_KEY
from dspex.streams import kafka
from dspex.streams.client.client import AsyncClient, Program
from dspex.streams.serde import make_serde
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics
from tests.bench.routing_sim import Backend, SimFleet
from tests.bench.routing_workload import Outcome, Task, drive, is_correct, tasks
from tests.bench.stack import (
    AgentProcess,
    agent_env,
    bench_settings,
    catalog_topics,
    wait_for_members,
)

logger = logging.getLogger(__name__)

PROGRAM_ID = "routing.qa"
SIGNATURE = "question -> answer"
METRIC = "exact_match"
DEADLINE_S = 30.0
WARM_UP_QID = 900_000
"""Warm-up questions have ids far beyond the workload's, so they never share its draws."""


@dataclass(frozen=True)
class ArmSetup:
    """Everything one DSPex arm needs: where, what, how hard."""

    bootstrap: str
    prefix: str
    workdir: Path
    """Agents run here, one directory per arm, and leave their logs (kept with the report)."""
    backends: Sequence[Backend]
    fleet: SimFleet
    concurrency: int
    workers: int
    in_flight: int
    learner_env: dict[str, str]


def backend_env(fleet: SimFleet, backends: Sequence[Backend]) -> dict[str, str]:
    """``DSPEX_*`` variables making each simulated backend a variant, backed up by the others."""
    names = [b.name for b in backends]
    configured = {
        name: {"model": f"openai/{name}", "api_base": fleet.api_base(name), "api_key": "sim"}
        for name in names
    }
    fallbacks = {name: [other for other in names if other != name] for name in names}
    return {
        "DSPEX_LM__BACKENDS": json.dumps(configured),
        "DSPEX_LM__DEFAULT_VARIANT": names[0],
        "DSPEX_RELIABILITY__FALLBACKS": json.dumps(fallbacks),
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no network fetch at import
    }


def uniform_table(backends: Sequence[Backend]) -> dict[str, Any]:
    """Version 1 of the program's table: every backend, equal weights."""
    weight = round(1.0 / len(backends), 6)
    return {
        "program_id": PROGRAM_ID,
        "version": 1,
        "created_at": int(time.time() * 1000),
        "objective": "static uniform (benchmark)",
        "reason": "static: equal weights over the simulated backends",
        "variants": [
            {
                "name": b.name,
                "model": None,
                "module_type": None,
                "pool": "general",
                "weight": weight,
                "variables": {},
            }
            for b in backends
        ],
        "fallback": [b.name for b in backends],
        "learned_from": [],
        "pool_hints": {},
    }


class _Agents:
    """The arm's agent processes: router, workers and (learned arm) the learning agent."""

    def __init__(self, setup: ArmSetup, settings: Settings, learn: bool) -> None:
        env = {
            **agent_env(settings, setup.in_flight),
            **backend_env(setup.fleet, setup.backends),
            **(setup.learner_env if learn else {}),
        }
        self.settings = settings
        workdir = setup.workdir / ("learned" if learn else "static")
        workdir.mkdir(parents=True, exist_ok=True)
        self.procs = [AgentProcess("router", ["router"], env, workdir, None)]
        for i in range(setup.workers):
            args = ["worker", "--pool", "general"]
            self.procs.append(AgentProcess(f"worker-{i + 1}", args, env, workdir, None))
        if learn:
            self.procs.append(AgentProcess("learner", ["learner"], env, workdir, None))
        self.workers = setup.workers
        self.learn = learn

    async def wait_ready(self, admin: AdminClient) -> None:
        prefix = self.settings.topics.prefix
        groups = [(f"{prefix}pool.general", self.workers), (f"{prefix}router", 1)]
        if self.learn:
            groups.append((f"{prefix}learner", 1))
        for group, count in groups:
            await asyncio.to_thread(wait_for_members, admin, group, count, self.procs)

    def pids(self) -> dict[str, int]:
        return {p.name: p.pid for p in self.procs}

    def stop(self) -> dict[str, int | None]:
        return {p.name: p.stop() for p in reversed(self.procs)}

    def logged_errors(self) -> dict[str, int]:
        """ERROR lines per agent log: a learner that crashes on every table shows here."""
        return {p.name: p.log.read_text(errors="replace").count("level=ERROR") for p in self.procs}


async def run_arm(
    setup: ArmSetup,
    work: Sequence[Task],
    *,
    learn: bool,
    quality_source: str,
    hooks: dict[int, Callable[[], Awaitable[None]]],
) -> tuple[list[Outcome], dict[str, Any]]:
    """One arm, start to finish: topics, table, agents, warm-up, the workload; then clean up."""
    settings = bench_settings(setup.bootstrap, setup.prefix)
    with catalog_topics(settings) as admin:
        async with AsyncClient(settings) as client:
            await client.publish_program(PROGRAM_ID, SIGNATURE, metric=METRIC)
            await asyncio.to_thread(publish_table, settings, uniform_table(setup.backends))
            if learn:
                await asyncio.to_thread(create_stats_changelog, admin, settings)
            agents = _Agents(setup, settings, learn)
            try:
                await agents.wait_ready(admin)
                source = await _warm_up(client, settings, learn, quality_source)
                await asyncio.to_thread(setup.fleet.reset)
                ask = Asker(client, feedback=source == "client")
                started_wall = time.time()
                outcomes = await drive(work, setup.concurrency, ask.ask, hooks)
                await ask.flush()
            finally:
                codes = await asyncio.to_thread(agents.stop)
        details: dict[str, Any] = {
            "exit_codes": codes,
            "logged_errors": agents.logged_errors(),
            "quality_source": source,
        }
        if learn:
            details["tables"] = _table_timeline(read_tables(settings), started_wall)
    return outcomes, details


async def _warm_up(
    client: AsyncClient, settings: Settings, learn: bool, quality_source: str
) -> str:
    """Build the program and the LMs in the worker; find out who scores quality.

    The learned arm warms up with an inline program, which the learner ignores;
    the static arm (no learner) uses the registered one and, when asked to
    (``auto``), checks whether the worker put a quality score in Telemetry.
    """
    program: Program | str = Program.inline(SIGNATURE) if learn else PROGRAM_ID
    warm = tasks(8, seed=1, first_qid=WARM_UP_QID)
    ask = Asker(client, feedback=False, program=program)
    await drive(warm, 4, ask.ask)
    if quality_source != "auto":
        return quality_source
    if learn:
        raise ValueError("quality_source 'auto' is decided by the static arm; pass the result")
    scored = await asyncio.to_thread(worker_scored_quality, settings)
    return "worker" if scored else "client"


class Asker:
    """Asks one question through the client; optionally sends the client's quality score."""

    def __init__(
        self, client: AsyncClient, *, feedback: bool, program: Program | str = PROGRAM_ID
    ) -> None:
        self.client = client
        self.feedback = feedback
        self.program = program
        self.pending: list[asyncio.Task[None]] = []

    async def ask(self, task: Task) -> str:
        gold = json.dumps({"answer": task.gold})
        result = await self.client.submit(
            self.program,
            {"question": task.question},
            cache=False,
            deadline_s=DEADLINE_S,
            metadata={GOLD_KEY: gold, METRIC_KEY: METRIC},
        )
        answer = str(result.outputs.get("answer", ""))
        if self.feedback:
            score = 1.0 if is_correct(answer, task.gold) else 0.0
            send = self.client.send_feedback(result, score, program_id=PROGRAM_ID)
            self.pending.append(asyncio.create_task(send))  # off the caller's clock
        return answer

    async def flush(self) -> None:
        await asyncio.gather(*self.pending, return_exceptions=True)


def create_stats_changelog(admin: AdminClient, settings: Settings) -> None:
    """Create the learner's faust changelog topic before the learner starts.

    faust declares it at start-up, racing its own consumer's first metadata
    fetch; when the topic comes second, every telemetry record fails with
    ``PartitionsMismatch`` (changelog "has 0 partitions") until the consumer's
    metadata refresh, minutes later, and the learner publishes nothing. Seen in
    one of three full runs; creating it first, as an operator can, avoids it.
    """
    from confluent_kafka.admin import NewTopic

    name = f"{settings.topics.prefix}learner-stats-changelog"
    partitions = Topics(settings.topics).spec("telemetry").partitions
    replicas = settings.topics.replication_factor or 1  # the bench runs one broker
    topic = NewTopic(name, partitions, replicas, config={"cleanup.policy": "compact"})
    for future in admin.create_topics([topic], operation_timeout=30).values():
        future.result()


def publish_table(settings: Settings, table: dict[str, Any]) -> None:
    """Produce a RoutingTable to the compacted routing topic, keyed by program id."""
    topic = Topics(settings.topics).name("routing")
    value = make_serde(settings).encode("RoutingTable", table, topic=topic)
    producer = kafka.producer(settings)
    producer.produce(topic, key=table["program_id"].encode(), value=value)
    if producer.flush(30):
        raise RuntimeError(f"routing table not delivered to {topic}")


def _read_topic(settings: Settings, short: str, schema: str, idle_s: float = 2.0) -> list[Any]:
    """Every record on one of the run's topics, from the beginning; undecodable ones are
    logged (a schema released after this process started cannot be read by it)."""
    from confluent_kafka import TopicPartition

    topic = Topics(settings.topics).name(short)
    consumer = kafka.consumer(settings, f"{settings.topics.prefix}bench-reader-{os.getpid()}")
    serde = make_serde(settings)
    records, undecodable = [], []
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        last = time.monotonic()
        while time.monotonic() - last < idle_s:
            message = consumer.poll(0.2)
            value = None if message is None or message.error() else message.value()
            if value is None:
                continue
            last = time.monotonic()
            try:
                records.append(serde.decode(bytes(value), topic=topic, expect=schema).record)
            except Exception as exc:
                undecodable.append(f"{type(exc).__name__}: {exc}")
    finally:
        consumer.close()
    if undecodable:
        logger.warning("%d undecodable records on %s: %s", len(undecodable), topic, undecodable[0])
    return records


def read_tables(settings: Settings) -> list[dict[str, Any]]:
    """The program's RoutingTables, oldest first."""
    tables = [t for t in _read_topic(settings, "routing", "RoutingTable")]
    mine = [t for t in tables if t.get("program_id") == PROGRAM_ID]
    return sorted(mine, key=lambda t: int(t["version"]))


def worker_scored_quality(settings: Settings) -> bool:
    """Whether the worker put a quality score in any execution Telemetry of the program."""
    records = _read_topic(settings, "telemetry", "Telemetry", idle_s=3.0)
    return any(
        r.get("kind") == "execution"
        and r.get("program_id") == PROGRAM_ID
        and r.get("quality") is not None
        for r in records
    )


def _table_timeline(tables: list[dict[str, Any]], started_wall: float) -> list[dict[str, Any]]:
    """Each table's version, seconds since the workload started, weights and reason."""
    timeline = []
    for table in tables:
        created = table["created_at"]
        created_s = created.timestamp() if hasattr(created, "timestamp") else created / 1000
        timeline.append(
            {
                "version": table["version"],
                "at_s": round(created_s - started_wall, 2),
                "weights": {v["name"]: v["weight"] for v in table["variants"]},
                "reason": table["reason"],
            }
        )
    return timeline
