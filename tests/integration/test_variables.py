"""Shared variables on a real broker: client and CLI, the router applying them, bad updates refused.

The end-to-end test runs the router and a general-pool worker as subprocesses
(:mod:`tests.integration.stack`) on the echo simulation and reads what really
ran from the ``executions`` topic. The router follows the ``variables`` topic on
its own consumer, so an update takes effect shortly after it is published: the
tests submit until the new value shows, and print how many tries that took.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from dspex.agents.router.router import RouterApp, make_router
from dspex.streams import kafka
from dspex.streams.client.client import AsyncClient, Result
from dspex.streams.errors import InvalidRequest
from dspex.streams.reader import latest_by_key, read_to_end
from dspex.streams.serde import make_serde
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics
from dspex.streams.variables import variable_key
from tests.integration.tail import OpenTail, Tail, end_offsets, until
from tests.integration.test_end_to_end import (  # noqa: F401 - the fixture is used by name
    CreateTopics,
    StartStack,
    echo_settings,
    start_stack,
)

PROGRAM = "vars.qa"
TEMPERATURE_KEY = variable_key("temperature", "program", PROGRAM)


def _delete_topics_with_prefix(settings: Settings, prefix: str) -> None:
    """The router's own faust topics; the catalog's go with create_topics."""
    admin = kafka.admin_client(settings)
    doomed = [t for t in admin.list_topics(timeout=10).topics if t.startswith(prefix)]
    if doomed:
        for future in admin.delete_topics(doomed, operation_timeout=30).values():
            future.result()


def _execution(tail: Tail, request_id: str) -> dict[str, Any]:
    tail.wait(
        lambda t: any(r["request_id"] == request_id for r in t.of("executions")),
        30,
        f"execution of {request_id}",
    )
    return next(r for r in tail.of("executions") if r["request_id"] == request_id)


async def _run_until(
    client: AsyncClient,
    tail: Tail,
    check: Callable[[dict[str, Any]], bool],
    timeout_s: float = 30.0,
) -> tuple[dict[str, Any], int]:
    """Submit to the program until its Execution passes ``check``; (execution, tries)."""
    deadline = time.monotonic() + timeout_s
    for tries in range(1, 1000):
        result = await client.submit(
            PROGRAM, {"question": f"q {uuid.uuid4().hex[:8]}"}, deadline_s=30, cache=False
        )
        assert isinstance(result, Result)
        execution = _execution(tail, result.request_id)
        if check(execution):
            return execution, tries
        assert time.monotonic() < deadline, f"not applied after {timeout_s}s: {execution}"
        await asyncio.sleep(0.2)
    raise AssertionError("unreachable")


def _temperature(value: str) -> Callable[[dict[str, Any]], bool]:
    return lambda execution: execution["variables"].get("temperature") == value


def _produce_raw(settings: Settings, short: str, key: str, record: dict[str, Any]) -> bytes:
    """Produce a VariableUpdate straight to a topic: no client, no validation; its bytes."""
    topic = Topics(settings.topics).name(short)
    producer = kafka.producer(settings)
    value = make_serde(settings).encode("VariableUpdate", record, topic=topic)
    producer.produce(topic, value, key.encode())
    assert producer.flush(30) == 0
    return value


def _refusals(tail: Tail, topic: str) -> list[dict[str, Any]]:
    return [r for r in tail.of("dlq") if r["stage"] == "variables" and r["original_topic"] == topic]


async def test_variables_steer_requests_and_a_bad_update_keeps_the_last_good_value(
    settings: Settings,
    start_stack: StartStack,  # noqa: F811 - the fixture imported above
    tails: OpenTail,
) -> None:
    settings = echo_settings(settings)
    variables_topic = Topics(settings.topics).name("variables")
    start_stack(settings, ["general"])
    tail = tails(["executions", "dlq"], settings=settings)
    async with AsyncClient(settings) as client:
        await client.publish_program(PROGRAM, "question -> answer")
        first = await client.set_variable(
            "temperature",
            0.2,
            var_type="float",
            constraints={"min": 0, "max": 1},
            program=PROGRAM,
            reason="start cool",
            updated_by="test",
            observers=[PROGRAM],
        )
        assert (first["version"], first["scope_ref"]) == (1, PROGRAM)
        applied, tries_set = await _run_until(client, tail, _temperature("0.2"))
        assert applied["module_type"] == "Predict"

        await client.set_variable("temperature", 0.6, program=PROGRAM, reason="warmer")
        _, tries_change = await _run_until(client, tail, _temperature("0.6"))

        await client.set_variable("module", "ChainOfThought", var_type="module", program=PROGRAM)
        cot, tries_module = await _run_until(
            client, tail, lambda e: e["module_type"] == "ChainOfThought"
        )
        assert cot["variables"]["temperature"] == "0.6" and "answer" in cot["outputs"]

        # Refused at the producer: nothing reaches either topic.
        before = end_offsets(settings, ["variables", "variables.history"])
        with pytest.raises(InvalidRequest, match=r"value_json.*above the maximum 1"):
            await client.set_variable("temperature", 7, program=PROGRAM)
        assert end_offsets(settings, ["variables", "variables.history"]) == before

        # Refused by the router: dead-lettered, the last good value stays in force.
        current = await client.get_variable("temperature", program=PROGRAM)
        assert current is not None and current["version"] == 2
        bad = {**current, "version": 3, "value_json": "7", "previous_value_json": "0.6"}
        _produce_raw(settings, "variables", TEMPERATURE_KEY, bad)
        tail.wait(lambda t: bool(_refusals(t, variables_topic)), 30, "variables dead letter")
        letter = _refusals(tail, variables_topic)[0]
        assert letter["component"] == "router" and letter["error_class"] == "InvalidRequest"
        assert "value_json" in letter["error_message"] and "maximum" in letter["error_message"]
        assert letter["original_key"] == TEMPERATURE_KEY.encode()
        kept, _ = await _run_until(client, tail, lambda e: True)
        assert kept["variables"]["temperature"] == "0.6"
        assert (await client.get_variable("temperature", program=PROGRAM)) == current

        # The next good update goes above the refused version and is applied.
        fixed = await client.set_variable("temperature", 0.1, program=PROGRAM, reason="fix")
        assert fixed["version"] == 4 and fixed["previous_value_json"] == "0.6"
        _, tries_fixed = await _run_until(client, tail, _temperature("0.1"))

        history = await client.variable_history("temperature", program=PROGRAM)
        listed = {r["name"]: r for r in await client.list_variables()}
    letters = len(_refusals(tail, variables_topic))
    print(
        f"\nvariables applied after tries: set={tries_set} change={tries_change} "
        f"module={tries_module} fixed={tries_fixed}; variables dead letters={letters}"
    )
    assert [(r["version"], r["value_json"], r["reason"]) for r in history] == [
        (1, "0.2", "start cool"),
        (2, "0.6", "warmer"),
        (4, "0.1", "fix"),
    ]
    assert history[0]["updated_by"] == "test" and history[1]["observers"] == [PROGRAM]
    assert listed["temperature"]["value_json"] == "0.1"
    assert listed["module"]["value_json"] == '"ChainOfThought"'


class Routers:
    """In-process routers sharing one app id (a restart is stop, then start another)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app_id = f"{settings.topics.prefix}router-{uuid.uuid4().hex[:8]}"
        self.running: list[RouterApp] = []

    async def start(self) -> RouterApp:
        router = make_router(self.settings, app_id=self.app_id)
        await router.start()
        self.running.append(router)
        return router

    async def stop(self, router: RouterApp) -> None:
        self.running.remove(router)
        await router.stop()


