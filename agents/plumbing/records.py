"""The records of the contract an agent writes, derived from what happened to a request.

Pure functions: a request, what happened to it and a clock reading in, one
Response / Execution / Telemetry / DeadLetter record out, built with the
contract's constructors (:mod:`dspex.schemas.records`). Agents encode them with
the serde and produce them; tests encode them to prove they match the contract.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from dspex.agents.plumbing.messages import Consumed, ErrorInfo, TokenUsage
from dspex.schemas import records
from dspex.schemas.records import Record
from dspex.schemas.times import millis_between, now, now_ms

# Error messages are for people; a clipped message keeps a record small.
_MAX_MESSAGE = 2000
# An original larger than this is not embedded (the dead letter would exceed the
# broker's 1 MB message limit and be lost); its coordinates say where it is.
MAX_EMBEDDED_BYTES = 512 * 1024


TENANT_KEY = "dspex.tenant"
"""Request metadata key carrying the tenant from the router to the worker. The router
owns it: it sets it from the topic a request came from and removes a sender's own."""


def tenant_of_request(request: Mapping[str, Any]) -> str | None:
    """The tenant a routed request belongs to, as the router stamped it; None: shared."""
    tenant = (request.get("metadata") or {}).get(TENANT_KEY)
    return str(tenant) if tenant else None


@dataclass(frozen=True)
class ExecutionResult:
    """What became of one attempt to run a request: outputs or an error, tokens, trace, timings."""

    status: str  # "ok" | "error" | "timeout" | "overloaded"
    received_at: datetime
    started_at: datetime
    finished_at: datetime
    outputs: Mapping[str, Any] = field(default_factory=dict)
    usage: TokenUsage = field(default_factory=TokenUsage)
    trace: Sequence[Mapping[str, Any]] | None = None
    program_version: int | None = None
    error: ErrorInfo | None = None
    variant: str | None = None  # the backend variant that answered, when not the route's
    breaker_state: str | None = None  # its circuit breaker's state; None: no breaker involved
    failed_variants: tuple[tuple[str, str], ...] = ()
    """(variant, error class) of each LM backend that gave up on the request, in order."""

    @property
    def run_ms(self) -> float:
        return millis_between(self.started_at, self.finished_at)


def encode_outputs(outputs: Mapping[str, Any]) -> dict[str, str]:
    """Output values as the contract carries them: JSON text per field."""
    return {name: json.dumps(value, default=str) for name, value in outputs.items()}


def chunk_response(request: Mapping[str, Any], seq: int, delta: str, pool: str) -> Record:
    """A non-final streamed chunk (status "progress") carrying ``delta`` text."""
    return _response(request, pool, None, seq=seq, final=False, status="progress", delta=delta)


def final_response(
    request: Mapping[str, Any],
    result: ExecutionResult,
    seq: int,
    pool: str,
    session: Record | None = None,
) -> Record:
    """The one final chunk: outputs when ``result`` is ok, else its error (and the session turn)."""
    ok = result.status == "ok"
    return _response(
        request,
        pool,
        result.program_version,
        seq=seq,
        final=True,
        status=result.status,
        outputs=encode_outputs(result.outputs) if ok else None,
        error=None if ok or result.error is None else result.error.record(),
        session=session,
    )


def _response(
    request: Mapping[str, Any],
    pool: str,
    version: int | None,
    *,
    seq: int,
    final: bool,
    status: str,
    delta: str = "",
    outputs: Mapping[str, str] | None = None,
    error: Record | None = None,
    session: Record | None = None,
) -> Record:
    return records.response(
        request_id=request["request_id"],
        seq=seq,
        final=final,
        status=status,
        delta=delta,
        outputs=outputs,
        error=error,
        program_id=request.get("program_id"),
        program_version=version if version is not None else request.get("program_version"),
        pool=pool,
        produced_at=now(),
        session=session,
    )


