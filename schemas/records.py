"""The one place the contract's records are built: a typed constructor per record schema.

Every top-level record (``Request``, ``Response``, ``Execution``, ...) and every
nested record that several places build (``Route``, ``ErrorInfo``, ``Health``,
...) has a function here named after it in snake case. Its keyword-only
arguments are the schema's fields, with the schema's defaults; it returns the
plain dict the serde encodes. Nothing else in DSPex writes these dicts by hand
(``tests/unit/test_records.py`` pins each signature to its ``.avsc`` and looks
for hand-written records elsewhere).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from types import MappingProxyType
from typing import Any

from dspex.schemas.times import millis

Record = dict[str, Any]
"""A record of the contract as the serde takes and gives it: field name to value."""
Timestamp = datetime | int
"""A ``timestamp-millis`` field: an aware ``datetime`` or UTC epoch milliseconds."""

_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _record(fields: dict[str, Any]) -> Record:
    """The record of a constructor's arguments (its ``locals()``, taken before anything else).

    The arguments *are* the fields, so keys cannot drift from the signature. A
    ``datetime`` is truncated to the millisecond (all ``timestamp-millis`` keeps,
    so a record equals its own round trip); maps and arrays are copied, so a
    record never shares a container with its caller.
    """
    return {name: _value(value) for name, value in fields.items()}


def _value(value: Any) -> Any:
    if isinstance(value, datetime):
        return millis(value)
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, list | tuple):
        return list(value)
    return value


# -- Request, and the Route the router adds to it ---------------------------------------------


def request(
    *,
    request_id: str,
    created_at: Timestamp,
    deadline_at: Timestamp | None = None,
    session_id: str | None = None,
    program_id: str | None = None,
    program_version: int | None = None,
    signature: str | None = None,
    module_type: str | None = None,
    module_config_json: str | None = None,
    state_json: str | None = None,
    inputs: Mapping[str, str] = _EMPTY,
    variables: Mapping[str, str] = _EMPTY,
    pool_hint: str | None = None,
    stream: bool = False,
    cache: bool = True,
    reply_topic: str | None = None,
    tools: Sequence[str] = (),
    metadata: Mapping[str, str] = _EMPTY,
    pipeline_id: str | None = None,
    pipeline_version: int | None = None,
    adapter: str | None = None,
    route: Mapping[str, Any] | None = None,
) -> Record:
    """A ``Request``: one program run asked for (``route`` set once the router forwards it)."""
    return _record(locals())


def route(
    *,
    pool: str,
    variant: str = "default",
    model: str | None = None,
    module_type: str | None = None,
    routing_table_version: int | None = None,
    decided_at: Timestamp,
    cache_key: str | None = None,
    reason: str = "",
) -> Record:
    """A ``Route``: the router's decision for one request."""
    return _record(locals())


# -- Response, and the ErrorInfo it shares with Execution ---------------------------------------


def response(
    *,
    request_id: str,
    seq: int = 0,
    final: bool = True,
    status: str = "ok",
    delta: str = "",
    outputs: Mapping[str, str] | None = None,
    error: Mapping[str, Any] | None = None,
    cached: bool = False,
    program_id: str | None = None,
    program_version: int | None = None,
    pool: str | None = None,
    produced_at: Timestamp,
    stage: Mapping[str, Any] | None = None,
    partial: bool = False,
    stages: Sequence[Mapping[str, Any]] = (),
    session: Mapping[str, Any] | None = None,
) -> Record:
    """A ``Response`` chunk: streamed text, or the final outputs or error."""
    return _record(locals())


def stage_status(
    *,
    name: str,
    item: int | None = None,
    state: str,
    pool: str | None = None,
    started_at: Timestamp | None = None,
    finished_at: Timestamp | None = None,
    items: int = 0,
    error: str | None = None,
) -> Record:
    """A ``StageStatus``: one pipeline stage's (or map item's) state on a Response."""
    return _record(locals())


def session_turn(
    *, session_id: str, turn: int, fresh: bool = False, expired: bool = False
) -> Record:
    """A ``SessionTurn``: where a session request's answer sits in its session."""
    return _record(locals())


def error_info(
    *,
    error_class: str,
    message: str,
    field: str | None = None,
    stage: str | None = None,
    retryable: bool = False,
) -> Record:
    """An ``ErrorInfo``: why a request failed."""
    return _record(locals())


# -- Execution, with its Timings and Usage ------------------------------------------------------


def execution(
    *,
    request_id: str,
    program_id: str | None = None,
    program_version: int | None = None,
    signature: str,
    module_type: str,
    inputs: Mapping[str, str] = _EMPTY,
    outputs: Mapping[str, str] = _EMPTY,
    variables: Mapping[str, str] = _EMPTY,
    trace_json: str | None = None,
    route: Mapping[str, Any] | None = None,
    timings: Mapping[str, Any],
    usage: Mapping[str, Any],
    cost_usd: float | None = None,
    error: Mapping[str, Any] | None = None,
    worker_id: str,
    pool: str,
    attempt: int = 1,
    metadata: Mapping[str, str] = _EMPTY,
    tenant: str | None = None,
) -> Record:
    """An ``Execution``: the audit record of one attempt to run a program."""
    return _record(locals())


