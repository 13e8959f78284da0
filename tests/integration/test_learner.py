"""The learning agent on a real broker: tables learned, versions kept, a restart, the router.

The learner decides at most once per publish interval and publishes a table only when
the weights moved: a test takes "the last table" once the learner has no decision
pending, as the table of the version it holds (:func:`_last_table`).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import ConfigResource, ResourceType

from dspex.agents.learner.learner import LearnerApp, make_learner
from dspex.agents.learner.stats import ProgramStats
from dspex.agents.plumbing.faustapp import create_changelogs
from dspex.agents.router.router import make_router
from dspex.agents.router.routing import RouteChooser
from dspex.streams import kafka
from dspex.streams.client.client import Client
from dspex.streams.errors import InvalidRequest
from dspex.streams.serde import make_serde
from dspex.streams.settings import BanditConfig, LearnerSettings, Settings
from dspex.streams.topics import Topics
from tests.integration.stack import REPO, agent_env
from tests.integration.tail import OpenTail, Tail, committed, until

PROGRAM = "support.answer"
WATCHED = ("routing", "pool.general", "pool.gpu")


class Producer:
    """Produces Telemetry (and a program) the way workers and clients do."""

    def __init__(self, settings: Settings) -> None:
        self.topics = Topics(settings.topics)
        self.serde = make_serde(settings)
        self.producer = kafka.producer(settings)
        self.rng = random.Random(42)

    def send(self, short: str, schema: str, key: str, record: dict[str, Any]) -> None:
        topic = self.topics.name(short)
        value = self.serde.encode(schema, record, topic=topic)
        self.producer.produce(topic, key=key.encode(), value=value)

    def telemetry(
        self,
        variant: str,
        pool: str,
        success_p: float,
        latency_ms: float,
        request_id: str | None = None,
    ) -> bool:
        ok = self.rng.random() < success_p
        record = {
            "kind": "execution",
            "request_id": request_id or str(uuid.uuid4()),
            "program_id": PROGRAM,
            "program_version": 1,
            "pool": pool,
            "variant": variant,
            "worker_id": "test-worker",
            "emitted_at": int(time.time() * 1000),
            "latency_ms": latency_ms * self.rng.uniform(0.8, 1.2),
            "queue_wait_ms": 1.0,
            "success": ok,
            "error_class": None if ok else "LMError",
        }
        self.send("telemetry", "Telemetry", PROGRAM, record)
        return ok

    def flush(self) -> None:
        self.producer.flush(10)


@pytest.fixture
def watcher(create_topics: Callable[[], object], tails: OpenTail) -> Tail:
    """A tail of the routing and pool topics, from their beginning (it creates the topics)."""
    create_topics()
    return tails(WATCHED, from_beginning=True)


@pytest.fixture
async def app_ids(settings: Settings) -> AsyncIterator[list[str]]:
    """Faust app ids the test uses; their internal topics are deleted afterwards."""
    ids: list[str] = []
    yield ids
    admin = kafka.admin_client(settings)
    internal = [t for t in admin.list_topics(timeout=10).topics if t.startswith(tuple(ids))]
    if internal:
        for future in admin.delete_topics(internal, operation_timeout=30).values():
            future.result()


def learner_settings(**overrides: Any) -> LearnerSettings:
    bandit = BanditConfig(half_life_s=3_600.0)  # the test's data must not decay away
    # A table is published when weights move materially, else every refresh interval
    # (default 300 s). On a busy machine the last material move can come before the
    # last event, so a test waiting for a table counting every event needs a refresh.
    options: dict[str, Any] = {"publish_interval_s": 0.5, "refresh_interval_s": 2.0}
    return LearnerSettings(bandit=bandit, seed=7, **{**options, **overrides})


def counts(table: dict[str, Any]) -> dict[str, float]:
    return {row["variant"]: row["count"] for row in table["learned_from"]}


def weights(table: dict[str, Any]) -> dict[str, float]:
    return {variant["name"]: variant["weight"] for variant in table["variants"]}


async def test_learns_a_table_and_rebuilds_statistics_after_restart(
    settings: Settings, watcher: Tail, app_ids: list[str]
) -> None:
    producer = Producer(settings)
    for i in range(300):
        good = i % 2 == 0
        producer.telemetry("good" if good else "bad", "general", 0.95 if good else 0.5, 100.0)
    producer.send("telemetry", "Telemetry", PROGRAM, {"kind": "health", "emitted_at": 0})
    producer.producer.produce(Topics(settings.topics).name("telemetry"), b"junk", PROGRAM.encode())
    producer.flush()
    config = learner_settings(candidates={"good": "general", "bad": "general"})
    app_id = f"{settings.topics.prefix}learner-{uuid.uuid4().hex[:8]}"
    app_ids.append(app_id)

    learner = make_learner(settings, app_id=app_id, learner_settings=config)
    await learner.start()
    try:
        await until(lambda: _counted(learner) >= 299.0, 40, "300 events counted")
        learned = await _last_table(learner, watcher)
    finally:
        await learner.stop()
    versions = [t["version"] for t in _tables(watcher)]
    print(f"\nfirst run: 300 events -> versions {versions}, weights {weights(learned)}")
    print(f"tables: {[(t['version'], weights(t), counts(t)) for t in _tables(watcher)]}")
    print(f"learned_from {counts(learned)}; reason: {learned['reason']}")
    assert versions == list(range(1, len(versions) + 1))
    assert weights(learned)["good"] >= 0.8 and weights(learned)["bad"] >= 0.002  # the floor
    assert learned["fallback"] == ["good", "bad"] and learned["pool_hints"] == {"general": 1}

    for _ in range(20):
        producer.telemetry("fresh", "general", 1.0, 100.0)
    producer.flush()
    restarted = make_learner(settings, app_id=app_id, learner_settings=config)
    await restarted.start()
    try:
        after = await until(lambda: _with_variant(watcher, "fresh"), 40, "a table with fresh")
    finally:
        await restarted.stop()
    print(f"after restart: version {after['version']}, learned_from {counts(after)}")
    assert after["version"] == versions[-1] + 1
    assert 140.0 <= counts(after)["good"] <= 151.0  # rebuilt, neither cold nor counted twice
    assert weights(after)["good"] > weights(after)["bad"]


async def test_client_feedback_moves_traffic_to_the_better_answers(
    settings: Settings, watcher: Tail, app_ids: list[str]
) -> None:
    """Both variants always succeed; only the clients' quality scores tell them apart."""
    producer = Producer(settings)
    answered = [(f"req-{i}", "terse" if i % 2 else "thorough") for i in range(120)]
    for request_id, variant in answered:
        producer.telemetry(variant, "general", 1.0, 100.0, request_id=request_id)
    producer.flush()
    with Client(settings) as client:
        for request_id, variant in answered:
            client.send_feedback(request_id, 0.1 if variant == "terse" else 0.9, program_id=PROGRAM)
        with pytest.raises(InvalidRequest, match="quality"):
            client.send_feedback("req-0", 1.5, program_id=PROGRAM)
    app_id = f"{settings.topics.prefix}learner-{uuid.uuid4().hex[:8]}"
    app_ids.append(app_id)
    config = learner_settings(candidates={"terse": "general", "thorough": "general"})
    learner = make_learner(settings, app_id=app_id, learner_settings=config)
    await learner.start()
    try:
        await until(lambda: _quality_seen(learner) >= 119.0, 40, "120 feedback records applied")
        table = await _last_table(learner, watcher)
    finally:
        await learner.stop()
    quality = {row["variant"]: row["mean_quality"] for row in table["learned_from"]}
    print(f"\nfeedback -> weights {weights(table)}, mean quality {quality}")
    assert quality["terse"] == pytest.approx(0.1, abs=0.01)
    assert quality["thorough"] == pytest.approx(0.9, abs=0.01)
    assert weights(table)["thorough"] >= 0.8 and weights(table)["terse"] > 0


