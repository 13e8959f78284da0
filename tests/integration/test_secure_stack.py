"""The whole of DSPex over SASL_SSL on the secured broker, as real processes.

Router, general pool worker, learning agent and an optimizer job runner run as
``python -m dspex.agents ...`` with settings naming the secured broker (SCRAM-SHA-512
over TLS, as ``dspex-admin``); the client submits a request and runs an optimizer job.
Routing uses the ``dspex/sim`` simulation (a deterministic stand-in LM, labelled so).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dspex.schemas import records
from dspex.streams import kafka, tenants
from dspex.streams.client.client import AsyncClient, Program
from dspex.streams.errors import AccessRefused
from dspex.streams.ops import tenants as tenant_ops
from dspex.streams.ops.admin import ensure_topics
from dspex.streams.reader import scan_to_end, watermarks
from dspex.streams.serde import make_serde
from dspex.streams.settings import Settings, load_settings
from dspex.streams.topics import Topics
from tests.integration.brokers import SecureBroker
from tests.integration.stack import REPO, Stack, _live, agent_env
from tests.integration.tail import committed
from tests.integration.test_optimizer import DATASET, FEWSHOT, JobRunners


@pytest.fixture
def secure_sim(secure_settings: Settings) -> Settings:
    """The secured broker and this test's prefix; general and optimizer pools on a simulation."""
    return load_settings(
        kafka=secure_settings.kafka.model_dump(exclude_none=True),
        topics={"prefix": secure_settings.topics.prefix},
        lm={
            "backends": {"sim": {"model": FEWSHOT}},
            "pool_variants": {"general": "sim", "optimizer": "sim"},
        },
        learner={"publish_interval_s": 0.5, "refresh_interval_s": 2.0},
        jobs={"eval_deadline_s": 90.0},
    )


