"""Sessions without a broker: the History grammar, caps, turn bookkeeping, order of turns.

The worker's session hook runs against a fake producer and a fake loader (the
topic's answer for a cold session is given by the test).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import dspy
import pytest

from dspex.agents.plumbing.messages import Consumed, TokenUsage
from dspex.agents.plumbing.publisher import Publisher, serve_deliveries
from dspex.agents.plumbing.sessionstate import trim
from dspex.agents.runtime.history import session_history
from dspex.agents.runtime.signatures import decode_inputs, parse_signature
from dspex.agents.worker.execution import Outcome
from dspex.agents.worker.handler import Destinations, WorkerHandler
from dspex.agents.worker.sessions import Sessions, program_key
from dspex.schemas import records, times
from dspex.schemas.samples import sample
from dspex.streams.client.sessions import check_session_id
from dspex.streams.errors import InvalidRequest
from dspex.streams.serde import SingleObjectSerde
from dspex.streams.sessions import Found, session_partition
from dspex.streams.settings import load_settings
from dspex.streams.signatures import HISTORY, history_inputs, parse_signature_fields, type_name
from tests.fakes import FakeExecutor, FakeProducer

SIGNATURE = "question, history: History -> answer"
SERDE = SingleObjectSerde()
TO = Destinations("dspex.responses", "dspex.executions", "dspex.telemetry", "dspex.dlq")


# -- the grammar ----------------------------------------------------------------------------


def test_history_is_an_input_type_of_the_grammar() -> None:
    fields = parse_signature_fields(SIGNATURE)
    assert fields.input("history") is HISTORY
    assert history_inputs(fields) == ("history",)
    assert type_name(HISTORY) == "History"
    assert parse_signature(SIGNATURE).input_fields["history"].annotation is dspy.History


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("question -> history: History", "an output cannot be History"),
        ("a: History, b: History, q -> answer", "at most one History input"),
        ("q: list[History] -> answer", "unsupported type"),
    ],
)
def test_history_misuse_is_refused_naming_the_signature(text: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message) as caught:
        parse_signature_fields(text)
    assert caught.value.field == "signature"


def test_a_request_never_sends_history_and_the_session_fills_it() -> None:
    signature = parse_signature(SIGNATURE)
    with pytest.raises(InvalidRequest, match="filled in by the worker") as caught:
        decode_inputs(signature, {"question": '"q"', "history": '{"messages": []}'})
    assert caught.value.field == "inputs.history"
    assert decode_inputs(signature, {"question": '"q"'})["history"].messages == []
    token = session_history.set([{"question": "a", "answer": "b"}])
    try:
        decoded = decode_inputs(signature, {"question": '"q"'})
    finally:
        session_history.reset(token)
    assert decoded["history"].messages == [{"question": "a", "answer": "b"}]


# -- caps, keys, ids ------------------------------------------------------------------------


def _turn(n: int, text: str = "x") -> dict[str, Any]:
    return records.history_turn(
        request_id=f"r{n}",
        turn=n,
        signature=SIGNATURE,
        inputs={"question": json.dumps(text)},
        outputs={"answer": json.dumps(text)},
        at=times.now(),
    )


def test_trim_drops_the_oldest_turns_past_the_count_cap() -> None:
    kept, dropped = trim([_turn(n) for n in range(1, 6)], max_turns=3, max_bytes=10_000)
    assert [t["turn"] for t in kept] == [3, 4, 5]
    assert dropped == 2


def test_trim_drops_the_oldest_turns_past_the_byte_cap() -> None:
    turns = [_turn(n, "y" * 100) for n in range(1, 6)]  # about 220 bytes each
    kept, dropped = trim(turns, max_turns=50, max_bytes=500)
    assert [t["turn"] for t in kept] == [4, 5]
    assert dropped == 3


def test_a_turn_larger_than_the_byte_cap_is_not_kept_at_all() -> None:
    kept, dropped = trim([_turn(1), _turn(2, "z" * 1000)], max_turns=50, max_bytes=500)
    assert kept == []
    assert dropped == 2


def test_program_key_and_partition_are_stable() -> None:
    assert program_key({"program_id": "chat"}) == "chat"
    inline = program_key({"signature": SIGNATURE})
    assert inline.startswith("inline:") and inline == program_key({"signature": SIGNATURE})
    assert session_partition("user-42", 6) == session_partition("user-42", 6) < 6
    assert len({session_partition(f"u{n}", 6) for n in range(100)}) == 6


@pytest.mark.parametrize("bad", ["", "   ", None, 7, "x" * 513])
def test_bad_session_ids_are_refused(bad: Any) -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_session_id(bad)
    assert caught.value.field == "session_id"


# -- the worker's hook ----------------------------------------------------------------------


class FakeLoader:
    """What the sessions topic holds for cold sessions; counts the loads."""

    def __init__(self, found: Mapping[str, Found] | None = None) -> None:
        self.found = dict(found or {})
        self.loads = 0

    async def load(self, session_id: str) -> Found:
        self.loads += 1
        await asyncio.sleep(0)
        return self.found.get(session_id, Found())

    def close(self) -> None:
        pass


def _settings(**sessions: Any) -> Any:
    return load_settings(
        lm={"backends": {"a": {"model": "dspex/echo"}, "b": {"model": "dspex/echo"}}},
        sessions=sessions,
    )


def _request(session: str, question: str, **changes: Any) -> dict[str, Any]:
    request = sample("Request")
    request.update(
        session_id=session,
        program_id=None,
        signature=SIGNATURE,
        stream=False,
        inputs={"question": json.dumps(question)},
        variables={},
    )
    request["route"].update(pool="general", variant="a", cache_key=None)
    request.update(changes)
    return request


def _origin(request: Mapping[str, Any], offset: int) -> Consumed:
    value = SERDE.encode("Request", request, topic="dspex.pool.general")
    key = request["session_id"].encode()
    return Consumed("dspex.pool.general", 0, offset, key, value, (), None)


async def recall(request: Mapping[str, Any], on_chunk: Any) -> Outcome:
    """A SIMULATED recall model: the history it was given, then this question."""
    await asyncio.sleep(0.01)
    seen = [m["question"] for m in session_history.get()]
    answer = " | ".join([*seen, json.loads(request["inputs"]["question"])])
    variant = (request.get("route") or {}).get("variant")
    return Outcome({"answer": answer}, TokenUsage(3, 2, 5), [], None, variant)


async def _serve(
    *origins: Consumed, loader: FakeLoader | None = None, **sessions: Any
) -> tuple[FakeProducer, Sessions]:
    loop = asyncio.get_running_loop()
    producer = FakeProducer()
    publisher = Publisher(producer, SERDE, loop)
    hook = Sessions(_settings(**sessions), SERDE, publisher, "w1", loader=loader or FakeLoader())
    handler = WorkerHandler(
        executor=FakeExecutor(recall),
        publisher=publisher,
        serde=SERDE,
        destinations=TO,
        pool="general",
        worker_id="w1",
        in_flight=8,
        sessions=hook,
    )
    server = asyncio.create_task(serve_deliveries(publisher))
    try:
        await asyncio.wait_for(asyncio.gather(*(handler.handle(o) for o in origins)), 5)
    finally:
        server.cancel()
    return producer, hook


def _answers(producer: FakeProducer) -> dict[str, tuple[str, dict[str, Any]]]:
    return {
        r["request_id"]: (json.loads(r["outputs"]["answer"]), r["session"])
        for r in producer.records(TO.responses)
    }


def _states(producer: FakeProducer) -> list[dict[str, Any]]:
    return producer.records("dspex.sessions")


async def test_concurrent_turns_of_one_session_run_in_key_order_and_are_all_recorded() -> None:
    turns = [_request("s1", f"q{n}") for n in range(1, 5)]
    other = _request("s2", "other")
    origins = [_origin(r, n) for n, r in enumerate([*turns[:2], other, *turns[2:]])]
    producer, _ = await _serve(*origins)
    answers = _answers(producer)
    for n, request in enumerate(turns, start=1):
        expected = " | ".join(f"q{k}" for k in range(1, n + 1))
        answer, turn = answers[request["request_id"]]
        assert answer == expected
        assert turn == {"session_id": "s1", "turn": n, "fresh": n == 1, "expired": False}
    assert answers[other["request_id"]][0] == "other"  # no other session's history
    last = [s for s in _states(producer) if s["session_id"] == "s1"][-1]
    assert [t["request_id"] for t in last["turns"]] == [r["request_id"] for r in turns]
    assert last["counters"]["turns"] == 4 and last["counters"]["prompt_tokens"] == 12
    assert last["version"] == 4 and last["writer"] == "w1"


async def test_a_redelivered_turn_sees_its_own_history_and_is_not_recorded_twice() -> None:
    first, second = _request("s1", "q1"), _request("s1", "q2")
    state = records.session_state(
        session_id="s1",
        version=2,
        created_at=times.now(),
        updated_at=times.now(),
        ttl_ms=60_000,
        expires_at=times.now() + timedelta(minutes=1),
        turns=[
            records.history_turn(
                request_id=r["request_id"],
                turn=n,
                signature=SIGNATURE,
                inputs=r["inputs"],
                outputs={"answer": json.dumps(r["inputs"]["question"])},
                at=times.now(),
            )
            for n, r in enumerate([first, second], start=1)
        ],
        counters=records.session_counters(turns=2),
    )
    loader = FakeLoader({"s1": Found(state)})
    producer, _ = await _serve(_origin(second, 1), loader=loader)
    answer, turn = _answers(producer)[second["request_id"]]
    assert answer == "q1 | q2"
    assert turn == {"session_id": "s1", "turn": 2, "fresh": False, "expired": False}
    assert _states(producer) == []  # already recorded


@pytest.mark.parametrize("how", ["expired state", "tombstone"])
async def test_an_expired_or_ended_session_starts_fresh_and_says_so(how: str) -> None:
    old = records.session_state(
        session_id="s1",
        version=7,
        created_at=times.now() - timedelta(hours=2),
        updated_at=times.now() - timedelta(hours=2),
        ttl_ms=1000,
        expires_at=times.now() - timedelta(hours=1),
        turns=[_turn(1, "old")],
        counters=records.session_counters(turns=9),
    )
    found = Found(old) if how == "expired state" else Found(None, "ended")
    request = _request("s1", "new")
    producer, _ = await _serve(_origin(request, 1), loader=FakeLoader({"s1": found}))
    answer, turn = _answers(producer)[request["request_id"]]
    assert answer == "new"
    assert turn == {"session_id": "s1", "turn": 1, "fresh": True, "expired": True}
    (state,) = _states(producer)
    assert state["restarted"] and state["version"] == 1 and state["counters"]["turns"] == 1


async def test_history_over_the_caps_keeps_the_newest_turns_and_counts_the_dropped() -> None:
    turns = [_request("s1", f"q{n}") for n in range(1, 6)]
    producer, _ = await _serve(*(_origin(r, n) for n, r in enumerate(turns)), max_turns=2)
    answer, turn = _answers(producer)[turns[-1]["request_id"]]
    assert answer == "q3 | q4 | q5"  # two earlier turns kept, then this one
    last = _states(producer)[-1]
    assert [t["turn"] for t in last["turns"]] == [4, 5]
    assert last["counters"]["dropped_turns"] == 3 and turn["turn"] == 5


async def test_a_sticky_session_runs_on_the_variant_of_its_first_turn() -> None:
    first = _request("s1", "q1")
    later = _request("s1", "q2")
    later["route"].update(variant="b", reason="table")
    producer, _ = await _serve(_origin(first, 1), _origin(later, 2))
    executions = {r["request_id"]: r for r in producer.records(TO.executions)}
    assert executions[later["request_id"]]["route"]["variant"] == "a"
    assert executions[later["request_id"]]["route"]["reason"] == "sticky"
    assert _states(producer)[-1]["pinned"] == {program_key(first): "a"}


async def test_a_program_with_stickiness_off_follows_its_route() -> None:
    first = _request("s1", "q1", program_id="chat")
    later = _request("s1", "q2", program_id="chat")
    later["route"].update(variant="b")
    producer, _ = await _serve(_origin(first, 1), _origin(later, 2), sticky={"chat": False})
    executions = {r["request_id"]: r for r in producer.records(TO.executions)}
    assert executions[later["request_id"]]["route"]["variant"] == "b"
    assert _states(producer)[-1]["pinned"] == {}


async def test_a_cached_session_is_not_read_again_and_a_cold_one_once() -> None:
    loader = FakeLoader()
    turns = [_request("s1", f"q{n}") for n in range(1, 4)]
    _, hook = await _serve(*(_origin(r, n) for n, r in enumerate(turns)), loader=loader)
    assert loader.loads == 1
    assert "s1" in hook.cache


def test_the_router_refuses_a_request_that_sends_the_history() -> None:
    from dspex.agents.router.routing import ProgramsResolver

    request = {"signature": SIGNATURE, "inputs": {"question": '"q"', "history": "{}"}}
    with pytest.raises(InvalidRequest) as caught:
        ProgramsResolver().resolve(request, None)
    assert caught.value.field == "inputs.history"
    assert ProgramsResolver().resolve({**request, "inputs": {"question": '"q"'}}, None)


# -- session variables ------------------------------------------------------------------------


def _var(name: str, value: Any, scope: str = "global", ref: str | None = None) -> dict[str, Any]:
    from dspex.streams.variables import new_update

    return new_update(name, value, var_type="float", scope=scope, scope_ref=ref)


def test_session_variables_override_shared_ones_for_that_session_only() -> None:
    from dspex.streams.variables import VariableStore, variable_key

    store = VariableStore()
    for record in (
        _var("temperature", 0.1),
        _var("temperature", 0.3, "program", "chat"),
        _var("temperature", 0.9, "session", "user/42"),  # any session id, "/" too
    ):
        key = variable_key(record["name"], record["scope"], record["scope_ref"])
        assert store.apply(key, record) is None
    assert key == "session/user/42/temperature"
    assert store.resolve("chat", session_id="user/42") == {"temperature": "0.9"}
    assert store.resolve("chat", session_id="someone-else") == {"temperature": "0.3"}
    assert store.resolve(None) == {"temperature": "0.1"}
    store.apply(key, None)  # ended: the tombstone removes it
    assert store.resolve("chat", session_id="user/42") == {"temperature": "0.3"}


def test_the_router_steers_a_session_by_its_own_model_variable() -> None:
    from dspex.agents.router.routing import Route
    from dspex.agents.router.variables import SharedVariables
    from dspex.streams.variables import new_update, variable_key

    settings = _settings()
    shared = SharedVariables(settings.lm)
    record = new_update("model", "b", var_type="string", scope="session", scope_ref="s1")
    shared.apply(variable_key("model", "session", "s1"), record)
    route = Route("general", "a", "static")
    steered = shared.steer({"session_id": "s1", "variables": {}}, route, None)
    other = shared.steer({"session_id": "s2", "variables": {}}, route, None)
    assert (steered.route.variant, steered.route.reason) == ("b", "variable")
    assert other.route.variant == "a"


@pytest.mark.parametrize(
    ("options", "scope", "ref"),
    [
        ({"session": "s1"}, "session", "s1"),
        ({"session": "s1", "scope": "session"}, "session", "s1"),
        ({"program": "chat"}, "program", "chat"),
    ],
)
def test_the_client_infers_the_session_scope(
    options: dict[str, Any], scope: str, ref: str | None
) -> None:
    from dspex.streams.client.variables import VariableScope, scope_of

    assert scope_of(VariableScope(**options)) == (scope, ref)  # type: ignore[typeddict-item]


@pytest.mark.parametrize("ref", [None, "", "  ", "x" * 513])
def test_a_session_variable_needs_a_usable_session_id(ref: str | None) -> None:
    from dspex.streams.variables import variable_key

    with pytest.raises(InvalidRequest) as caught:
        variable_key("temperature", "session", ref)
    assert caught.value.field in {"scope_ref", "scope"}


def test_the_sweeper_knows_each_sessions_variables() -> None:
    from dspex.agents.sessions.sweeper import Expiries, SessionVariables

    index = SessionVariables()
    index.apply("session/s1/temperature", _var("temperature", 0.5, "session", "s1"))
    index.apply("temperature", _var("temperature", 0.5))
    assert index.keys == {"s1": {"session/s1/temperature"}}
    index.apply("session/s1/temperature", None)
    assert index.keys == {"s1": set()}
    due = Expiries()
    due.apply("s1", {"expires_at": 1_000})
    due.apply("s2", {"expires_at": 5_000})
    assert due.expired(2_000) == ["s1"]
    due.apply("s1", None)
    assert due.expired(10_000) == ["s2"]


# -- the client's handles -----------------------------------------------------------------


class _RecordingClient:
    """Stands in for AsyncClient: records what the session handle asks for."""

    tenant: str | None = None

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    async def _submit(self, program: Any, inputs: Mapping[str, Any], options: Any) -> Any:
        self.calls.append(("submit", dict(options)))
        return "result"

    def stream(self, program: Any, inputs: Mapping[str, Any], **options: Any) -> Any:
        self.calls.append(("stream", options))
        return "chunks"

    async def set_variable(self, name: str, value: Any, **options: Any) -> dict[str, Any]:
        self.calls.append(("set_variable", options))
        return {}


async def test_the_async_handle_sends_every_request_and_variable_with_its_session() -> None:
    from dspex.streams.client.sessions import AsyncSession

    client = _RecordingClient()
    chat = AsyncSession(client, load_settings(), "user-42")
    await chat.submit("chat", {"question": "q"}, deadline_s=5)
    chat.stream("chat", {"question": "q"})
    await chat.set_variable("temperature", 0.2, var_type="float")
    assert client.calls == [
        ("submit", {"deadline_s": 5, "session_id": "user-42"}),
        ("stream", {"session_id": "user-42"}),
        ("set_variable", {"var_type": "float", "scope": "session", "session": "user-42"}),
    ]
    with pytest.raises(InvalidRequest, match="given to session") as caught:
        await chat.submit("chat", {"question": "q"}, session_id="someone-else")
    assert caught.value.field == "session_id"
    with pytest.raises(InvalidRequest) as scoped:
        await chat.set_variable("temperature", 0.2, program="chat")
    assert scoped.value.field == "scope"


def test_the_sessions_agent_reports_each_changed_sessions_counters_once() -> None:
    from dspex.agents.sessions.sweeper import Expiries, session_snapshot

    state = sample("SessionState")
    due = Expiries()
    due.apply("user-42", state)
    (changed,) = due.take_changed().values()
    assert due.take_changed() == {}
    snapshot = session_snapshot(changed)
    assert SERDE.decode(SERDE.encode("MetricSnapshot", snapshot, topic="m"), topic="m").record
    assert (snapshot["name"], snapshot["labels"]) == ("session", {"session_id": "user-42"})
    assert (snapshot["count"], snapshot["tokens"], snapshot["value"]) == (1, 134, 812.5)


async def test_a_pipeline_stage_reads_the_pipelines_turns_and_records_nothing() -> None:
    run_turns = [
        records.history_turn(
            request_id=f"run-{n}",
            turn=n,
            pipeline_id="chat" if n != 2 else "other",
            inputs={"question": json.dumps(f"p{n}")},
            outputs={"answer": json.dumps(f"a{n}")},
            at=times.now(),
        )
        for n in (1, 2, 3)
    ]
    state = records.session_state(
        session_id="s1",
        version=3,
        created_at=times.now(),
        updated_at=times.now(),
        ttl_ms=60_000,
        expires_at=times.now() + timedelta(minutes=1),
        turns=run_turns,
        counters=records.session_counters(turns=3),
    )
    meta = {"dspex.pipeline.id": "chat", "dspex.pipeline.run": "run-9", "dspex.pipeline.stage": "s"}
    stages = [_request("s1", f"stage{n}", metadata=meta) for n in (1, 2)]
    again = _request("s1", "again", metadata={**meta, "dspex.pipeline.run": "run-3"})
    loader = FakeLoader({"s1": Found(state)})
    producer, _ = await _serve(
        *(_origin(r, n) for n, r in enumerate([*stages, again])), loader=loader
    )
    answers = _answers(producer)
    # this pipeline's earlier runs (not another pipeline's), oldest first; both stages alike
    for stage in stages:
        assert (
            answers[stage["request_id"]][0]
            == f"p1 | p3 | {json.loads(stage['inputs']['question'])}"
        )
    # a run already recorded (answered again after a crash) sees the runs before it only
    assert answers[again["request_id"]][0] == "p1 | again"
    assert _states(producer) == []  # the pipeline agent records the run, not its stages