def timings(
    *,
    received_at: Timestamp,
    started_at: Timestamp,
    finished_at: Timestamp,
    queue_wait_ms: float = 0.0,
    run_ms: float = 0.0,
) -> Record:
    """``Timings``: when an execution was received, started and finished."""
    return _record(locals())


def usage(*, prompt_tokens: int = 0, completion_tokens: int = 0, total_tokens: int = 0) -> Record:
    """``Usage``: LM tokens of one execution."""
    return _record(locals())


# -- Telemetry, with a worker's Health ----------------------------------------------------------


def telemetry(
    *,
    kind: str,
    request_id: str | None = None,
    program_id: str | None = None,
    program_version: int | None = None,
    pool: str | None = None,
    variant: str | None = None,
    worker_id: str | None = None,
    emitted_at: Timestamp,
    latency_ms: float | None = None,
    queue_wait_ms: float | None = None,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    cost_usd: float | None = None,
    success: bool | None = None,
    error_class: str | None = None,
    cache_hit: bool = False,
    quality: float | None = None,
    health: Mapping[str, Any] | None = None,
    tenant: str | None = None,
) -> Record:
    """A ``Telemetry`` measurement (kind ``execution``, ``health``, ``feedback``, ...)."""
    return _record(locals())


def health(*, in_flight: int = 0, breaker_state: str = "closed", memory_bytes: int = 0) -> Record:
    """A ``Health`` sample of one worker."""
    return _record(locals())


# -- DeadLetter, with the original's KafkaHeaders ----------------------------------------------


def dead_letter(
    *,
    original_topic: str,
    original_partition: int,
    original_offset: int,
    original_timestamp: Timestamp | None = None,
    original_key: bytes | None = None,
    original_value: bytes | None = None,
    original_headers: Sequence[Mapping[str, Any]] = (),
    original_value_bytes: int = -1,
    original_value_omitted: bool = False,
    error_class: str,
    error_message: str,
    stage: str,
    attempts: int = 1,
    failed_at: Timestamp,
    request_id: str | None = None,
    component: str,
) -> Record:
    """A ``DeadLetter``: a record that could not be processed, kept byte for byte."""
    return _record(locals())


def kafka_header(*, key: str, value: bytes | None = None) -> Record:
    """A ``KafkaHeader`` of a dead letter's original record."""
    return _record(locals())


# -- Programs and variables ---------------------------------------------------------------------


def program_version(
    *,
    program_id: str,
    version: int,
    signature: str,
    module_type: str,
    module_config_json: str = "{}",
    state_json: str = "{}",
    tools: Sequence[str] = (),
    adapter: str | None = None,
    metric: str | None = None,
    score: float | None = None,
    description: str = "",
    parent_version: int | None = None,
    created_at: Timestamp,
    created_by: str = "",
) -> Record:
    """A ``ProgramVersion``: one published version of a registered program."""
    return _record(locals())


def variable_update(
    *,
    name: str,
    var_type: str,
    value_json: str,
    constraints_json: str = "{}",
    scope: str = "global",
    scope_ref: str | None = None,
    version: int,
    previous_value_json: str | None = None,
    updated_at: Timestamp,
    updated_by: str = "",
    source: str = "person",
    reason: str = "",
    observers: Sequence[str] = (),
) -> Record:
    """A ``VariableUpdate``: a new value for one shared variable."""
    return _record(locals())


def pipeline_version(
    *,
    pipeline_id: str,
    version: int,
    inputs: str,
    stages: Sequence[Mapping[str, Any]],
    outputs: Mapping[str, str],
    description: str = "",
    created_at: Timestamp,
    created_by: str = "",
) -> Record:
    """A ``PipelineVersion``: one published version of a pipeline (a DAG of programs)."""
    return _record(locals())


def pipeline_run(
    *,
    run_id: str,
    pipeline_id: str,
    pipeline_version: int,
    status: str,
    partial: bool = False,
    created_at: Timestamp,
    updated_at: Timestamp,
    deadline_at: Timestamp | None = None,
    reply_topic: str | None = None,
    stream: bool = False,
    events: Sequence[Mapping[str, Any]] = (),
    delivered: int = 0,
    results: Mapping[str, str] = _EMPTY,
    issued: Sequence[str] = (),
    outputs: Mapping[str, str] | None = None,
    error: Mapping[str, Any] | None = None,
) -> Record:
    """A ``PipelineRun``: the pipeline agent's state of one run."""
    return _record(locals())