async def test_kill_9_of_the_learner_rebuilds_its_statistics(
    settings: Settings, watcher: Tail, tmp_path: Path
) -> None:
    """A SIGKILLed learner's successor recovers the statistics from the changelog.

    Counts must be neither cold (lost) nor doubled (telemetry re-read past the
    committed offset on top of the recovered table), and the table versions go on.
    """
    settings = settings.model_copy(
        update={"learner": learner_settings(candidates={"good": "general", "bad": "general"})}
    )
    producer = Producer(settings)
    for i in range(300):
        good = i % 2 == 0
        producer.telemetry("good" if good else "bad", "general", 0.95 if good else 0.5, 100.0)
    producer.flush()
    argv = [sys.executable, "-m", "dspex.agents", "learner"]
    env = agent_env(settings)

    def start(log: str) -> subprocess.Popen[bytes]:
        with (tmp_path / log).open("wb") as out:
            return subprocess.Popen(argv, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)

    def counted(table: dict[str, Any] | None) -> float:
        return sum(counts(table).values()) if table else 0.0

    victim = start("learner-1.log")
    try:
        first = await until(
            lambda: next((t for t in _tables(watcher)[::-1] if counted(t) >= 299.0), None),
            90,
            "a table learned from all 300 events",
        )
        # the kill must come after faust's commit (every 2.8 s) of all 300 events
        group = f"{settings.topics.prefix}learner"
        await committed(settings, group, ["telemetry"])
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        for _ in range(20):
            producer.telemetry("fresh", "general", 1.0, 100.0)
        producer.flush()
        successor = start("learner-2.log")
        try:
            after = await until(lambda: _with_variant(watcher, "fresh"), 90, "a table with fresh")
        finally:
            successor.send_signal(signal.SIGTERM)
            successor.wait(60)
    finally:
        if victim.poll() is None:
            victim.kill()
    print(
        f"\nkill -9 of the learner: before v{first['version']} {counts(first)}; "
        f"successor v{after['version']} {counts(after)}; successor exit {successor.returncode}"
    )
    assert victim.returncode == -signal.SIGKILL
    assert after["version"] > first["version"]
    assert 140.0 <= counts(after)["good"] <= 155.0  # rebuilt, neither cold nor counted twice
    assert 0.0 < counts(after)["fresh"] <= 20.5
    assert successor.returncode == 0