def execution(
    request: Mapping[str, Any],
    result: ExecutionResult,
    *,
    worker_id: str,
    pool: str,
    attempt: int = 1,
) -> Record:
    """The audit record of one attempt to run ``request``."""
    return records.execution(
        request_id=request["request_id"],
        program_id=request.get("program_id"),
        program_version=_version(request, result),
        signature=request.get("signature") or "",
        module_type=_module_type(request),
        inputs=_capped(request.get("inputs") or {}),
        outputs=_capped(encode_outputs(result.outputs)) if result.status == "ok" else {},
        variables=request.get("variables") or {},
        trace_json=None if result.trace is None else _trace(result.trace),
        route=request.get("route") or None,
        timings=_timings(request, result),
        usage=_usage(result.usage),
        error=result.error.record() if result.error else None,
        worker_id=worker_id,
        pool=pool,
        attempt=attempt,
        metadata=request.get("metadata") or {},
        tenant=tenant_of_request(request),
    )


# The audit record must fit the broker's 1 MB message limit whatever the request
# carried: larger values are replaced by a JSON stand-in naming their size and hash.
AUDIT_VALUE_BYTES = 64 * 1024
AUDIT_TRACE_BYTES = 256 * 1024


def omitted(text: str) -> str:
    """The JSON stand-in for a value too large for the audit log."""
    data = text.encode("utf-8", "surrogatepass")
    digest = hashlib.sha256(data).hexdigest()
    return json.dumps({"dspex.omitted": {"bytes": len(data), "sha256": digest}})


def _capped(values: Mapping[str, str]) -> dict[str, str]:
    return {k: v if _size(v) <= AUDIT_VALUE_BYTES else omitted(v) for k, v in values.items()}


def _trace(trace: Sequence[Mapping[str, Any]]) -> str:
    text = json.dumps(list(trace), default=str)
    return text if _size(text) <= AUDIT_TRACE_BYTES else omitted(text)


