"""Tenants on the plain broker: own topics, forced replies, stamped records, DSPex limits.

The router and a general worker run as real processes (echo simulation); tenants'
topics are created here with the Admin API as ``dspex tenants add`` would. What the
tenant ACLs refuse on a secured broker is the secured suite's business; this file
proves what the router does whatever a sender writes.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from dspex import AsyncClient, Program, RequestFailed, Result
from dspex.agents.router.router import RouterApp, make_router
from dspex.schemas import records
from dspex.streams import kafka
from dspex.streams.errors import DSPexError
from dspex.streams.serde import make_serde
from dspex.streams.settings import Settings, load_settings
from dspex.streams.tenants import request_topic, response_topic
from dspex.streams.topics import Topics
from tests.integration.stack import Stack
from tests.integration.tail import OpenTail, Tail, until

INLINE = Program.inline("question -> answer")
CreateTenants = Callable[..., None]


@pytest.fixture
def create_tenants(settings: Settings, admin: AdminClient) -> Iterator[CreateTenants]:
    """Factory: create tenants' request and response topics; delete them afterwards."""
    made: list[str] = []

    def create(*names: str) -> None:
        prefix = settings.topics.prefix
        topics = [f(n, prefix) for n in names for f in (request_topic, response_topic)]
        futures = admin.create_topics([NewTopic(t, 3, 1) for t in topics], operation_timeout=30)
        for future in futures.values():
            future.result()
        made.extend(topics)

    yield create
    if made:
        for future in admin.delete_topics(made, operation_timeout=30).values():
            future.result()


def tenant_settings(settings: Settings, tenants: dict[str, Any]) -> Settings:
    """The test's broker and prefix, the echo simulation, and these tenant settings."""
    return load_settings(
        kafka={"bootstrap_servers": settings.kafka.bootstrap_servers},
        topics={"prefix": settings.topics.prefix},
        lm={"pool_variants": {}},
        tenants=tenants,
    )