def _quality_seen(learner: LearnerApp) -> float:
    stats = ProgramStats.from_json(learner.stats.get(PROGRAM))
    return sum(arm.q_n for arm in stats.arms.values())


def _counted(learner: LearnerApp) -> float:
    stats = ProgramStats.from_json(learner.stats.get(PROGRAM))
    return sum(arm.n for arm in stats.arms.values())


def _with_variant(watcher: Tail, variant: str) -> dict[str, Any] | None:
    tables = [t for t in _tables(watcher) if variant in weights(t)]
    return tables[-1] if tables else None


def _tables(watcher: Tail) -> list[dict[str, Any]]:
    return [r for r in watcher.of("routing") if r["program_id"] == PROGRAM]


async def _last_table(learner: LearnerApp, watcher: Tail) -> dict[str, Any]:
    """The table of what ``learner`` has counted, once no decision on it is pending."""
    pending = learner.learner.dirty
    await until(lambda: PROGRAM not in pending, 10, "a decision on everything counted")
    version = learner.learner.state[PROGRAM].version  # a decision that moved nothing keeps it
    return await watcher.until(
        lambda t: next((x for x in _tables(t) if x["version"] == version), None),
        10,
        f"routing table v{version}",
    )


async def test_router_applies_the_learned_table(
    settings: Settings, watcher: Tail, app_ids: list[str]
) -> None:
    producer = Producer(settings)
    producer.send("programs", "ProgramVersion", PROGRAM, _program())
    for i in range(200):
        if i % 2:
            producer.telemetry("echo", "general", 0.98, 50.0)
        else:
            producer.telemetry("local", "gpu", 0.3, 2_000.0)
    producer.flush()
    prefix = settings.topics.prefix
    app_ids.extend(
        [f"{prefix}router-{uuid.uuid4().hex[:8]}", f"{prefix}learner-{uuid.uuid4().hex[:8]}"]
    )
    chooser = RouteChooser(settings.lm, "general", rng=random.Random(11))
    router = make_router(settings, app_id=app_ids[0], chooser=chooser)
    learner: LearnerApp = make_learner(
        settings, app_id=app_ids[1], learner_settings=learner_settings()
    )
    await router.start()
    await learner.start()
    try:
        await until(lambda: _counted(learner) >= 199.0, 40, "200 events counted")
        table = await _last_table(learner, watcher)
        await until(lambda: _applied(router, table["version"]), 30, "the router applying it")
        requests = [_request(producer) for _ in range(40)]
        producer.flush()
        routes = await until(lambda: _routes(watcher, requests), 40, "40 forwarded requests")
    finally:
        await learner.stop()
        await router.stop()
    by_variant = {v: sum(1 for r in routes if r["variant"] == v) for v in ("echo", "local")}
    print(f"\ntable v{table['version']} weights {weights(table)}; 40 requests -> {by_variant}")
    assert weights(table)["echo"] >= 0.9
    assert all(
        r["reason"] == "table" and r["routing_table_version"] >= table["version"] for r in routes
    )
    assert all(r["pool"] == ("general" if r["variant"] == "echo" else "gpu") for r in routes)
    assert by_variant["echo"] >= 32


