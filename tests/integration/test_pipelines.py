"""Pipelines end to end on a real broker: client -> router -> pipeline agent -> stages -> client.

The router, one worker per pool and the pipeline agent run as ``python -m dspex.agents``
processes (:mod:`tests.integration.stack`). Every pool answers with a deterministic
SIMULATED LM (``dspex/sim?task=upper``: each ``str`` output is the first input in upper
case) that takes a fixed delay per call; the optimizer pool's simulation always fails
(a SIMULATED outage), so a stage sent there fails for real through the worker.
Pipelines are published as PipelineVersion records straight to the ``pipelines`` topic.
Timing is asserted as overlap of stage intervals, never as wall-clock thresholds; the
chaos test prints its figures (run with ``-s``).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from functools import partial
from typing import Any

import pytest

from dspex.schemas import records
from dspex.schemas.records import Record
from dspex.schemas.times import now, to_ms
from dspex.streams import kafka
from dspex.streams.client.client import AsyncClient, Chunk, PipelineRef, RequestFailed, Result
from dspex.streams.errors import DSPexError
from dspex.streams.serde import make_serde
from dspex.streams.settings import Settings, load_settings
from dspex.streams.topics import Topics
from tests.integration.tail import OpenTail, until
from tests.integration.test_end_to_end import (  # noqa: F401 - the fixture is used by name
    StartStack,
    start_stack,
)

DELAY_S = 0.3
SIM = f"dspex/sim?task=upper&delay={DELAY_S}"
DOWN = "dspex/sim?task=upper&fail=1000000000"  # a SIMULATED outage: every call fails


def pipeline_settings(settings: Settings, delay_s: float = DELAY_S) -> Settings:
    """The test's broker and prefix; general and gpu on the slow simulation, optimizer down."""
    sim = f"dspex/sim?task=upper&delay={delay_s}"
    return load_settings(
        kafka={"bootstrap_servers": settings.kafka.bootstrap_servers},
        topics={"prefix": settings.topics.prefix},
        lm={
            "backends": {"sim": {"model": sim}, "down": {"model": DOWN}},
            "default_variant": "sim",
            "pool_variants": {"general": "sim", "gpu": "sim", "optimizer": "down"},
        },
        reliability={"retry_attempts": 1, "retry_topic_attempts": 1},
    )


def publish(settings: Settings, version: Record) -> None:
    """Produce one PipelineVersion to the pipelines topic (key: its id) and wait for the ack."""
    topic = Topics(settings.topics).name("pipelines")
    value = make_serde(settings).encode("PipelineVersion", version, topic=topic)
    producer = kafka.producer(settings)
    producer.produce(topic, value, version["pipeline_id"].encode())
    assert producer.flush(30) == 0


def _j(value: Any) -> str:
    return json.dumps(value)


def support_pipeline(pipeline_id: str = "support") -> Record:
    """Seven stages: two independent on general and gpu, a map of 10, a when branch taken
    or skipped by ``kind``, an optional stage on the failing pool, and a final stage."""
    stage = records.pipeline_stage
    return records.pipeline_version(
        pipeline_id=pipeline_id,
        version=1,
        inputs="question, topics: list[str], kind",
        stages=[
            stage(
                name="retrieve",
                signature="question -> passage",
                inputs={"question": "$input.question"},
                pool_hint="general",
            ),
            stage(
                name="classify",
                signature="question -> label",
                inputs={"question": "$input.question"},
                pool_hint="gpu",
            ),
            stage(
                name="summarize",
                signature="topic -> summary",
                inputs={"topic": "$item"},
                map_over="$input.topics",
                map_concurrency=4,
                pool_hint="general",
            ),
            stage(
                name="billing",
                signature="passage -> reply",
                inputs={"passage": "$stage.retrieve.passage"},
                when=records.stage_condition(ref="$input.kind", values=[_j("billing")]),
            ),
            stage(
                name="tech",
                signature="passage -> reply",
                inputs={"passage": "$stage.retrieve.passage"},
                when=records.stage_condition(ref="$input.kind", values=[_j("tech"), _j("it")]),
            ),
            stage(
                name="enrich",
                signature="question -> extra",
                inputs={"question": "$input.question"},
                optional=True,
                defaults={"extra": _j("none")},
                pool_hint="optimizer",
            ),
            stage(
                name="final",
                signature="label, summaries: list[str], extra -> answer",
                inputs={
                    "label": "$stage.classify.label",
                    "summaries": "$stage.summarize.summary",
                    "extra": "$stage.enrich.extra",
                },
            ),
        ],
        outputs={
            "answer": "$stage.final.answer",
            "summaries": "$stage.summarize.summary",
            "billing": "$stage.billing.reply",
            "tech": "$stage.tech.reply",
            "extra": "$stage.enrich.extra",
        },
        created_at=now(),
    )


