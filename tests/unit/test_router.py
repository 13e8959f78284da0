"""Router decisions without a broker: routing, cache rules, rejections, the request pipeline."""

from __future__ import annotations

import asyncio
import json
import math
import random
import uuid
from collections.abc import Mapping
from typing import Any, cast

import pytest
from confluent_kafka import KafkaException

from dspex.agents.plumbing.catalog import PipelineCatalog, ProgramCatalog, RoutingCatalog
from dspex.agents.plumbing.deadlines import DeadlineExceeded, Overloaded
from dspex.agents.plumbing.loop import LoopConfig
from dspex.agents.plumbing.messages import Consumed, ErrorInfo, Outgoing
from dspex.agents.plumbing.publisher import DeliveryFailed, Publisher, serve_deliveries
from dspex.agents.plumbing.records import dead_letter, error_response
from dspex.agents.router.cache import ResultCache, cache_key, effective_variables, is_cacheable
from dspex.agents.router.router import SEND_ATTEMPTS, RouterApp, RouterHandler, with_program_metric
from dspex.agents.router.routing import (
    KnownTopics,
    ProgramsResolver,
    Route,
    RouteChooser,
    check_request,
    reply_topic,
)
from dspex.streams.errors import InvalidRequest
from dspex.streams.serde import make_serde
from dspex.streams.settings import LMBackend, LMSettings, Settings
from tests.fakes import FakeProducer, FakeResolver

NOW_MS = 1_800_000_000_000
SETTINGS = Settings(
    lm=LMSettings(
        backends={
            "echo": LMBackend(model="dspex/echo"),
            "local": LMBackend(model="dspex/llama-cpp"),
            "hot": LMBackend(model="openai/gpt-4o-mini", temperature=0.7),
        },
        default_variant="echo",
        pool_variants={"gpu": "local"},
    )
)
SERDE = make_serde(SETTINGS)


def request(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "request_id": str(uuid.uuid4()),
        "created_at": NOW_MS,
        "signature": "question -> answer",
        "inputs": {"question": json.dumps("What is 2+2?")},
    }
    return {**base, **fields}


def table(*variants: dict[str, Any], program_id: str = "p", version: int = 3) -> dict[str, Any]:
    return {"program_id": program_id, "version": version, "variants": list(variants)}


def variant(name: str, weight: float, pool: str = "general", **extra: Any) -> dict[str, Any]:
    return {"name": name, "weight": weight, "pool": pool, "variables": {}, **extra}


def chooser(seed: int = 7) -> RouteChooser:
    return RouteChooser(SETTINGS.lm, "general", random.Random(seed))


# --- routing decisions ---------------------------------------------------------------


def test_static_route_uses_default_pool_and_its_variant() -> None:
    route = chooser().choose(request(), None)
    assert (route.pool, route.variant, route.reason) == ("general", "echo", "static")
    assert route.model == "dspex/echo" and route.table_version is None


def test_pool_hint_wins_and_takes_that_pools_static_variant() -> None:
    route = chooser().choose(request(pool_hint="gpu"), None)
    assert (route.pool, route.variant, route.reason) == ("gpu", "local", "hint")
    assert route.model == "dspex/llama-cpp"


def test_table_samples_variants_by_weight() -> None:
    routes = table(variant("a", 3.0), variant("b", 1.0, pool="gpu", model="m/b"))
    pick = chooser()
    counts = {"a": 0, "b": 0}
    for _ in range(4000):
        counts[pick.choose(request(), routes).variant] += 1
    assert 0.70 < counts["a"] / 4000 < 0.80
    route = next(r for r in (pick.choose(request(), routes) for _ in range(50)) if r.variant == "b")
    assert (route.pool, route.model, route.reason, route.table_version) == (
        "gpu",
        "m/b",
        "table",
        3,
    )


def test_hint_restricts_table_to_variants_of_that_pool() -> None:
    routes = table(variant("a", 5.0), variant("g", 1.0, pool="gpu"))
    for _ in range(50):
        route = chooser().choose(request(pool_hint="gpu"), routes)
        assert (route.pool, route.variant, route.reason) == ("gpu", "g", "hint")