def _applied(router: Any, version: int) -> bool:
    table = router.routing.table_for(PROGRAM)
    return table is not None and table["version"] >= version


def _routes(watcher: Tail, request_ids: list[str]) -> list[dict[str, Any]] | None:
    wanted = set(request_ids)
    forwarded = [*watcher.of("pool.general"), *watcher.of("pool.gpu")]
    routes = [r["route"] for r in forwarded if r["request_id"] in wanted]
    return routes if len(routes) >= len(wanted) else None


def _request(producer: Producer) -> str:
    request_id = str(uuid.uuid4())
    record = {
        "request_id": request_id,
        "created_at": int(time.time() * 1000),
        "program_id": PROGRAM,
        "inputs": {"question": json.dumps("What is the capital of France?")},
        "cache": False,
    }
    producer.send("requests", "Request", request_id, record)
    return request_id


def _program() -> dict[str, Any]:
    return {
        "program_id": PROGRAM,
        "version": 1,
        "signature": "question -> answer",
        "module_type": "Predict",
        "created_at": int(time.time() * 1000),
    }


def test_table_changelogs_are_created_before_faust_starts(
    settings: Settings, create_topics: Callable[[], object], app_ids: list[str]
) -> None:
    create_topics()
    app_id = f"{settings.topics.prefix}learner-{uuid.uuid4().hex[:8]}"
    app_ids.append(app_id)
    learner = make_learner(settings, app_id=app_id, learner_settings=learner_settings())
    created = create_changelogs(settings, learner.app)
    assert created == [f"{app_id}-stats-changelog"]
    admin = kafka.admin_client(settings)
    topic = admin.list_topics(timeout=10).topics[created[0]]
    assert len(topic.partitions) == Topics(settings.topics).spec("telemetry").partitions
    resource = ConfigResource(ResourceType.TOPIC, created[0])
    config = admin.describe_configs([resource])[resource].result()
    assert config["cleanup.policy"].value == "compact"
    assert create_changelogs(settings, learner.app) == []  # idempotent