def _interval(status: dict[str, Any]) -> tuple[int, int]:
    started, finished = to_ms(status["started_at"]), to_ms(status["finished_at"])
    assert started is not None and finished is not None, status
    return started, finished


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return max(a[0], b[0]) < min(a[1], b[1])


def _most_at_once(intervals: Iterable[tuple[int, int]]) -> int:
    edges = sorted([(s, 1) for s, _ in intervals] + [(f, -1) for _, f in intervals])
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


async def _run(client: AsyncClient, inputs: dict[str, Any]) -> list[Chunk]:
    stream = client.stream(PipelineRef("support"), inputs, deadline_s=180)
    return [chunk async for chunk in stream]


async def test_seven_stages_run_in_parallel_across_pools_and_answer_partial(
    settings: Settings,
    start_stack: StartStack,  # noqa: F811 - the fixture imported above
    tails: OpenTail,
) -> None:
    settings = pipeline_settings(settings)
    start_stack(settings, ["general", "gpu", "optimizer"], pipeline=True)
    tail = tails(["responses", "telemetry"], settings=settings)
    publish(settings, support_pipeline())
    question = f"why is my bill so high {uuid.uuid4().hex[:6]}"
    topics = [f"topic {n}" for n in range(10)]
    async with AsyncClient(settings) as client:
        billing, tech = await asyncio.gather(
            _run(client, {"question": question, "topics": topics, "kind": "billing"}),
            _run(client, {"question": question, "topics": topics, "kind": "it"}),
        )
    final = billing[-1]
    assert final.final and final.status == "ok", final.error
    assert final.outputs == {
        "answer": question.upper(),
        "summaries": [topic.upper() for topic in topics],
        "billing": question.upper(),
        "tech": None,  # its when was false: skipped
        "extra": "none",  # the optional stage failed: its default
    }
    assert final.partial is True
    stages = {status["name"]: status for status in final.stages}
    assert stages["enrich"]["state"] == "defaulted"
    assert "stage 'enrich'" in stages["enrich"]["error"], stages["enrich"]
    assert stages["tech"]["state"] == "skipped"
    assert {stages[name]["state"] for name in ("retrieve", "classify", "summarize", "final")} == {
        "finished"
    }
    assert (stages["retrieve"]["pool"], stages["classify"]["pool"]) == ("general", "gpu")

    other = tech[-1]
    assert other.status == "ok" and other.partial is True, other.error
    assert (other.outputs or {})["tech"] == question.upper()
    assert (other.outputs or {})["billing"] is None

    # overlap: the independent stages ran at once, and so did the map items (4 at most)
    retrieve, classify = _interval(stages["retrieve"]), _interval(stages["classify"])
    assert _overlap(retrieve, classify), (retrieve, classify)
    items = [
        _interval(c.stage)
        for c in billing
        if c.stage and c.stage["name"] == "summarize" and c.stage["item"] is not None
        if c.stage["state"] == "finished"
    ]
    assert len(items) == 10
    assert 2 <= _most_at_once(items) <= 4, items
    ran = [_interval(s) for name, s in stages.items() if s["state"] in ("finished", "defaulted")]
    wall = max(f for _, f in ran) - min(s for s, _ in ran)
    summed = sum(f - s for s, f in ran if (s, f) != _interval(stages["summarize"])) + sum(
        f - s for s, f in items
    )
    print(f"\nrun wall time {wall} ms, sum of stage times {summed} ms")
    assert wall < summed

    # progress: every stage event came as a chunk, in order, and one final per run
    progress = [c for c in billing if not c.final]
    assert [c.seq for c in billing] == list(range(len(billing)))
    assert {c.stage["name"] for c in progress if c.stage} == set(stages)
    await until(lambda: len(_finals(tail, final.request_id)) >= 1, 30, "the final on the topic")
    tail.catch_up()
    assert len(_finals(tail, final.request_id)) == 1

    # per-stage metrics: one Telemetry (kind "stage") per stage that ran, for the metrics agent
    measured = {
        r["program_id"]: r
        for _, r in tail.records["telemetry"]
        if r and r["kind"] == "stage" and r["request_id"] == final.request_id
    }
    ran_stages = {"retrieve", "classify", "summarize", "billing", "enrich", "final"}
    assert set(measured) == {f"support/{name}" for name in ran_stages}
    assert measured["support/enrich"]["success"] is False
    assert measured["support/classify"]["pool"] == "gpu"
    assert all(r["latency_ms"] > 0 for r in measured.values())


