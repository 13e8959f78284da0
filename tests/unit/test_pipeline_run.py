"""The pipeline agent's run state machine and the execution plan, without a broker."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from dspex.agents.pipeline.answers import (
    final_response,
    progress_chunk,
    stage_summary,
    stage_telemetry,
    state_record,
)
from dspex.agents.pipeline.run import Issue, Run, stage_request_id
from dspex.schemas import records
from dspex.schemas.records import Record
from dspex.schemas.times import now
from dspex.streams.errors import InvalidRequest
from dspex.streams.pipelines.plan import Plan, json_equal
from dspex.streams.serde import make_serde
from dspex.streams.settings import load_settings

stage = records.pipeline_stage


def version(
    stages: list[Record], outputs: dict[str, str], inputs: str = "q, items: list[str]"
) -> Record:
    return records.pipeline_version(
        pipeline_id="p", version=1, inputs=inputs, stages=stages, outputs=outputs, created_at=now()
    )


def chain() -> Record:
    """a, then a map over the run's items (2 at once), then c reading both; b optional."""
    return version(
        [
            stage(name="a", signature="q -> x", inputs={"q": "$input.q"}),
            stage(
                name="m",
                signature="t -> y",
                inputs={"t": "$item"},
                map_over="$input.items",
                map_concurrency=2,
            ),
            stage(
                name="b",
                signature="q -> z",
                inputs={"q": "$input.q"},
                optional=True,
                defaults={"z": json.dumps("default")},
            ),
            stage(
                name="c",
                signature="x, ys: list[str], z -> answer",
                inputs={"x": "$stage.a.x", "ys": "$stage.m.y", "z": "$stage.b.z"},
            ),
        ],
        {"answer": "$stage.c.answer", "ys": "$stage.m.y"},
    )


def run_of(pipeline: Record, inputs: dict[str, Any], stream: bool = True) -> Run:
    request = records.request(
        request_id="00000000-0000-4000-8000-000000000001",
        created_at=1_000,
        deadline_at=60_000,
        pipeline_id="p",
        inputs={k: json.dumps(v) for k, v in inputs.items()},
        stream=stream,
        metadata={"tenant": "acme", "dspex.gold": "{}"},
    )
    return Run.resume(Plan.from_record(pipeline), request, "t.pipeline.replies", None)


def ok(**outputs: Any) -> Record:
    return records.response(
        request_id="x",
        outputs={k: json.dumps(v) for k, v in outputs.items()},
        pool="general",
        produced_at=0,
    )


def failed(field: str = "n") -> Record:
    error = records.error_info(error_class="InvalidRequest", message="bad", field=field)
    return records.response(request_id="x", status="error", error=error, produced_at=0)


def keys(issues: list[Issue]) -> list[str]:
    return sorted(issue.key for issue in issues)


def test_stages_start_when_ready_and_map_items_are_bounded_and_gathered_in_order() -> None:
    run = run_of(chain(), {"q": "hi", "items": ["i0", "i1", "i2"]})
    first = run.advance(10)
    assert keys(first) == ["a", "b", "m/0", "m/1"]  # independent stages at once; 2 items
    issue = next(i for i in first if i.key == "m/1")
    assert json.loads(issue.request["inputs"]["t"]) == "i1"
    assert issue.request["reply_topic"] == "t.pipeline.replies"
    assert issue.request["metadata"]["dspex.pipeline.stage"] == "m"
    assert "dspex.gold" not in issue.request["metadata"]  # the run's own labels only
    assert issue.request_id == stage_request_id(run.run_id, "m", 1)
    assert run.answer("m/1", ok(y="Y1"), 20)
    assert keys(run.advance(20)) == ["m/2"]
    assert not run.answer("m/1", ok(y="again"), 21)  # a duplicate answer changes nothing
    for key, answer in [("m/2", ok(y="Y2")), ("m/0", ok(y="Y0")), ("a", ok(x="X"))]:
        run.answer(key, answer, 30)
    assert run.advance(30) == []  # c waits for b
    run.answer("b", failed(), 40)
    (last,) = run.advance(40)
    assert json.loads(last.request["inputs"]["ys"]) == ["Y0", "Y1", "Y2"]
    assert json.loads(last.request["inputs"]["z"]) == "default"
    run.answer("c", ok(answer="done"), 50)
    run.advance(50)
    final = final_response(run, 60)
    assert (final["status"], final["partial"]) == ("ok", True)
    assert final["outputs"] == {"answer": '"done"', "ys": '["Y0", "Y1", "Y2"]'}
    assert final["seq"] == len(run.events)
    states = {s["name"]: s["state"] for s in final["stages"]}
    assert states == {"a": "finished", "m": "finished", "b": "defaulted", "c": "finished"}


