"""The router agent against a real broker: forwarding, rejection, live programs, the cache."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from dspex.agents.router.router import RouterApp, make_router
from dspex.streams import kafka
from dspex.streams.serde import make_serde
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics
from tests.integration.tail import OpenTail, Tail, until

WATCHED = ("pool.general", "pool.gpu", "responses", "dlq")


class Client:
    """Produces encoded records to the test's topics."""

    def __init__(self, settings: Settings) -> None:
        self.topics = Topics(settings.topics)
        self.serde = make_serde(settings)
        self.producer = kafka.producer(settings)

    def raw(self, short: str, key: bytes | None, value: bytes) -> None:
        self.producer.produce(self.topics.name(short), key=key, value=value)
        self.producer.flush(10)

    def send(self, short: str, schema: str, key: str, record: dict[str, Any]) -> None:
        value = self.serde.encode(schema, record, topic=self.topics.name(short))
        self.raw(short, key.encode(), value)

    def request(self, **fields: Any) -> dict[str, Any]:
        record = {
            "request_id": str(uuid.uuid4()),
            "created_at": int(time.time() * 1000),
            "signature": "question -> answer",
            "inputs": {"question": json.dumps("What is the capital of France?")},
            **fields,
        }
        self.send("requests", "Request", record["request_id"], record)
        return record


@pytest.fixture
async def router(
    settings: Settings, create_topics: Callable[[], object]
) -> AsyncIterator[RouterApp]:
    create_topics()
    app_id = f"{settings.topics.prefix}router-{uuid.uuid4().hex[:8]}"
    app = make_router(settings, app_id=app_id)
    await app.start()
    yield app
    await app.stop()
    admin = kafka.admin_client(settings)
    internal = [t for t in admin.list_topics(timeout=10).topics if t.startswith(app_id)]
    if internal:
        for future in admin.delete_topics(internal, operation_timeout=30).values():
            future.result()


@pytest.fixture
def collector(router: RouterApp, tails: OpenTail) -> Tail:
    """A tail of the router's output topics (the router fixture created them)."""
    return tails(WATCHED, from_beginning=True)


def on(tail: Tail, short: str, request_id: str) -> list[dict[str, Any]]:
    return [r for r in tail.of(short) if r.get("request_id") == request_id]


async def first_on(tail: Tail, short: str, request_id: str) -> dict[str, Any]:
    found = await tail.until(lambda t: on(t, short, request_id), 30, f"{request_id} {short}")
    return found[0]


@pytest.fixture
def client(settings: Settings) -> Client:
    return Client(settings)


async def test_forwards_valid_and_rejects_invalid_without_stalling(
    router: RouterApp, collector: Tail, client: Client
) -> None:
    valid = client.request()
    gpu = client.request(pool_hint="gpu")
    client.raw("requests", b"junk-key", b"\x00\x01 definitely not avro")
    invalid = client.request(inputs={})
    after = client.request()

    forwarded = await first_on(collector, "pool.general", valid["request_id"])
    assert forwarded["route"]["pool"] == "general" and forwarded["route"]["reason"] == "static"
    assert forwarded["route"]["variant"] == "echo" and forwarded["route"]["model"] == "dspex/echo"
    assert (forwarded["signature"], forwarded["module_type"]) == ("question -> answer", "Predict")
    assert (await first_on(collector, "pool.gpu", gpu["request_id"]))["route"]["reason"] == "hint"

    letter = await collector.until(
        lambda t: next((r for r in t.of("dlq") if r["stage"] == "decode"), None),
        30,
        "decode dead letter",
    )
    assert letter["original_value"] == b"\x00\x01 definitely not avro"
    assert letter["original_key"] == b"junk-key" and letter["component"] == "router"

    response = await first_on(collector, "responses", invalid["request_id"])
    assert response["status"] == "error" and response["error"]["field"] == "inputs.question"
    assert (await first_on(collector, "dlq", invalid["request_id"]))["stage"] == "validate"
    await first_on(collector, "pool.general", after["request_id"])
    await collector.caught_up()  # all the router wrote so far is read: nothing forwarded it
    assert not on(collector, "pool.general", invalid["request_id"])


async def test_programs_published_mid_run_take_effect(
    router: RouterApp, collector: Tail, client: Client
) -> None:
    unknown = client.request(program_id="support.answer", signature=None)
    response = await first_on(collector, "responses", unknown["request_id"])
    assert response["error"]["field"] == "program_id"

    for version in (1, 2):
        client.send("programs", "ProgramVersion", "support.answer", program_version(version))
        await until(_has_version(router, version), 30, f"program version {version}")
        request = client.request(program_id="support.answer", signature=None)
        forwarded = await first_on(collector, "pool.general", request["request_id"])
        assert forwarded["program_version"] == version
        assert forwarded["signature"] == "question -> answer"
        assert forwarded["state_json"] == json.dumps({"version": version})


def _has_version(router: RouterApp, version: int) -> Callable[[], bool]:
    return lambda: _latest(router) == version


def _latest(router: RouterApp) -> int | None:
    try:
        version: int = router.programs.resolve("support.answer", None)["version"]
    except Exception:
        return None
    return version


def program_version(version: int) -> dict[str, Any]:
    return {
        "program_id": "support.answer",
        "version": version,
        "signature": "question -> answer",
        "module_type": "Predict",
        "state_json": json.dumps({"version": version}),
        "created_at": int(time.time() * 1000),
    }


async def test_a_cache_record_is_served_without_a_pool(
    router: RouterApp, collector: Tail, client: Client
) -> None:
    first = client.request()
    forwarded = await first_on(collector, "pool.general", first["request_id"])
    key = forwarded["route"]["cache_key"]
    assert key
    worker_answer = {
        "request_id": first["request_id"],
        "status": "ok",
        "outputs": {"answer": json.dumps("Paris")},
        "pool": "general",
        "produced_at": int(time.time() * 1000),
    }
    client.send("cache", "Response", key, worker_answer)  # what the worker does
    await until(lambda: router.cache.get(key) is not None, 30, "cache fill")

    second = client.request()
    answer = await first_on(collector, "responses", second["request_id"])
    assert answer["cached"] is True and answer["outputs"] == {"answer": json.dumps("Paris")}
    assert answer["pool"] is None and answer["status"] == "ok"
    uncached = client.request(cache=False)
    await first_on(collector, "pool.general", uncached["request_id"])
    await collector.caught_up()
    assert not on(collector, "pool.general", second["request_id"])