@pytest.mark.parametrize(
    "weights",
    [
        [0.0, 0.0],
        [math.nan, -1.0],
        [math.inf, -math.inf],
        [-0.5, 0.0],
    ],
)
def test_unusable_weights_fall_back_to_static_with_one_warning(
    weights: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    routes = table(*(variant(f"v{i}", w) for i, w in enumerate(weights)))
    pick = chooser()
    for _ in range(5):
        route = pick.choose(request(), routes)
        assert (route.pool, route.variant, route.reason) == ("general", "echo", "fallback")
    warnings = [r for r in caplog.records if "routing table unusable" in r.getMessage()]
    assert len(warnings) == 1


def test_bad_variants_are_skipped_but_good_ones_still_route() -> None:
    routes = table(
        variant("nan", math.nan),
        variant("neg", -3.0),
        variant("nowhere", 1.0, pool="moon"),
        variant("good", 1e308),
        variant("good2", 1e308),
    )
    for _ in range(20):
        route = chooser().choose(request(), routes)
        assert route.variant in {"good", "good2"} and route.reason == "table"


def test_catalog_prefers_program_table_then_default() -> None:
    catalog = RoutingCatalog()
    catalog.apply("*", table(variant("d", 1.0), program_id="*"))
    catalog.apply("p", table(variant("own", 1.0)))
    assert (catalog.table_for("p") or {})["variants"][0]["name"] == "own"
    assert (catalog.table_for("q") or {})["program_id"] == "*"
    assert (catalog.table_for(None) or {})["program_id"] == "*"
    catalog.apply("p", None)
    assert (catalog.table_for("p") or {})["program_id"] == "*"


def test_program_catalog_resolves_latest_or_named_version() -> None:
    catalog = ProgramCatalog()
    for version in (1, 2):
        catalog.apply("p", {"program_id": "p", "version": version, "signature": "a -> b"})
    assert catalog.resolve("p", None)["version"] == 2
    assert catalog.resolve("p", 1)["version"] == 1
    with pytest.raises(InvalidRequest) as info:
        catalog.resolve("p", 9)
    assert info.value.field == "program_version"
    with pytest.raises(InvalidRequest) as info:
        catalog.resolve("nope", None)
    assert info.value.field == "program_id"


# --- request checks ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"pool_hint": "tpu"}, "pool_hint"),
        ({"deadline_at": -5}, "deadline_at"),
        ({"deadline_at": NOW_MS + 30 * 24 * 3600 * 1000}, "deadline_at"),
        ({"reply_topic": "dspex.pool.gpu"}, "reply_topic"),
        ({"reply_topic": "bad topic!"}, "reply_topic"),
        ({"request_id": ""}, "request_id"),
    ],
)
def test_check_request_names_the_field(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_request(request(**fields), NOW_MS, ["dspex.pool.gpu", "dspex.responses"])
    assert info.value.field == field
    assert not isinstance(info.value, DeadlineExceeded)


def test_passed_deadline_is_a_timeout() -> None:
    with pytest.raises(DeadlineExceeded) as info:
        check_request(request(deadline_at=NOW_MS - 1, created_at=NOW_MS), NOW_MS, [])
    assert not isinstance(info.value, Overloaded)


def test_a_deadline_that_passed_while_waiting_in_kafka_is_overload() -> None:
    waited = request(created_at=NOW_MS - 5_000, deadline_at=NOW_MS - 1_000)
    with pytest.raises(Overloaded, match="waited 5000 ms for the router"):
        check_request(waited, NOW_MS, [])
    check_request(request(deadline_at=NOW_MS + 1000, reply_topic="app.replies"), NOW_MS, [])


# --- cache rules ---------------------------------------------------------------------

PROGRAM = {"program_id": None, "program_version": None, "signature": "q -> a"}
ECHO = Route("general", "echo", "static", model="dspex/echo")


def test_cache_key_ignores_json_spacing_and_map_order() -> None:
    one = cache_key(PROGRAM, {"a": '{"x": 1, "y": [1, 2]}', "b": '"s"'}, {"k": "1"}, ECHO)
    two = cache_key(PROGRAM, {"b": '"s"', "a": '{"y":[1,2],"x":1}'}, {"k": " 1 "}, ECHO)
    assert one == two and one.startswith("sha256:")


def test_cache_key_changes_with_inputs_variables_variant_and_program() -> None:
    base = cache_key(PROGRAM, {"a": '"x"'}, {}, ECHO)
    assert base != cache_key(PROGRAM, {"a": '"y"'}, {}, ECHO)
    assert base != cache_key(PROGRAM, {"a": '"x"'}, {"k": "1"}, ECHO)
    assert base != cache_key(PROGRAM, {"a": '"x"'}, {}, Route("general", "local", "static"))
    assert base != cache_key({**PROGRAM, "program_version": 2}, {"a": '"x"'}, {}, ECHO)
    assert base != cache_key({**PROGRAM, "state_json": "{}"}, {"a": '"x"'}, {}, ECHO)


@pytest.mark.parametrize(
    ("fields", "route", "expected"),
    [
        ({}, ECHO, True),
        ({"cache": False}, ECHO, False),
        ({"variables": {"temperature": "0.3"}}, ECHO, False),
        ({"variables": {"temperature": "0"}}, ECHO, True),
        ({"variables": {"temperature": "warm"}}, ECHO, False),
        ({}, Route("general", "hot", "table", model="openai/gpt-4o-mini"), False),
        ({"variables": {"temperature": "0"}}, Route("general", "hot", "table"), True),
        ({}, Route("general", "unknown-variant", "table"), False),
        ({}, Route("general", "echo", "table", model="other/model"), False),
        ({"module_type": "BestOfN"}, ECHO, False),
    ],
)
def test_only_deterministic_requests_are_cacheable(
    fields: dict[str, Any], route: Route, expected: bool
) -> None:
    req = request(**fields)
    program = {**PROGRAM, "module_type": req.get("module_type") or "Predict"}
    assert is_cacheable(req, program, route, SETTINGS.lm) is expected


def test_request_variables_override_variant_variables() -> None:
    route = Route("general", "echo", "table", variables={"temperature": "0.9", "k": "1"})
    assert effective_variables(route, request(variables={"temperature": "0"})) == {
        "temperature": "0",
        "k": "1",
    }


# --- rejection records ---------------------------------------------------------------


def test_rejection_records_are_valid_avro() -> None:
    failure = ErrorInfo.from_exception(
        InvalidRequest("inputs.question", "missing input"), "validate"
    )
    original = Consumed("dspex.requests", 2, 41, b"k", b"\x00garbage", (("h", b"v"),), NOW_MS)
    letter = dead_letter(original, failure, component="router", failed_at_ms=NOW_MS, request_id="r")
    response = error_response("r", failure, produced_at_ms=NOW_MS)
    back = SERDE.decode(SERDE.encode("DeadLetter", letter, topic="t"), topic="t").record
    assert back["original_value"] == b"\x00garbage" and back["original_headers"][0]["key"] == "h"
    assert (back["stage"], back["error_class"], back["component"]) == (
        "validate",
        "InvalidRequest",
        "router",
    )
    decoded = SERDE.decode(SERDE.encode("Response", response, topic="t"), topic="t").record
    assert decoded["error"]["field"] == "inputs.question" and decoded["final"] is True
    assert (decoded["status"], decoded["seq"], decoded["error"]["retryable"]) == ("error", 0, False)


# --- the request pipeline ------------------------------------------------------------


def handler(
    cache: ResultCache | None = None, pipelines: PipelineCatalog | None = None
) -> RouterHandler:
    return RouterHandler(
        SETTINGS,
        SERDE,
        programs=ProgramCatalog(),
        routing=RoutingCatalog(),
        resolver=FakeResolver(),
        cache=cache if cache is not None else ResultCache(),
        chooser=chooser(),
        clock=lambda: NOW_MS / 1000,
        pipelines=pipelines,
    )


def incoming(record: dict[str, Any] | None = None, raw: bytes | None = None) -> Consumed:
    value = raw if raw is not None else SERDE.encode("Request", record or {}, topic="t")
    return Consumed("dspex.requests", 0, 7, b"key", value, (), NOW_MS)


def decode(value: bytes) -> dict[str, Any]:
    return SERDE.decode(value, topic="t").record


def test_valid_request_is_forwarded_with_route_and_program() -> None:
    out = handler().handle_request(incoming(request(pool_hint="gpu")))
    assert [o.topic for o in out] == ["dspex.pool.gpu"] and out[0].key == b"key"
    forwarded = decode(out[0].value)
    assert forwarded["route"]["pool"] == "gpu" and forwarded["route"]["reason"] == "hint"
    assert (forwarded["signature"], forwarded["module_type"]) == ("question -> answer", "Predict")


def test_garbage_becomes_a_dead_letter_only() -> None:
    out = handler().handle_request(incoming(raw=b"\xc3\x01not avro at all"))
    assert [o.topic for o in out] == ["dspex.dlq"]
    letter = decode(out[0].value)
    assert letter["stage"] == "decode" and letter["original_value"] == b"\xc3\x01not avro at all"
    assert letter["original_offset"] == 7 and letter["request_id"] is None


def test_invalid_request_gets_error_response_and_dead_letter() -> None:
    req = request(inputs={}, reply_topic="app.replies")
    out = handler().handle_request(incoming(req))
    assert [o.topic for o in out] == ["app.replies", "dspex.dlq"]
    response = decode(out[0].value)
    assert response["error"]["field"] == "inputs.question" and response["status"] == "error"
    assert out[0].key == req["request_id"].encode()
    assert decode(out[1].value)["request_id"] == req["request_id"]


def test_expired_and_oversized_requests_are_rejected() -> None:
    out = handler().handle_request(incoming(request(deadline_at=NOW_MS - 1)))
    response = decode(out[0].value)
    assert (response["status"], response["error"]["stage"]) == ("timeout", "route")
    big = request(inputs={"question": json.dumps("x" * 1_100_000)})
    response = decode(handler().handle_request(incoming(big))[0].value)
    assert response["error"]["field"] == "request" and response["status"] == "error"


def test_a_cache_record_fills_the_cache_and_the_next_identical_request_hits() -> None:
    cache = ResultCache()
    router = handler(cache)
    first = request()
    forwarded = decode(router.handle_request(incoming(first))[0].value)
    key = forwarded["route"]["cache_key"]
    assert key and len(cache) == 0
    answer = {
        "request_id": first["request_id"],
        "status": "ok",
        "outputs": {"answer": '"4"'},
        "pool": "general",
        "produced_at": NOW_MS,
    }
    cache.apply(key, SERDE.decode(SERDE.encode("Response", answer, topic="t"), topic="t").record)
    out = router.handle_request(incoming(request(inputs=first["inputs"])))
    assert [o.topic for o in out] == ["dspex.responses"]
    hit = decode(out[0].value)
    assert hit["cached"] is True and hit["outputs"] == {"answer": '"4"'} and hit["pool"] is None


def test_the_result_cache_keeps_only_final_ok_answers_and_is_bounded() -> None:
    cache = ResultCache(max_entries=2)
    ok = {"status": "ok", "final": True, "cached": False, "outputs": {"a": '"1"'}}
    cache.apply("error", {**ok, "status": "error"})
    cache.apply("chunk", {**ok, "final": False})
    cache.apply("replayed-hit", {**ok, "cached": True})
    cache.apply("no-outputs", {**ok, "outputs": None})
    assert len(cache) == 0
    cache.apply("k1", ok)
    cache.apply("k2", ok)
    assert cache.get("k1") == '{"a":"\\"1\\""}'  # k1 is now the most recently used
    cache.apply("k3", ok)
    assert (cache.get("k1") is not None, cache.get("k2"), cache.get("k3") is not None) == (
        True,
        None,
        True,
    )
    cache.apply("k1", None)  # a tombstone
    assert cache.get("k1") is None and len(cache) == 1


def test_resolver_crash_is_rejected_not_raised() -> None:
    class Broken(FakeResolver):
        def resolve(self, request: Mapping[str, Any], registered: Any) -> Any:
            raise RuntimeError("boom")

    router = handler()
    router._resolver = Broken()
    out = router.handle_request(incoming(request()))
    assert [o.topic for o in out] == ["dspex.responses", "dspex.dlq"]
    assert decode(out[0].value)["error"]["error_class"] == "RuntimeError"


def test_programs_resolver_uses_agents_programs() -> None:
    resolver = ProgramsResolver()
    fields = resolver.resolve(request(), None)
    assert fields["signature"] == "question -> answer" and fields["module_type"] == "Predict"
    with pytest.raises(InvalidRequest) as info:
        resolver.resolve(request(inputs={}), None)
    assert info.value.field == "inputs.question"
    registered = {"program_id": "p", "version": 4, "signature": "q -> a", "module_type": "Predict"}
    embedded = resolver.resolve(request(program_id="p", inputs={"q": '"x"'}), registered)
    assert (embedded["program_id"], embedded["program_version"], embedded["signature"]) == (
        "p",
        4,
        "q -> a",
    )


def test_known_topics_refresh_on_a_miss_at_most_once_per_interval() -> None:
    now = [0.0]
    calls: list[int] = []
    live = {"app.replies"}

    def list_topics() -> set[str]:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("metadata unavailable")
        return set(live)

    known = KnownTopics(list_topics, min_refresh_s=1.0, clock=lambda: now[0])
    assert "app.replies" in known
    assert "app.other" not in known  # a miss within the interval does not refresh again
    assert len(calls) == 1
    live.add("app.other")
    now[0] = 1.5
    assert "app.other" in known
    now[0] = 3.0
    assert "app.gone" not in known  # the refresh fails: the last known names stay
    assert "app.other" in known
    assert len(calls) == 3


def test_a_reply_topic_that_does_not_exist_is_refused_not_waited_for() -> None:
    request = {"request_id": "r1", "reply_topic": "app.missing"}
    with pytest.raises(InvalidRequest) as exc:
        check_request(request, 0, ["dspex.requests"], existing={"app.replies"})
    assert exc.value.field == "reply_topic"
    assert "does not exist" in exc.value.reason
    assert reply_topic(request, ["dspex.requests"], existing={"app.replies"}) is None
    check_request({**request, "reply_topic": "app.replies"}, 0, [], existing={"app.replies"})


def test_a_registered_programs_metric_travels_to_the_worker_with_a_gold_label() -> None:
    gold = {"dspex.gold": '{"answer": "Paris"}'}
    program = {"program_id": "qa", "metric": "f1"}
    assert with_program_metric({"metadata": gold}, program) == {**gold, "dspex.metric": "f1"}
    named = {**gold, "dspex.metric": "contains"}
    assert with_program_metric({"metadata": named}, program) == named  # the request's wins
    assert with_program_metric({"metadata": {"tenant": "a"}}, program) == {"tenant": "a"}
    assert with_program_metric({"metadata": gold}, None) == gold


def test_a_canary_variant_pins_its_program_version() -> None:
    table = {
        "program_id": "qa",
        "version": 3,
        "variants": [
            {"name": "v1", "pool": "general", "weight": 1.0, "program_version": 1},
            {"name": "v2", "pool": "general", "weight": 1e-12, "program_version": 2},
        ],
    }
    chooser = RouteChooser(LMSettings(), "general", rng=random.Random(1))
    routes = [chooser.choose({"request_id": "r"}, table) for _ in range(20)]
    assert {(r.variant, r.program_version) for r in routes} == {("v1", 1)}
    plain = {**table, "variants": [{"name": "echo", "pool": "general", "weight": 1.0}]}
    assert chooser.choose({"request_id": "r"}, plain).program_version is None


def test_an_older_routing_table_read_after_a_newer_one_is_ignored() -> None:
    catalog = RoutingCatalog()
    catalog.apply("qa", {"program_id": "qa", "version": 5, "variants": []})
    catalog.apply("qa", {"program_id": "qa", "version": 3, "variants": []})  # other partition
    assert (catalog.table_for("qa") or {})["version"] == 5
    catalog.apply("qa", None)
    catalog.apply("qa", {"program_id": "qa", "version": 1, "variants": []})  # after a reset
    assert (catalog.table_for("qa") or {})["version"] == 1


async def test_a_send_fails_only_its_own_record() -> None:
    # the router produces through librdkafka: produce() never blocks; a record the
    # broker refuses (e.g. its topic was deleted after the request was checked) fails
    # its delivery future, and a produce() that raises fails that record only
    producer = FakeProducer(fail_topics=["app.gone"])
    router = RouterApp.__new__(RouterApp)  # only its sending parts: no broker, no faust app
    router._publisher = Publisher(producer, SERDE, asyncio.get_running_loop())
    refused = await router._send(Outgoing("bad topic name", b"k", b"v"))
    with pytest.raises(KafkaException):
        await refused
    ok = await router._send(Outgoing("app.replies", b"k", b"v"))
    lost = await router._send(Outgoing("app.gone", b"k", b"v"))
    router._publisher.poll()  # the delivery reports: app.replies delivered, app.gone refused
    assert await ok is None
    with pytest.raises(DeliveryFailed, match=r"topic=app\.gone"):
        await lost


async def test_a_request_is_done_once_all_its_records_are_delivered_and_failures_resent() -> None:
    producer = FakeProducer()
    producer.failing["app.flaky"] = 1  # the first send to app.flaky fails, the second works
    producer.failing["dspex.pool.general"] = 6  # a DSPex topic: resent until taken
    router = RouterApp.__new__(RouterApp)
    router._publisher = Publisher(producer, SERDE, asyncio.get_running_loop())
    router._own_topics = frozenset({"dspex.pool.general"})
    where = Consumed("dspex.requests", 0, 7, b"k", b"v", ())
    server = asyncio.create_task(serve_deliveries(router._publisher))

    async def forward(*topics: str) -> None:
        outs = [Outgoing(topic, b"k", b"v") for topic in topics]
        await asyncio.wait_for(router.deliver(where, outs), 5)

    real_sleep = asyncio.sleep

    async def fast_sleep(_: float) -> None:  # the resend backoff, without the wait
        await real_sleep(0)

    try:
        await forward("app.a", "app.b")
        await forward()
        assert producer.topics() == ["app.a", "app.b"]
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(asyncio, "sleep", fast_sleep)
            await forward("app.ok", "app.flaky")
            assert producer.topics()[2:] == ["app.ok", "app.flaky", "app.flaky"]  # only it
            await forward("dspex.pool.general")
    finally:
        server.cancel()
    assert producer.topics()[5:] == ["dspex.pool.general"] * 7  # never lost


async def test_a_reply_topic_that_keeps_failing_is_given_up_after_the_attempts() -> None:
    producer = FakeProducer(fail_topics=["app.gone"])
    router = RouterApp.__new__(RouterApp)
    router._publisher = Publisher(producer, SERDE, asyncio.get_running_loop())
    router._own_topics = frozenset({"dspex.responses"})
    where = Consumed("dspex.requests", 0, 7, b"k", b"v", ())
    server = asyncio.create_task(serve_deliveries(router._publisher))
    real_sleep = asyncio.sleep

    async def fast_sleep(_: float) -> None:
        await real_sleep(0)

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(asyncio, "sleep", fast_sleep)
            outs = [Outgoing("app.gone", b"k", b"v")]
            await asyncio.wait_for(router.deliver(where, outs), 5)
    finally:
        server.cancel()
    assert producer.topics() == ["app.gone"] * SEND_ATTEMPTS


class _Decide:
    """A router handler stand-in: each request is forwarded to one topic named by its value."""

    def handle_request(self, consumed: Consumed) -> list[Outgoing]:
        return [Outgoing((consumed.value or b"").decode(), consumed.key, b"v")]


async def test_a_batch_is_produced_in_order_and_awaited_once_and_only_failures_are_resent() -> None:
    producer = FakeProducer()
    producer.failing["app.flaky"] = 1
    router = RouterApp.__new__(RouterApp)
    router._publisher = Publisher(producer, SERDE, asyncio.get_running_loop())
    router._own_topics = frozenset()
    router._retry_topic = "dspex.retry"
    router.config = LoopConfig(topics=(), group_id="g", client_id="c", limit=10)
    router.handler = cast(RouterHandler, _Decide())
    alone: list[int] = []

    async def handle(consumed: Consumed) -> None:  # the one-by-one path
        alone.append(consumed.offset)

    router.handle = handle  # type: ignore[method-assign]
    batch = [
        Consumed("dspex.requests", 0, 1, b"a", b"app.a"),
        Consumed("dspex.retry", 0, 2, b"r", b"ignored"),
        Consumed("dspex.requests", 0, 3, b"f", b"app.flaky"),
        Consumed("dspex.requests", 0, 4, b"b", b"app.b", maybe_redone=True),
        Consumed("dspex.requests", 1, 5, b"c", b"app.c"),
    ]
    server = asyncio.create_task(serve_deliveries(router._publisher))
    try:
        with pytest.MonkeyPatch.context() as patch:
            real_sleep = asyncio.sleep
            patch.setattr(asyncio, "sleep", lambda _: real_sleep(0))
            await asyncio.wait_for(router.handle_batch(batch), 5)
    finally:
        server.cancel()
    assert producer.topics() == ["app.a", "app.flaky", "app.c", "app.flaky"]
    assert sorted(alone) == [2, 4]  # the retry record and the possible redo
