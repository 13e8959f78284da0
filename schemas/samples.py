"""Realistic example records, one builder per schema, made with :mod:`dspex.schemas.records`.

:func:`sample` returns a fresh record (new UUIDs, current timestamps) shaped the
way fastavro decodes it: timestamps as timezone-aware UTC ``datetime`` rounded
to the millisecond, so ``decode(encode(sample(name))) == sample(name)``. Used by
integration tests and the CLI's self-check.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from dspex.schemas import records, times
from dspex.schemas.errors import UnknownSchema
from dspex.schemas.records import Record

__all__ = ["sample"]

_PROGRAM = "support.answer"
_SIGNATURE = "question, context -> answer, confidence: float"


def sample(name: str) -> Record:
    """A valid, realistic ``name`` record with fresh ids and timestamps."""
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise UnknownSchema(name, _BUILDERS) from None
    return builder()


def _j(value: Any) -> str:
    return json.dumps(value)


def _route(now: datetime) -> Record:
    return records.route(
        pool="general",
        variant="cot-mini",
        model="openai/gpt-4o-mini",
        module_type="ChainOfThought",
        routing_table_version=12,
        decided_at=now,
        cache_key="sha256:" + uuid.uuid4().hex,
        reason="table",
    )


def _inputs() -> dict[str, str]:
    return {
        "question": _j("What is the capital of France?"),
        "context": _j("France is a country in Western Europe. Its capital is Paris."),
    }


def _outputs() -> dict[str, str]:
    return {"answer": _j("Paris"), "confidence": _j(0.97)}


def _request() -> Record:
    now = times.now()
    return records.request(
        request_id=str(uuid.uuid4()),
        created_at=now,
        deadline_at=now + timedelta(seconds=30),
        session_id="session-" + uuid.uuid4().hex[:8],
        program_id=_PROGRAM,
        program_version=None,
        signature=None,
        module_type=None,
        module_config_json=None,
        state_json=None,
        inputs=_inputs(),
        variables={"temperature": _j(0.2)},
        pool_hint=None,
        stream=True,
        cache=True,
        reply_topic=None,
        tools=[],
        metadata={"tenant": "acme", "trace_id": uuid.uuid4().hex},
        route=_route(now),
    )


def _response() -> Record:
    return records.response(
        request_id=str(uuid.uuid4()),
        seq=3,
        final=True,
        status="ok",
        delta="",
        outputs=_outputs(),
        error=None,
        cached=False,
        program_id=_PROGRAM,
        program_version=4,
        pool="general",
        produced_at=times.now(),
        partial=True,
        stages=[
            records.stage_status(
                name="retrieve",
                state="finished",
                pool="general",
                started_at=times.now() - timedelta(milliseconds=900),
                finished_at=times.now() - timedelta(milliseconds=500),
            ),
            records.stage_status(name="enrich", state="defaulted", error="ProgramError: boom"),
        ],
        session=records.session_turn(session_id="user-42", turn=3),
    )


def _pipeline_version() -> Record:
    return records.pipeline_version(
        pipeline_id="support",
        version=2,
        inputs="question, topics: list[str]",
        stages=[
            records.pipeline_stage(
                name="retrieve", program_id="search", inputs={"query": "$input.question"}
            ),
            records.pipeline_stage(
                name="summarize",
                signature="topic -> summary",
                inputs={"topic": "$item"},
                map_over="$input.topics",
                map_concurrency=4,
                when=records.stage_condition(ref="$stage.retrieve.found", values=[_j(True)]),
                optional=True,
                defaults={"summary": _j("")},
                pool_hint="general",
            ),
        ],
        outputs={"passages": "$stage.retrieve.passages", "summaries": "$stage.summarize.summary"},
        description="retrieve, then summarize each topic",
        created_at=times.now(),
        created_by="alice",
    )


def _pipeline_run() -> Record:
    started = times.now() - timedelta(milliseconds=900)
    return records.pipeline_run(
        run_id=str(uuid.uuid4()),
        pipeline_id="support",
        pipeline_version=2,
        status="running",
        created_at=started,
        updated_at=times.now(),
        deadline_at=started + timedelta(seconds=30),
        stream=True,
        events=[
            records.stage_status(name="retrieve", state="started", started_at=started),
            records.stage_status(
                name="retrieve",
                state="finished",
                pool="general",
                started_at=started,
                finished_at=times.now(),
            ),
        ],
        delivered=1,
        results={"retrieve": _j({"passages": ["Paris is the capital of France."]})},
        issued=["retrieve"],
    )


def _execution() -> Record:
    now = times.now()
    received = now - timedelta(milliseconds=1450)
    started = received + timedelta(milliseconds=12)
    trace = [{"predictor": "answer", "inputs": {"question": "..."}, "outputs": {"answer": "Paris"}}]
    return records.execution(
        request_id=str(uuid.uuid4()),
        program_id=_PROGRAM,
        program_version=4,
        signature=_SIGNATURE,
        module_type="ChainOfThought",
        inputs=_inputs(),
        outputs=_outputs(),
        variables={"temperature": _j(0.2)},
        trace_json=_j(trace),
        route=_route(received - timedelta(milliseconds=30)),
        timings=records.timings(
            received_at=received,
            started_at=started,
            finished_at=now,
            queue_wait_ms=42.0,
            run_ms=1438.0,
        ),
        usage=records.usage(prompt_tokens=412, completion_tokens=58, total_tokens=470),
        cost_usd=0.000097,
        error=None,
        worker_id="worker-general-7f3c:1234",
        pool="general",
        attempt=1,
        metadata={"tenant": "acme"},
    )


def _program_version() -> Record:
    state = {"answer": {"demos": [], "signature": {"instructions": "Answer from the context."}}}
    return records.program_version(
        program_id=_PROGRAM,
        version=4,
        signature=_SIGNATURE,
        module_type="ChainOfThought",
        module_config_json="{}",
        state_json=_j(state),
        tools=[],
        adapter="JSONAdapter",
        metric="answer_exact_match",
        score=0.86,
        description="MIPROv2 instructions, 4 bootstrapped demos",
        parent_version=3,
        created_at=times.now(),
        created_by="optimizer-job-" + uuid.uuid4().hex[:8],
    )


def _variable_update() -> Record:
    return records.variable_update(
        name="temperature",
        var_type="float",
        value_json=_j(0.2),
        constraints_json=_j({"min": 0.0, "max": 2.0}),
        scope="program",
        scope_ref=_PROGRAM,
        version=7,
        previous_value_json=_j(0.7),
        updated_at=times.now(),
        updated_by="learning-agent-1",
        source="learning-agent",
        reason="lower temperature: +4% exact match over 900 executions",
        observers=[_PROGRAM],
    )


def _telemetry() -> Record:
    return records.telemetry(
        kind="execution",
        request_id=str(uuid.uuid4()),
        program_id=_PROGRAM,
        program_version=4,
        pool="general",
        variant="cot-mini",
        worker_id="worker-general-7f3c:1234",
        emitted_at=times.now(),
        latency_ms=1512.5,
        queue_wait_ms=42.0,
        prompt_tokens=412,
        completion_tokens=58,
        cost_usd=0.000097,
        success=True,
        error_class=None,
        cache_hit=False,
        quality=1.0,
        health=None,
    )


def _routing_table() -> Record:
    mini = _variant("cot-mini", "openai/gpt-4o-mini", "ChainOfThought", 0.8)
    big = _variant("predict-4o", "openai/gpt-4o", "Predict", 0.2)
    return records.routing_table(
        program_id=_PROGRAM,
        version=12,
        created_at=times.now(),
        objective="balanced",
        reason="cot-mini: +3% success, -40% p95 latency over 1,200 executions",
        variants=[mini, big],
        fallback=["predict-4o"],
        learned_from=[_stats("cot-mini", 0.95, 1.0e-4), _stats("predict-4o", 0.93, 2.5e-3)],
        pool_hints={"general": 6},
    )


def _variant(name: str, model: str, module: str, weight: float) -> Record:
    return records.variant(
        name=name,
        model=model,
        module_type=module,
        pool="general",
        weight=weight,
        variables={"temperature": _j(0.2)},
        program_version=None,
    )


def _stats(variant: str, success: float, cost: float) -> Record:
    return records.variant_stats(
        variant=variant,
        count=1187.5,
        successes=1187.5 * success,
        mean_latency_ms=1380.0,
        p95_latency_ms=2900.0,
        mean_quality=success,
        mean_cost_usd=cost,
    )


def _metric_snapshot() -> Record:
    end = times.now().replace(second=0, microsecond=0)
    return records.metric_snapshot(
        name="program.latency",
        window_start=end - timedelta(minutes=1),
        window_end=end,
        labels={"program_id": _PROGRAM, "pool": "general"},
        count=240,
        rate_per_s=4.0,
        latency_p50_ms=1210.0,
        latency_p95_ms=2870.0,
        latency_p99_ms=4100.0,
        error_rate=0.0125,
        tokens=112_800,
        cost_usd=0.0233,
        value=None,
    )


def _dead_letter() -> Record:
    return records.dead_letter(
        original_topic="dspex.requests",
        original_partition=3,
        original_offset=18_442,
        original_timestamp=times.now() - timedelta(seconds=2),
        original_key=b"session-3f2a",
        original_value=b"\xc3\x01not-an-avro-record",
        original_value_bytes=20,
        original_value_omitted=False,
        original_headers=[records.kafka_header(key="traceparent", value=b"00-4bf92f35-01")],
        error_class="CorruptRecord",
        error_message="topic=dspex.requests partition=3 offset=18442: unknown fingerprint",
        stage="decode",
        attempts=1,
        failed_at=times.now(),
        request_id=None,
        component="router",
    )


def _optimization_job() -> Record:
    examples = [
        {"question": "What is the capital of France?", "context": "...", "answer": "Paris"},
        {"question": "What is 2 + 2?", "context": "", "answer": "4"},
    ]
    return records.optimization_job(
        job_id=str(uuid.uuid4()),
        created_at=times.now(),
        program_id=_PROGRAM,
        program_version=3,
        optimizer="BootstrapFewShot",
        optimizer_config_json=_j({"max_bootstrapped_demos": 4, "max_labeled_demos": 4}),
        dataset_json=_j(examples),
        dataset_topic=None,
        val_fraction=0.5,
        metric="exact_match",
        search_json=_j({"temperature": {"min": 0, "max": 1, "steps": 3}}),
        reply_topic=None,
        requested_by="alice",
        canary_weight=0.1,
    )


def _job_checkpoint() -> Record:
    return records.job_checkpoint(
        job_id=str(uuid.uuid4()),
        fingerprint="3f2a9c0d1e4b5a6f",
        phase="search",
        state_json=_j({"baseline": {"score": 0.5, "answered": 8, "failed": 0}, "trials": []}),
        written_at=times.now(),
        written_by="jobs-host-1a2b:4242",
    )


def _job_control() -> Record:
    return records.job_control(
        job_id=str(uuid.uuid4()),
        action="cancel",
        requested_at=times.now(),
        requested_by="alice",
        reason="wrong dataset",
    )


def _session_state() -> Record:
    first = times.now() - timedelta(minutes=3)
    turn = records.history_turn(
        request_id=str(uuid.uuid4()),
        turn=1,
        program_id="support.chat",
        signature="question, history: History -> answer",
        inputs={"question": _j("Where is my order?")},
        outputs={"answer": _j("It left the warehouse this morning.")},
        variant="cot-mini",
        at=first,
    )
    return records.session_state(
        session_id="user-42",
        version=1,
        created_at=first,
        updated_at=first,
        ttl_ms=3_600_000,
        expires_at=first + timedelta(hours=1),
        turns=[turn],
        variables={"temperature": _j(0.2)},
        pinned={"support.chat": "cot-mini"},
        counters=records.session_counters(
            turns=1, prompt_tokens=120, completion_tokens=14, cost_usd=0.0001, latency_ms=812.5
        ),
        writer="worker-general-host-1a2b:4242",
    )


_BUILDERS: dict[str, Callable[[], Record]] = {
    "DeadLetter": _dead_letter,
    "Execution": _execution,
    "JobCheckpoint": _job_checkpoint,
    "JobControl": _job_control,
    "MetricSnapshot": _metric_snapshot,
    "OptimizationJob": _optimization_job,
    "PipelineRun": _pipeline_run,
    "PipelineVersion": _pipeline_version,
    "ProgramVersion": _program_version,
    "Request": _request,
    "Response": _response,
    "RoutingTable": _routing_table,
    "SessionState": _session_state,
    "Telemetry": _telemetry,
    "VariableUpdate": _variable_update,
}