def test_a_failing_stage_fails_the_run_naming_stage_and_field() -> None:
    run = run_of(chain(), {"q": "hi", "items": []})
    run.advance(10)
    run.answer("a", failed("inputs.q"), 20)
    assert run.done and run.status == "error"
    error = final_response(run, 30)["error"]
    assert (error["stage"], error["field"]) == ("a", "inputs.q")
    assert "stage 'a' failed" in error["message"]
    assert {s["name"]: s["state"] for s in stage_summary(run)}["c"] == "cancelled"


def test_when_false_skips_the_stage_and_those_reading_it_output_null() -> None:
    pipeline = version(
        [
            stage(
                name="w",
                signature="q -> x",
                inputs={"q": "$input.q"},
                when=records.stage_condition(ref="$input.flag", values=["true"]),
            ),
            stage(name="after", signature="x -> y", inputs={"x": "$stage.w.x"}),
        ],
        {"y": "$stage.after.y"},
        inputs="q, flag: int",
    )
    run = run_of(pipeline, {"q": "hi", "flag": 1})  # 1 is not true: JSON values, not Python
    assert run.advance(10) == []
    assert final_response(run, 20)["outputs"] == {"y": "null"}
    assert [s["state"] for s in stage_summary(run)] == ["skipped", "skipped"]
    assert final_response(run, 20)["partial"] is False


def test_a_deadline_passing_times_the_run_out_naming_the_running_stage() -> None:
    run = run_of(chain(), {"q": "hi", "items": ["i0"]}, stream=False)
    run.advance(10)
    run.expire(70_000)
    final = final_response(run, 70_000)
    assert (final["status"], final["seq"]) == ("timeout", 0)
    assert final["error"]["stage"] in {"a", "b", "m"}


def test_a_run_resumes_from_its_stored_state_without_rerunning_answered_stages() -> None:
    serde = make_serde(load_settings())
    run = run_of(chain(), {"q": "hi", "items": ["i0", "i1"]})
    issues = run.advance(10)
    run.issued |= {i.key for i in issues if i.key != "m/1"}  # m/1 was never acknowledged
    run.answer("a", ok(x="X"), 20)
    value = serde.encode("PipelineRun", state_record(run, 25), topic="t.pipeline.state")
    stored = serde.decode(value, topic="t.pipeline.state", expect="PipelineRun").record
    resumed = Run.resume(run.plan, run.request, "t.pipeline.replies", stored)
    assert resumed.events == [dict(e) for e in stored["events"]]
    assert sorted(resumed.running()) == ["b", "m/0", "m/1"]  # a is answered: not run again
    assert sorted(set(resumed.running()) - resumed.issued) == ["m/1"]  # to send again
    assert resumed.advance(30) == []
    assert resumed.results["a"] == {"x": "X"}
    progress = progress_chunk(resumed, 0, 40)
    assert (progress["seq"], progress["stage"]["state"]) == (0, "started")


def test_stage_request_ids_are_uuids_derived_from_run_stage_and_item() -> None:
    one = stage_request_id("run", "s", 1)
    assert one == stage_request_id("run", "s", 1)
    assert len({one, stage_request_id("run", "s", 2), stage_request_id("run", "s", None)}) == 3
    assert len(one) == 36 and one.count("-") == 4