class Producer:
    """Writes Request records to any topic, as a (possibly malicious) sender would."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.serde = make_serde(settings)
        self.producer = kafka.producer(settings)

    def request(self, topic: str, **fields: Any) -> str:
        record = records.request(
            request_id=str(uuid.uuid4()),
            created_at=int(time.time() * 1000),
            deadline_at=int(time.time() * 1000) + 120_000,
            signature="question -> answer",
            inputs={"question": json.dumps(f"who am I {uuid.uuid4().hex[:6]}")},
            **fields,
        )
        value = self.serde.encode("Request", record, topic=topic)
        self.producer.produce(topic, key=record["request_id"].encode(), value=value)
        self.producer.flush(30)
        return str(record["request_id"])


def of(tail: Tail, short: str, request_id: str, *, final: bool = False) -> list[dict[str, Any]]:
    found = [r for r in tail.of(short) if r.get("request_id") == request_id]
    return [r for r in found if r.get("final")] if final else found


def outcome(answer: Result | DSPexError) -> str:
    if isinstance(answer, Result):
        return answer.status
    if isinstance(answer, RequestFailed):
        return answer.status
    return type(answer).__name__


@pytest.fixture
def stack(
    settings: Settings,
    create_topics: Callable[[], object],
    create_tenants: CreateTenants,
    tmp_path: Path,
) -> Iterator[Stack]:
    """Router + general worker; tenants acme (3 requests, then 1 per 1000 s) and bob."""
    configured = tenant_settings(
        settings,
        {
            "limits": {"acme": {"requests_per_s": 0.001, "burst": 3}},
            "refresh_s": 1.0,  # a tenant added later is served within about a second
        },
    )
    create_topics()
    create_tenants("acme", "bob")
    running = Stack(configured, ["general"], tmp_path)
    running.start()
    yield running
    running.stop()
    unclean = {n: c for n, c in running.exit_codes.items() if c != 0}
    assert not unclean and not running.killed, (unclean, running.killed, running.log_tails())


async def test_tenants_are_answered_on_their_own_topics_stamped_and_limited(
    stack: Stack, tails: OpenTail, create_tenants: CreateTenants
) -> None:
    settings = stack.settings
    prefix = settings.topics.prefix
    watched = [
        "responses",
        "executions",
        "telemetry",
        "dlq",
        "tenant.acme.responses",
        "tenant.bob.responses",
    ]
    tail = tails(watched, settings=settings)
    sender = Producer(settings)

    # 1. acme names bob's topic as its reply topic and claims to be bob: answered on
    # its own topic, stamped acme, and nothing reaches bob's or the shared topic
    forged = sender.request(
        request_topic("acme", prefix),
        reply_topic=response_topic("bob", prefix),
        metadata={"dspex.tenant": "bob", "team": "red"},
    )
    answer = await tail.until(
        lambda t: of(t, "tenant.acme.responses", forged, final=True), 120, "acme's answer"
    )
    assert answer[0]["status"] == "ok", answer
    # 2. a shared-topic request naming acme's topic is refused on the shared topic
    shared = Topics(settings.topics).name("requests")
    nosy = sender.request(shared, reply_topic=response_topic("acme", prefix))
    refused = await tail.until(lambda t: of(t, "responses", nosy, final=True), 120, "refusal")
    assert refused[0]["status"] == "error" and refused[0]["error"]["field"] == "reply_topic"

    # 3. a tenant claimed on the shared topic is removed: the worker stamps no tenant
    claimed = sender.request(shared, metadata={"dspex.tenant": "acme"})
    unstamped = await tail.until(lambda t: of(t, "executions", claimed), 120, "shared execution")
    assert unstamped[0]["tenant"] is None and unstamped[0]["metadata"] == {}
    execution = await tail.until(lambda t: of(t, "executions", forged), 60, "execution")
    measured = await tail.until(
        lambda t: [r for r in of(t, "telemetry", forged) if r["kind"] == "execution"],
        60,
        "telemetry",
    )
    assert execution[0]["tenant"] == "acme" and measured[0]["tenant"] == "acme"
    assert execution[0]["metadata"] == {"dspex.tenant": "acme", "team": "red"}

    # 4. acme has 2 requests left in its bucket; bob has no limit
    async with (
        AsyncClient(settings, tenant="acme") as acme,
        AsyncClient(settings, tenant="bob") as bob,
    ):
        assert acme.listen_topic == response_topic("acme", prefix)
        acme_answers, bob_answers = await asyncio.gather(
            acme.submit_many([(INLINE, {"question": f"acme {n}"}) for n in range(8)]),
            bob.submit_many([(INLINE, {"question": f"bob {n}"}) for n in range(8)]),
        )
    acme_outcomes = [outcome(a) for a in acme_answers]
    assert sorted(acme_outcomes) == ["ok"] * 2 + ["quota_exceeded"] * 6, acme_outcomes
    assert [outcome(a) for a in bob_answers] == ["ok"] * 8
    over = next(a for a in acme_answers if isinstance(a, RequestFailed))
    assert (over.error_class, over.stage, over.retryable) == ("QuotaExceeded", "route", True)
    bob_ids = {a.request_id for a in bob_answers if isinstance(a, Result)}
    stamped = await tail.until(
        lambda t: [r for r in t.of("executions") if r["request_id"] in bob_ids] or None,
        60,
        "bob's executions",
    )
    assert {r["tenant"] for r in stamped} == {"bob"}

    await tail.caught_up(60)
    assert not of(tail, "tenant.bob.responses", forged)
    assert not of(tail, "responses", forged)
    assert not of(tail, "tenant.acme.responses", nosy)
    assert of(tail, "responses", claimed, final=True)  # answered where it asked, not acme's
    acme_ids = {a.request_id for a in acme_answers if isinstance(a, Result | RequestFailed)}
    assert not [r for r in tail.of("responses") if r["request_id"] in acme_ids | bob_ids]
    assert not [r for r in tail.of("tenant.bob.responses") if r["request_id"] in acme_ids]
    assert not [r for r in tail.of("dlq") if r.get("request_id") in acme_ids]  # no DLQ noise

    # 5. a tenant added while the router runs is served once its topics exist
    create_tenants("late")
    added = time.monotonic()
    async with AsyncClient(settings, tenant="late") as late:
        result = await late.submit(INLINE, {"question": "new here"}, deadline_s=120)
        print(
            f"tenant created after the router started: answered in {time.monotonic() - added:.1f}s"
        )
        assert result.status == "ok"

        # 6. the same session id in two tenants (and the shared topic): three sessions
        async with AsyncClient(settings, tenant="bob") as bob, AsyncClient(settings) as anyone:
            turns = [
                (await client.submit(INLINE, {"question": "hi"}, session_id="s1")).session
                for client in (bob, bob, late, anyone)
            ]
    assert [(t or {}).get("session_id") for t in turns] == [
        "tenant.bob/s1",
        "tenant.bob/s1",
        "tenant.late/s1",
        "s1",
    ]
    assert [(t or {}).get("turn") for t in turns] == [1, 2, 1, 1]


# --- daily usage: rebuilt from telemetry at start, followed live (router in-process) -----


def usage(tenant: str, tokens: int) -> dict[str, Any]:
    return records.telemetry(
        kind="execution",
        request_id=str(uuid.uuid4()),
        emitted_at=datetime.now(UTC),
        prompt_tokens=tokens,
        completion_tokens=0,
        success=True,
        tenant=tenant,
    )


@pytest.fixture
async def daily_router(
    settings: Settings, create_topics: Callable[[], object], create_tenants: CreateTenants
) -> AsyncIterator[tuple[RouterApp, Producer]]:
    """acme's 100 tokens of today are on telemetry before the router starts."""
    configured = tenant_settings(settings, {"default": {"tokens_per_day": 100}})
    create_topics()
    create_tenants("acme", "bob")
    sender = Producer(configured)
    topic = Topics(configured.topics).name("telemetry")
    for tokens in (60, 40):
        value = sender.serde.encode("Telemetry", usage("acme", tokens), topic=topic)
        sender.producer.produce(topic, key=b"p", value=value)
    sender.producer.flush(30)
    app = make_router(configured, app_id=f"{configured.topics.prefix}router")
    await app.start()
    yield app, sender
    await app.stop()