@pytest.fixture
def secure_stack(secure_sim: Settings, tmp_path: Path) -> Iterator[tuple[Stack, JobRunners]]:
    """Topics, router + general worker, the learner and one job runner; all stopped after."""
    topics = Topics(secure_sim.topics)
    ensure_topics(kafka.admin_client(secure_sim), topics.all())
    stack = Stack(secure_sim, ["general"], tmp_path)
    jobs = JobRunners(secure_sim, tmp_path)
    with (tmp_path / "learner.log").open("wb") as log:
        learner = subprocess.Popen(
            [sys.executable, "-m", "dspex.agents", "learner"],
            env=agent_env(secure_sim), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    _live.add(learner)
    try:
        stack.start()
        jobs.start(1)
        yield stack, jobs
    finally:
        learner.terminate()
        learner.wait(45)
        _live.discard(learner)
        codes = jobs.stop()
        stack.stop()
    unclean = {n: c for n, c in stack.exit_codes.items() if c != 0} | {
        n: c for n, c in codes.items() if c != 0
    }
    learner_log = (tmp_path / "learner.log").read_text(errors="replace")
    assert not unclean, (unclean, stack.log_tails(), jobs.log_tails())
    assert learner.returncode == 0, learner_log[-3000:]


async def test_request_path_learner_and_optimizer_job_run_over_sasl_ssl(
    secure_sim: Settings, secure_stack: tuple[Stack, JobRunners]
) -> None:
    stack, _ = secure_stack
    async with AsyncClient(secure_sim) as client:
        assert await client.publish_program("toy", "word -> answer") == 1
        first = await client.submit("toy", {"word": "kafka"}, cache=False, deadline_s=120)
        result = await client.optimize(
            "toy", optimizer="BootstrapFewShot", dataset=DATASET, metric="exact_match",
            timeout_s=240,
        )  # fmt: skip
        print(f"\nover SASL_SSL: exact_match {result.score_before} -> {result.score_after}")
        assert result.ok, result.error
        assert (result.score_before, result.score_after, result.program_version) == (0.0, 1.0, 2)
        answer = await client.submit("toy", {"word": "stream"}, cache=False, deadline_s=120)
    assert (first.status, first.program_version) == ("ok", 1)
    assert (answer.program_version, answer.outputs["answer"]) == (2, "maerts")
    # the learning agent (faust, SCRAM over TLS) consumed and committed every Telemetry record
    await committed(secure_sim, f"{secure_sim.topics.prefix}learner", ["telemetry"], 120.0)
    stack.check_alive()
    assert "SASL authentication" not in stack.log_text("router")


async def test_a_tenant_over_sasl_ssl_is_answered_only_on_its_own_topic(
    secure_broker: SecureBroker, secure_sim: Settings, secure_stack: tuple[Stack, JobRunners]
) -> None:
    """Tenant A, authenticated as itself with only its own ACLs, writes a request naming
    tenant B's response topic as its reply topic: the router (which learns the tenant from
    the topic) answers on A's topic; B's topic gets nothing, and A's client works within
    its grants (its topics and groups under its prefix)."""
    stack, _ = secure_stack
    prefix = secure_sim.topics.prefix
    tag = uuid.uuid4().hex[:6]
    a, b = f"a{tag}", f"b{tag}"
    passwords = {name: secrets.token_urlsafe(18) for name in (a, b)}
    for name in (a, b):
        await asyncio.to_thread(tenant_ops.add, secure_sim, name, passwords[name])

    def as_tenant(name: str) -> Settings:
        own = secure_broker.kafka(tenants.username(name), passwords[name])
        return load_settings(kafka=own, topics={"prefix": prefix})

    as_a, as_b = as_tenant(a), as_tenant(b)
    for name, granted in ((a, as_a), (b, as_b)):
        waited = await asyncio.to_thread(
            _until_granted, granted, tenants.response_topic(name, prefix)
        )
        print(f"\ntenant {name}: its ACLs took effect {waited:.1f}s after `tenants add` returned")
    serde = make_serde(as_a)
    forged = records.request(
        request_id=str(uuid.uuid4()),
        created_at=int(time.time() * 1000),
        deadline_at=int(time.time() * 1000) + 120_000,
        signature="word -> answer",
        inputs={"word": json.dumps("tenant")},
        reply_topic=tenants.response_topic(b, prefix),
        metadata={"dspex.tenant": b},
    )
    # B listens on its own topic from now on; A's answers come to A's own client
    async with AsyncClient(as_b, tenant=b) as b_client, AsyncClient(as_a, tenant=a) as a_client:
        await b_client.start()
        producer = kafka.producer(as_a)
        topic = tenants.request_topic(a, prefix)
        producer.produce(
            topic,
            key=forged["request_id"].encode(),
            value=serde.encode("Request", forged, topic=topic),
        )
        assert producer.flush(60) == 0
        # the router subscribes to tenant topics by pattern: a topic made after it started
        # is matched at its next metadata refresh (tenants.refresh_s)
        own = await a_client.submit(
            Program.inline("word -> answer"), {"word": "kafka"}, cache=False, deadline_s=120
        )
        assert own.status == "ok", own
    seen = await asyncio.to_thread(_final_ids, as_a, tenants.response_topic(a, prefix))
    assert forged["request_id"] in seen, "the forged request was answered on A's own topic"
    others = await asyncio.to_thread(_final_ids, as_b, tenants.response_topic(b, prefix))
    assert forged["request_id"] not in others, "nothing of A's reached B's topic"
    stack.check_alive()


def _final_ids(settings: Settings, topic: str) -> set[str]:
    """Request ids with a final answer on ``topic``, read as ``settings``' principal."""
    serde = make_serde(settings)
    prefix = tenants.resource_prefix(
        tenants.tenant_of(topic, settings.topics.prefix) or "", settings.topics.prefix
    )
    consumer = kafka.consumer(settings, f"{prefix}check-{uuid.uuid4().hex[:6]}")
    try:
        found = set()
        for message in scan_to_end(consumer, topic, 60.0):
            record = serde.decode(message.value() or b"", topic=topic, expect="Response").record
            if record.get("final"):
                found.add(str(record["request_id"]))
        return found
    finally:
        consumer.close()


def _until_granted(settings: Settings, topic: str, timeout_s: float = 60.0) -> float:
    """Seconds until ``settings``' principal may describe ``topic`` (ACLs apply asynchronously)."""
    started = time.monotonic()
    consumer = kafka.consumer(settings, f"probe-{uuid.uuid4().hex[:6]}")
    try:
        while True:
            try:
                watermarks(consumer, topic, 5.0)
                return time.monotonic() - started
            except AccessRefused:
                assert time.monotonic() - started < timeout_s, f"{topic}: never granted"
                time.sleep(0.5)
    finally:
        consumer.close()