def pipeline_stage(
    *,
    name: str,
    program_id: str | None = None,
    program_version: int | None = None,
    signature: str | None = None,
    module_type: str | None = None,
    inputs: Mapping[str, str] = _EMPTY,
    map_over: str | None = None,
    map_concurrency: int = 4,
    when: Mapping[str, Any] | None = None,
    optional: bool = False,
    defaults: Mapping[str, str] = _EMPTY,
    pool_hint: str | None = None,
) -> Record:
    """A ``PipelineStage``: one stage of a pipeline version."""
    return _record(locals())


def stage_condition(*, ref: str, values: Sequence[str]) -> Record:
    """A ``StageCondition``: run a stage only when ``ref`` equals one of ``values``."""
    return _record(locals())


# -- Sessions -----------------------------------------------------------------------------------


def session_state(
    *,
    session_id: str,
    version: int,
    created_at: Timestamp,
    updated_at: Timestamp,
    ttl_ms: int,
    expires_at: Timestamp,
    turns: Sequence[Mapping[str, Any]] = (),
    variables: Mapping[str, str] = _EMPTY,
    pinned: Mapping[str, str] = _EMPTY,
    counters: Mapping[str, Any],
    restarted: bool = False,
    writer: str = "",
) -> Record:
    """A ``SessionState``: one session's history, variables, pins, counters and TTL."""
    return _record(locals())


def history_turn(
    *,
    request_id: str,
    turn: int,
    program_id: str | None = None,
    pipeline_id: str | None = None,
    signature: str | None = None,
    inputs: Mapping[str, str] = _EMPTY,
    outputs: Mapping[str, str] = _EMPTY,
    variant: str | None = None,
    at: Timestamp,
) -> Record:
    """A ``HistoryTurn``: one answered turn kept in a session's history."""
    return _record(locals())


def session_counters(
    *,
    turns: int = 0,
    dropped_turns: int = 0,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    cost_usd: float = 0.0,
    latency_ms: float = 0.0,
) -> Record:
    """``SessionCounters``: totals over every turn of a session."""
    return _record(locals())


# -- RoutingTable, with its Variants and VariantStats -------------------------------------------


def routing_table(
    *,
    program_id: str,
    version: int,
    created_at: Timestamp,
    objective: str = "balanced",
    reason: str = "",
    variants: Sequence[Mapping[str, Any]] = (),
    fallback: Sequence[str] = (),
    learned_from: Sequence[Mapping[str, Any]] = (),
    pool_hints: Mapping[str, int] = _EMPTY,
) -> Record:
    """A ``RoutingTable``: how the router splits one program's traffic between variants."""
    return _record(locals())


def variant(
    *,
    name: str,
    model: str | None = None,
    module_type: str | None = None,
    pool: str = "general",
    weight: float = 1.0,
    variables: Mapping[str, str] = _EMPTY,
    program_version: int | None = None,
) -> Record:
    """A ``Variant`` of a routing table."""
    return _record(locals())


def variant_stats(
    *,
    variant: str,
    count: float = 0.0,
    successes: float = 0.0,
    mean_latency_ms: float = 0.0,
    p95_latency_ms: float | None = None,
    mean_quality: float | None = None,
    mean_cost_usd: float | None = None,
) -> Record:
    """``VariantStats``: what a routing table's weights were learned from, for one variant."""
    return _record(locals())


# -- Metrics and optimizer jobs -----------------------------------------------------------------


def metric_snapshot(
    *,
    name: str,
    window_start: Timestamp,
    window_end: Timestamp,
    labels: Mapping[str, str] = _EMPTY,
    count: int = 0,
    rate_per_s: float = 0.0,
    latency_p50_ms: float | None = None,
    latency_p95_ms: float | None = None,
    latency_p99_ms: float | None = None,
    error_rate: float = 0.0,
    tokens: int = 0,
    cost_usd: float = 0.0,
    value: float | None = None,
) -> Record:
    """A ``MetricSnapshot``: one series over one closed window."""
    return _record(locals())


def optimization_job(
    *,
    job_id: str,
    created_at: Timestamp,
    program_id: str,
    program_version: int | None = None,
    optimizer: str | None = None,
    optimizer_config_json: str = "{}",
    dataset_json: str | None = None,
    dataset_topic: str | None = None,
    val_fraction: float = 0.5,
    metric: str,
    search_json: str = "{}",
    reply_topic: str | None = None,
    requested_by: str = "",
    canary_weight: float | None = None,
) -> Record:
    """An ``OptimizationJob``: compile a program with an optimizer on a dataset."""
    return _record(locals())


def job_checkpoint(
    *,
    job_id: str,
    fingerprint: str,
    phase: str,
    state_json: str,
    written_at: Timestamp,
    written_by: str = "",
) -> Record:
    """A ``JobCheckpoint``: how far a running optimizer job has got."""
    return _record(locals())


def job_control(
    *,
    job_id: str,
    action: str,
    requested_at: Timestamp,
    requested_by: str = "",
    reason: str = "",
) -> Record:
    """A ``JobControl``: a request (``cancel``) for a running or queued job."""
    return _record(locals())