def test_the_plan_refuses_what_cannot_run_naming_the_path() -> None:
    bad = [
        ([stage(name="s", signature="a -> b", inputs={"a": "$stage.s.b"})], "stages.s"),
        ([stage(name="s", signature="a -> b", inputs={"a": "$stage.t.b"})], "stages.s"),
        ([stage(name="s", signature="a -> b", inputs={"a": "$item"})], "stages.s"),
        ([stage(name="s", signature="a -> b", inputs={"a": "input.q"})], "stages.s.inputs.a"),
        ([stage(name="s", inputs={"a": "$input.q"})], "stages.s"),
        (
            [
                stage(name="s", signature="a -> b", inputs={"a": "$stage.t.b"}),
                stage(name="t", signature="a -> b", inputs={"a": "$stage.s.b"}),
            ],
            "stages",
        ),
    ]
    for stages, path in bad:
        with pytest.raises(InvalidRequest) as caught:
            Plan.from_record(version(stages, {}))
        assert caught.value.field == path, (stages, caught.value)


def test_run_inputs_are_checked_against_the_declared_inputs() -> None:
    plan = Plan.from_record(chain())
    assert plan.check_run_inputs({"q": '"hi"', "items": '["a"]'}) == {"q": "hi", "items": ["a"]}
    for inputs, field in [
        ({"q": '"hi"'}, "inputs.items"),
        ({"q": '"hi"', "items": '"a"'}, "inputs.items"),
        ({"q": '"hi"', "items": "[]", "other": "1"}, "inputs.other"),
    ]:
        with pytest.raises(InvalidRequest) as caught:
            plan.check_run_inputs(inputs)
        assert caught.value.field == field


def test_json_equal_compares_json_values_not_python_ones() -> None:
    assert json_equal(1, 1.0) and json_equal([1, {"a": "b"}], [1.0, {"a": "b"}])
    assert not json_equal(True, 1) and not json_equal(0, False) and not json_equal("1", 1)
    assert json_equal(None, None) and not json_equal(None, "null")


def test_the_live_view_folds_progress_and_the_final_summary_into_one_row_per_stage() -> None:
    from dspex.streams.cli.runs import StageBoard
    from dspex.streams.client._replies import Chunk

    run = run_of(chain(), {"q": "hi", "items": ["i0", "i1"]})
    run.advance(1_000)
    for key, answer in [("a", ok(x="X")), ("m/0", ok(y="0")), ("b", failed())]:
        run.answer(key, answer, 2_000)
    board = StageBoard()
    for seq in range(len(run.events)):
        board.take(Chunk.from_record(progress_chunk(run, seq, 2_000)))
    rows = board.rows
    assert (rows["a"].state, rows["a"].pool, rows["a"].finished_ms) == ("finished", "general", 2000)
    assert (rows["m"].state, rows["m"].items, rows["m"].items_done) == ("started", 2, 1)
    assert rows["b"].state == "defaulted" and "stage 'b'" in (rows["b"].error or "")
    assert board.table().row_count == 3


async def test_stage_answers_wait_for_their_run_or_are_kept_until_it_asks() -> None:
    import asyncio

    from dspex.agents.pipeline.views import StageAnswers

    answers = StageAnswers()
    early = {**ok(y="early"), "request_id": "r1"}
    answers.apply("r1", {**early, "final": False})  # progress chunks are not answers
    assert not answers.arrived("r1")
    answers.apply("r1", early)
    assert answers.arrived("r1")
    queue: asyncio.Queue[tuple[str, Record]] = asyncio.Queue()
    answers.wait("r1", "m/0", queue)
    answers.wait("r2", "m/1", queue)
    answers.apply("r2", {**ok(y="late"), "request_id": "r2"})
    got = [queue.get_nowait(), queue.get_nowait()]
    assert [(key, r["request_id"]) for key, r in got] == [("m/0", "r1"), ("m/1", "r2")]
    answers.forget({"r1", "r2"})
    answers.apply("r2", {**ok(y="again"), "request_id": "r2"})
    assert queue.empty() and answers.arrived("r2")


def test_run_states_replay_answers_from_just_before_the_oldest_running_stage() -> None:
    from dspex.agents.pipeline.views import REPLAY_MARGIN_MS, RunStates

    states = RunStates()
    assert states.replay_from(50_000) == 50_000 - REPLAY_MARGIN_MS  # nothing running: now
    run = run_of(chain(), {"q": "hi", "items": ["i0"]})
    run.advance(20_000)
    states.apply(run.run_id, state_record(run, 21_000))
    assert states.replay_from(50_000) == 20_000 - REPLAY_MARGIN_MS
    run.status = "ok"
    states.apply(run.run_id, state_record(run, 30_000))
    assert states.replay_from(50_000) == 50_000 - REPLAY_MARGIN_MS
    assert (states.get(run.run_id) or {})["status"] == "ok"
    states.apply(run.run_id, None)
    assert states.get(run.run_id) is None