def _finals(tail: Any, request_id: str) -> list[Record]:
    return [
        r
        for _, r in tail.records["responses"]
        if r is not None and r["request_id"] == request_id and r["final"]
    ]


def small_pipeline() -> Record:
    """Four stages: two independent (general, gpu), a map of 3, a final one."""
    stage = records.pipeline_stage
    return records.pipeline_version(
        pipeline_id="support",
        version=1,
        inputs="question, topics: list[str]",
        stages=[
            stage(name="a", signature="question -> x", inputs={"question": "$input.question"}),
            stage(
                name="b",
                signature="question -> y",
                inputs={"question": "$input.question"},
                pool_hint="gpu",
            ),
            stage(
                name="each",
                signature="topic -> summary",
                inputs={"topic": "$item"},
                map_over="$input.topics",
                map_concurrency=2,
            ),
            stage(
                name="final",
                signature="x, y, summaries: list[str] -> answer",
                inputs={"x": "$stage.a.x", "y": "$stage.b.y", "summaries": "$stage.each.summary"},
            ),
        ],
        outputs={"answer": "$stage.final.answer", "summaries": "$stage.each.summary"},
        created_at=now(),
    )


RUNS = 100


async def test_kill_9_of_the_pipeline_agent_mid_run_answers_every_run_once(
    settings: Settings,
    start_stack: StartStack,  # noqa: F811 - the fixture imported above
    tails: OpenTail,
) -> None:
    settings = pipeline_settings(settings, delay_s=0.2)
    stack = start_stack(settings, ["general", "gpu"], pipeline=True)
    tail = tails(["responses", "executions"], settings=settings)
    publish(settings, small_pipeline())
    answered_at: dict[str, float] = {}
    sent = {
        n: {"question": f"q{n} {uuid.uuid4().hex[:6]}", "topics": [f"t{n}.{i}" for i in range(3)]}
        for n in range(RUNS)
    }

    async def one(client: AsyncClient, n: int) -> tuple[int, Result | DSPexError]:
        inputs = sent[n]
        try:
            answer = await client.submit(PipelineRef("support"), inputs, deadline_s=240)
        except DSPexError as exc:
            return n, exc
        answered_at[answer.request_id] = time.monotonic()
        return n, answer

    async with AsyncClient(settings) as client:
        tasks = [asyncio.create_task(one(client, n)) for n in range(RUNS)]
        await until(lambda: len(answered_at) >= 10, 180, "10 runs answered before the kill")
        answered_before = len(answered_at)
        killed_at, killed_ms = time.monotonic(), time.time() * 1000
        stack.kill("pipeline")
        stack.launch("pipeline")
        outcomes = await asyncio.gather(*tasks)
    failures = [(n, r) for n, r in outcomes if not isinstance(r, Result)]
    assert not failures, (failures[:3], stack.log_tails())
    results = {n: r for n, r in outcomes if isinstance(r, Result)}
    for n, result in results.items():
        assert result.status == "ok" and not result.partial
        _check_outputs(result, sent[n])
    assert len({r.request_id for r in results.values()}) == RUNS
    tail.catch_up()
    finals = Counter(r["request_id"] for _, r in tail.records["responses"] if r and r["final"])
    # a final produced after the kill came from the restarted agent
    produced = [
        to_ms(r["produced_at"]) or 0 for _, r in tail.records["responses"] if r and r["final"]
    ]
    first_after_s = (min(p for p in produced if p > killed_ms) - killed_ms) / 1000
    answered_after = sum(t > killed_at for t in answered_at.values())
    log = stack.log_text("pipeline")
    resumed = log.split("pipeline agent ready running_runs=")[-1]
    ready_line = [line for line in log.splitlines() if "pipeline agent ready" in line][-1]
    ready_at = datetime.strptime(ready_line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    run_ids = {r.request_id for r in results.values()}
    executions = Counter(r["request_id"] for _, r in tail.records["executions"] if r)
    repeated = sum(count - 1 for count in executions.values() if count > 1)
    print(
        f"\nruns={RUNS} answered_before_kill={answered_before} answered_after={answered_after} "
        f"answered_at_client={len(results)} runs_resumed_from_state={resumed.split()[0]} "
        f"final_responses_on_topic_for_runs={sum(finals[i] for i in run_ids)} "
        f"stage_executions={sum(executions.values())} repeated_stage_executions={repeated} "
        f"kill_to_restarted_agent_ready_s={ready_at - killed_ms / 1000:.2f} "
        f"kill_to_first_answer_after_restart_s={first_after_s:.2f}"
    )
    assert all(finals[i] >= 1 for i in run_ids)


def _check_outputs(result: Result, inputs: dict[str, Any]) -> None:
    assert result.outputs == {
        "answer": inputs["question"].upper(),
        "summaries": [t.upper() for t in inputs["topics"]],
    }


async def test_bad_runs_get_one_error_naming_the_field(
    settings: Settings,
    start_stack: StartStack,  # noqa: F811 - the fixture imported above
    tails: OpenTail,
) -> None:
    settings = pipeline_settings(settings, delay_s=0.0)
    start_stack(settings, ["general"], pipeline=True)
    tail = tails(["responses", "dlq"], settings=settings)
    publish(settings, support_pipeline())
    stage = records.pipeline_stage
    publish(
        settings,
        records.pipeline_version(
            pipeline_id="count",
            version=1,
            inputs="data: dict",
            stages=[
                # a dict of any values fits `dict[str, int]` until the run's values are known:
                # a run whose value is not an int fails in the stage, which names the field
                stage(
                    name="counting",
                    signature="counts: dict[str, int] -> answer",
                    inputs={"counts": "$input.data"},
                ),
            ],
            outputs={"answer": "$stage.counting.answer"},
            created_at=now(),
        ),
    )
    # produced past the client's check: the router refuses it with every problem named
    publish(
        settings,
        records.pipeline_version(
            pipeline_id="mismatch",
            version=1,
            inputs="text",
            stages=[
                stage(name="first", signature="text -> upper", inputs={"text": "$input.text"}),
                stage(
                    name="counting",
                    signature="n: int -> answer",
                    inputs={"n": "$stage.first.upper"},
                ),
            ],
            outputs={"answer": "$stage.counting.answer"},
            created_at=now(),
        ),
    )
    good = {"question": "q", "topics": ["a"], "kind": "billing"}
    cases: list[tuple[PipelineRef, dict[str, Any], str, str]] = [
        (PipelineRef("nope"), good, "pipeline_id", "validate"),
        (PipelineRef("support", version=7), good, "pipeline_version", "validate"),
        (PipelineRef("support"), {**good, "topics": "not a list"}, "inputs.topics", "validate"),
        (PipelineRef("support"), {"question": "q", "topics": []}, "inputs.kind", "validate"),
        (PipelineRef("support"), {**good, "extra": 1}, "inputs.extra", "validate"),
        (PipelineRef("count"), {"data": {"n": "seven"}}, "inputs.counts", "counting"),
        (PipelineRef("mismatch"), {"text": "seven"}, "stages.counting.inputs.n", "validate"),
    ]
    async with AsyncClient(settings) as client:
        for target, inputs, field, where in cases:
            with pytest.raises(RequestFailed) as caught:
                await client.submit(target, inputs, deadline_s=60)
            error = caught.value
            assert (error.field, error.stage) == (field, where), error
            print(f"\n{target}: {error}")
            await until(partial(_finals, tail, error.request_id), 30, "the run's final")
    tail.catch_up()
    finals = Counter(r["request_id"] for _, r in tail.records["responses"] if r and r["final"])
    assert all(count == 1 for count in finals.values()), finals
    dead = {r["request_id"] for _, r in tail.records["dlq"] if r}
    assert len(dead) >= 6  # every run the router refused is dead-lettered

    # the same from a terminal: a live per-stage view, then the outputs or the error
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": str(settings.kafka.bootstrap_servers),
        "DSPEX_TOPICS__PREFIX": settings.topics.prefix,
        "COLUMNS": "200",
    }
    bad = _dspex(env, "submit", "--pipeline", "count", 'data={"n": "seven"}')
    assert bad.returncode == 1, bad.stderr
    assert "stage=counting field=inputs.counts" in bad.stderr
    publish(
        settings,
        records.pipeline_version(
            pipeline_id="hello",
            version=1,
            inputs="text",
            stages=[stage(name="shout", signature="text -> loud", inputs={"text": "$input.text"})],
            outputs={"loud": "$stage.shout.loud"},
            created_at=now(),
        ),
    )
    shown = _dspex(env, "submit", "--pipeline", "hello", "text=hi there")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == {"loud": "HI THERE"}
    assert "shout" in shown.stderr and "finished" in shown.stderr
    listed = _dspex(env, "pipelines", "runs", "--pipeline", "hello")
    assert listed.returncode == 0, listed.stderr
    assert "hello@1" in listed.stdout and " ok " in listed.stdout, listed.stdout


def _dspex(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "dspex.streams", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