async def test_daily_tokens_survive_a_restart_and_are_followed_live(
    daily_router: tuple[RouterApp, Producer], tails: OpenTail
) -> None:
    router, sender = daily_router
    settings = router.settings
    prefix = settings.topics.prefix
    watched = ["pool.general", "tenant.acme.responses", "tenant.bob.responses"]
    tail = tails(watched, settings=settings)
    assert router.usage.today("acme", int(time.time() * 1000)) == 100  # replayed at start

    over = sender.request(request_topic("acme", prefix))
    served = sender.request(request_topic("bob", prefix))
    answer = await tail.until(
        lambda t: of(t, "tenant.acme.responses", over, final=True), 60, "acme refused"
    )
    assert answer[0]["status"] == "quota_exceeded"
    assert "tokens_per_day" in answer[0]["error"]["message"]
    routed = await tail.until(lambda t: of(t, "pool.general", served), 60, "bob routed")
    assert routed[0]["metadata"]["dspex.tenant"] == "bob"

    topic = Topics(settings.topics).name("telemetry")
    sender.producer.produce(
        topic, key=b"p", value=sender.serde.encode("Telemetry", usage("bob", 100), topic=topic)
    )
    sender.producer.flush(30)
    await until(
        lambda: router.usage.today("bob", int(time.time() * 1000)) >= 100 or None,
        60,
        "bob's tokens followed",
    )
    later = sender.request(request_topic("bob", prefix))
    refused = await tail.until(
        lambda t: of(t, "tenant.bob.responses", later, final=True), 60, "bob refused"
    )
    assert refused[0]["status"] == "quota_exceeded"
    await tail.caught_up(60)
    assert not of(tail, "pool.general", over) and not of(tail, "pool.general", later)