def test_each_stage_that_ended_is_measured_once_as_stage_telemetry() -> None:
    from dspex.agents.metrics.windows import Sample

    run = run_of(chain(), {"q": "hi", "items": []})
    run.advance(1_000)
    run.answer("a", ok(x="X"), 1_250)
    run.answer("b", failed(), 1_500)
    measured = [stage_telemetry(run, event, "pipeline-1") for event in run.events]
    records_ = [r for r in measured if r is not None]
    assert [(r["program_id"], r["success"]) for r in records_] == [
        ("p/m", True),  # an empty map is done at once
        ("p/a", True),
        ("p/b", False),  # one record for the optional stage: its "defaulted" event
    ]
    sample = Sample.of(records_[1])
    assert sample is not None
    assert (sample.program, sample.pool, sample.latency_ms) == ("p/a", "general", 250.0)


async def test_a_run_delivered_twice_is_run_once_and_both_deliveries_end_with_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio

    from dspex.agents.pipeline.agent import PipelineApp
    from dspex.agents.plumbing.messages import Consumed

    settings = load_settings()
    app = PipelineApp(settings, app_id="test-pipeline")
    run = run_of(chain(), {"q": "hi", "items": []})
    value = make_serde(settings).encode("Request", run.request, topic="t.pipeline.runs")
    release = asyncio.Event()
    served: list[str] = []

    async def plan(_: Any) -> Plan:
        return run.plan

    async def serve(each: Run) -> None:
        served.append(each.run_id)
        await release.wait()

    monkeypatch.setattr(app, "_plan", plan)
    monkeypatch.setattr(app, "_serve", serve)
    consumed = Consumed("t.pipeline.runs", 0, 1, b"k", value)
    first = asyncio.create_task(app.handle(consumed))
    second = asyncio.create_task(app.handle(consumed))
    await asyncio.sleep(0.05)
    assert served == [run.run_id] and not first.done() and not second.done()
    release.set()
    await asyncio.wait_for(asyncio.gather(first, second), 5)
    assert app._active == {}


async def test_a_session_run_is_recorded_once_as_one_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    from dspex.agents.pipeline import sessions as run_sessions
    from dspex.agents.plumbing.publisher import Publisher, serve_deliveries
    from dspex.streams.serde import SingleObjectSerde
    from dspex.streams.sessions import Found
    from dspex.streams.settings import load_settings
    from tests.fakes import FakeProducer

    serde = SingleObjectSerde()
    held: dict[str, Found] = {}
    monkeypatch.setattr(run_sessions, "find_session", lambda _s, _d, sid: held.get(sid, Found()))
    producer = FakeProducer()
    publisher = Publisher(producer, serde, asyncio.get_running_loop())
    server = asyncio.create_task(serve_deliveries(publisher))
    hook = run_sessions.RunSessions(load_settings(), serde, "pipe-agent")
    run = run_of(chain(), {"q": "hi", "items": []})
    run.request = {**run.request, "session_id": "s1"}
    run.status, run.outputs = "ok", {"answer": json.dumps("A")}
    try:
        first = await hook.record(run, publisher)
        (state,) = producer.records("dspex.sessions")
        held["s1"] = Found(state)
        again = await hook.record(run, publisher)  # answered again after a crash
    finally:
        server.cancel()
    assert first == {"session_id": "s1", "turn": 1, "fresh": True, "expired": False}
    assert again == {"session_id": "s1", "turn": 1, "fresh": True, "expired": False}
    assert len(producer.records("dspex.sessions")) == 1  # not recorded twice
    (turn,) = state["turns"]
    assert (turn["request_id"], turn["pipeline_id"]) == (run.run_id, "p")
    assert turn["inputs"] == run.request["inputs"] and turn["outputs"] == run.outputs
    assert state["writer"] == "pipe-agent" and state["counters"]["turns"] == 1