@pytest.fixture
async def routers(settings: Settings, create_topics: CreateTopics) -> AsyncIterator[Routers]:
    create_topics()
    started = Routers(settings)
    yield started
    for router in list(started.running):
        await started.stop(router)
    _delete_topics_with_prefix(settings, started.app_id)


async def test_a_restarted_router_keeps_the_good_value_and_does_not_dead_letter_again(
    settings: Settings, routers: Routers, tails: OpenTail
) -> None:
    router = await routers.start()
    tail = tails(["dlq"])
    variables_topic = Topics(settings.topics).name("variables")
    async with AsyncClient(settings) as client:
        good = await client.set_variable("temperature", 0.3, var_type="probability")
    await until(lambda: router.variables.store.get("temperature") == good, 30, "good value")
    bad = {**good, "version": 2, "value_json": "1.5"}
    _produce_raw(settings, "variables", "temperature", bad)
    old = {**good, "value_json": "0.9"}  # not newer than the version in force
    _produce_raw(settings, "variables", "temperature", old)
    # the router runs on this event loop: wait without blocking it
    await until(lambda: len(_refusals(tail, variables_topic)) >= 2, 30, "two dead letters")
    messages = sorted(r["error_message"] for r in _refusals(tail, variables_topic))
    assert "is not newer than the version in force (1)" in messages[0]
    assert messages[1].startswith("value_json: a probability must lie in [0, 1]")
    assert router.variables.store.get("temperature") == good
    # the refused records are not the key's latest: compaction would leave only them
    serde = make_serde(settings)
    await until(
        lambda: (
            latest_by_key(read_to_end(settings, serde, variables_topic, "VariableUpdate"))[
                "temperature"
            ]
            == good
        ),
        30,
        "the value in force produced again after the refusals",
    )
    await routers.stop(router)

    restarted = await routers.start()
    assert restarted.variables.store.get("temperature") == good
    assert restarted.variables.store.resolve(None) == {"temperature": "0.3"}
    # A marker: one more bad update, refused live after the replay. The router reads the
    # key's records in order and flushes each dead letter before the next, all to one
    # partition, so a replayed refusal dead-lettered again would be read before it.
    marker = {**good, "version": 3, "value_json": "2.5"}
    sent = _produce_raw(settings, "variables", "temperature", marker)
    await until(
        lambda: any(r["original_value"] == sent for r in _refusals(tail, variables_topic)),
        30,
        "the marker's dead letter",
    )
    assert len(_refusals(tail, variables_topic)) == 3  # replayed refusals are only logged


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": str(settings.kafka.bootstrap_servers),
        "DSPEX_TOPICS__PREFIX": settings.topics.prefix,
        "COLUMNS": "250",
    }
    cmd = [sys.executable, "-m", "dspex.streams", "variables", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_cli_set_get_list_history_and_a_refused_value(
    settings: Settings, create_topics: CreateTopics
) -> None:
    create_topics()
    where = ["--program", PROGRAM]
    first = _cli(
        settings,
        *["set", "temperature", "0.3", "--type", "float", "--min", "0", "--max", "1", *where],
        *["--reason", "first cut", "--by", "ana", "--observer", PROGRAM],
    )
    assert first.returncode == 0, first.stdout + first.stderr
    assert "v1" in first.stdout
    second = _cli(settings, "set", "temperature", "0.5", *where, "--reason", "warmer")
    assert second.returncode == 0, second.stderr
    model = _cli(settings, "set", "model", "small", "--type", "choice", "--choices", "small,large")
    assert model.returncode == 0, model.stderr
    top_p = _cli(settings, "set", "top_p", "0.9", "--type", "probability", "--when", "model=large")
    assert top_p.returncode == 0, top_p.stderr

    refused = _cli(settings, "set", "temperature", "7", *where)
    assert refused.returncode == 1
    assert "value_json" in refused.stderr and "above the maximum 1" in refused.stderr
    assert "Traceback" not in refused.stderr
    not_json = _cli(settings, "set", "temperature", "warm", *where)
    assert not_json.returncode == 1 and "finite number" in not_json.stderr

    got = _cli(settings, "get", "temperature", *where)
    assert got.returncode == 0, got.stderr
    record = json.loads(got.stdout)
    assert (record["value_json"], record["version"]) == ("0.5", 2) and "@" in record["updated_by"]
    assert json.loads(record["constraints_json"]) == {"min": 0, "max": 1}
    assert record["observers"] == [PROGRAM]
    choice = json.loads(_cli(settings, "get", "model").stdout)
    assert choice["value_json"] == '"small"'
    condition = json.loads(_cli(settings, "get", "top_p").stdout)
    assert json.loads(condition["constraints_json"]) == {"when": {"model": ["large"]}}
    missing = _cli(settings, "get", "nothing")
    assert missing.returncode == 1 and "no variable 'nothing'" in missing.stderr

    listing = _cli(settings, "list")
    assert listing.returncode == 0, listing.stderr
    for text in ("temperature", f"program {PROGRAM}", "model", "top_p", '"small"'):
        assert text in listing.stdout, listing.stdout
    history = _cli(settings, "history", "temperature")
    assert history.returncode == 0, history.stderr
    assert "first cut" in history.stdout and "warmer" in history.stdout and "ana" in history.stdout
    assert history.stdout.index("first cut") < history.stdout.index("warmer")