def _size(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _version(request: Mapping[str, Any], result: ExecutionResult) -> int | None:
    if result.program_version is not None:
        return result.program_version
    version: int | None = request.get("program_version")
    return version


def _module_type(request: Mapping[str, Any]) -> str:
    route = request.get("route") or {}
    return str(request.get("module_type") or route.get("module_type") or "Predict")


def _timings(request: Mapping[str, Any], result: ExecutionResult) -> Record:
    return records.timings(
        received_at=result.received_at,
        started_at=result.started_at,
        finished_at=result.finished_at,
        queue_wait_ms=queue_wait_ms(request, result),
        run_ms=result.run_ms,
    )


def queue_wait_ms(request: Mapping[str, Any], result: ExecutionResult) -> float:
    """Milliseconds from the request's creation to the start of its execution."""
    created: datetime = request["created_at"]
    return millis_between(created, result.started_at)


def _usage(usage: TokenUsage) -> Record:
    tokens = TokenUsage(*usage)
    return records.usage(
        prompt_tokens=tokens.prompt_tokens,
        completion_tokens=tokens.completion_tokens,
        total_tokens=tokens.total_tokens,
    )


def telemetry(
    request: Mapping[str, Any],
    result: ExecutionResult,
    *,
    worker_id: str,
    pool: str,
    in_flight: int = 0,
) -> Record:
    """The "execution" measurement the learning agent learns from.

    ``variant`` is the backend that answered (a fallback when the route's failed);
    ``health`` carries its circuit breaker's state when a breaker was involved.
    """
    route = request.get("route") or {}
    return records.telemetry(
        kind="execution",
        request_id=request["request_id"],
        program_id=request.get("program_id"),
        program_version=_version(request, result),
        pool=pool,
        variant=result.variant or route.get("variant"),
        worker_id=worker_id,
        emitted_at=now(),
        # the contract defines latency end to end: created_at to the final response
        latency_ms=millis_between(request["created_at"], result.finished_at),
        queue_wait_ms=queue_wait_ms(request, result),
        prompt_tokens=result.usage[0],
        completion_tokens=result.usage[1],
        success=result.status == "ok",
        error_class=result.error.error_class if result.error else None,
        health=_health(result, in_flight),
        tenant=tenant_of_request(request),
    )


def failed_attempts(execution: Record, result: ExecutionResult) -> list[Record]:
    """An "attempt" Telemetry per backend that gave up, beside the request's own record.

    The learning agent must see a failing variant fail even when a fallback answered
    (the request's "execution" record credits the fallback), and every variant of a
    request that failed on all of them.
    """
    credited = execution.get("variant")
    return [
        records.telemetry(
            **{
                **execution,
                "kind": "attempt",
                "variant": variant,
                "success": False,
                "error_class": error_class,
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "quality": None,
            }
        )
        for variant, error_class in result.failed_variants
        if variant != credited
    ]


def _health(result: ExecutionResult, in_flight: int) -> Record | None:
    if result.breaker_state is None:
        return None
    return health_sample(in_flight, result.breaker_state)


def health_sample(in_flight: int, breaker_state: str) -> Record:
    """The Avro ``Health`` record: in-flight requests, breaker state, resident memory."""
    return records.health(
        in_flight=in_flight, breaker_state=breaker_state, memory_bytes=recent_rss_bytes()
    )


def health(worker_id: str, pool: str, in_flight: int, breaker_state: str) -> Record:
    """A worker's periodic Telemetry of kind ``health``."""
    return records.telemetry(
        kind="health",
        pool=pool,
        worker_id=worker_id,
        emitted_at=now(),
        health=health_sample(in_flight, breaker_state),
    )


_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


RSS_MAX_AGE_S = 1.0
_rss_sample: list[float] = []  # [monotonic time read, bytes]: at most one reading kept


def recent_rss_bytes(max_age_s: float = RSS_MAX_AGE_S) -> int:
    """:func:`rss_bytes`, read again only when the last reading is older than ``max_age_s``.

    Every Telemetry record carries a Health sample; reading ``/proc`` for each one
    cost a busy worker about 4 % of its time.
    """
    now_s = time.monotonic()
    if not _rss_sample or now_s - _rss_sample[0] >= max_age_s:
        _rss_sample[:] = [now_s, float(rss_bytes())]
    return int(_rss_sample[1])


def rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc``; peak RSS elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    return pages * _PAGE_BYTES


def dead_letter(
    original: Consumed,
    error: ErrorInfo,
    *,
    component: str,
    failed_at_ms: int | None = None,
    request_id: str | None = None,
    attempts: int = 1,
) -> Record:
    """A ``DeadLetter`` record keeping ``original`` byte for byte, for inspection and replay.

    A value over :data:`MAX_EMBEDDED_BYTES` is left out (``original_value_omitted``)
    so the dead letter itself still fits the broker; replay reads it from its
    topic by coordinates.
    """
    value = original.value
    omitted = value is not None and len(value) > MAX_EMBEDDED_BYTES
    return records.dead_letter(
        original_topic=original.topic,
        original_partition=original.partition,
        original_offset=original.offset,
        original_timestamp=original.timestamp_ms,
        original_key=original.key,
        original_value=None if omitted else value,
        original_headers=[records.kafka_header(key=k, value=v) for k, v in original.headers],
        original_value_bytes=-1 if value is None else len(value),
        original_value_omitted=omitted,
        error_class=error.error_class,
        error_message=_clip(_message(error)),
        stage=error.stage or "execute",
        attempts=attempts,
        failed_at=now_ms() if failed_at_ms is None else failed_at_ms,
        request_id=request_id,
        component=component,
    )


def error_response(
    request_id: str,
    error: ErrorInfo,
    *,
    produced_at_ms: int,
    program: Mapping[str, Any] | None = None,
) -> Record:
    """The one final ``Response`` chunk that tells a waiting client why its request failed."""
    program = program or {}
    return records.response(
        request_id=request_id,
        final=True,
        status=error.status,
        error=replace(error, message=_clip(_message(error))).record(),
        program_id=program.get("program_id"),
        program_version=program.get("program_version"),
        produced_at=produced_at_ms,
    )


def _message(error: ErrorInfo) -> str:
    if error.field and error.field not in error.message:
        return f"{error.field}: {error.message}"
    return error.message


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE else f"{text[: _MAX_MESSAGE - 3]}..."
