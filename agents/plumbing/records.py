"""The records a pool worker writes, built as plain dicts shaped by ``schemas/*.avsc``.

Pure functions: a request, what happened to it and a clock reading in, one
Response / Execution / Telemetry / DeadLetter record out. The worker encodes
them with the serde and produces them; tests encode them to prove they match
the contract.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from dspex.agents.plumbing import deadletter

if TYPE_CHECKING:
    from confluent_kafka import Message

Record = dict[str, Any]


def now() -> datetime:
    """The current UTC time at millisecond precision (what timestamp-millis keeps)."""
    moment = datetime.now(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def millis_between(start: datetime, end: datetime) -> float:
    """Milliseconds from ``start`` to ``end`` (never negative: clocks of two hosts drift)."""
    return max(0.0, (end - start).total_seconds() * 1000.0)


@dataclass(frozen=True)
class ErrorInfo:
    """Why a request failed, as the ``ErrorInfo`` record carries it."""

    error_class: str
    message: str
    field: str | None = None
    stage: str | None = None
    retryable: bool = False

    def record(self) -> Record:
        return {
            "error_class": self.error_class,
            "message": self.message,
            "field": self.field,
            "stage": self.stage,
            "retryable": self.retryable,
        }


@dataclass(frozen=True)
class Result:
    """What became of one request: outputs or an error, tokens, trace and timings."""

    status: str  # "ok" | "error" | "timeout"
    received_at: datetime
    started_at: datetime
    finished_at: datetime
    outputs: Mapping[str, Any] = field(default_factory=dict)
    usage: tuple[int, int, int] = (0, 0, 0)
    trace: Sequence[Mapping[str, Any]] | None = None
    program_version: int | None = None
    error: ErrorInfo | None = None
    variant: str | None = None  # the backend variant that answered, when not the route's
    breaker_state: str | None = None  # its circuit breaker's state; None: no breaker involved

    @property
    def run_ms(self) -> float:
        return millis_between(self.started_at, self.finished_at)


@dataclass(frozen=True)
class Origin:
    """Where a consumed message came from: enough to dead-letter it byte for byte."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes | None]] = ()
    timestamp_ms: int | None = None

    def describe(self) -> str:
        return f"topic={self.topic} partition={self.partition} offset={self.offset}"

    @classmethod
    def from_message(cls, message: Message) -> Origin:
        """The origin of a consumed confluent-kafka message."""
        _, timestamp = message.timestamp()
        return cls(
            topic=message.topic() or "",
            partition=_int(message.partition()),
            offset=_int(message.offset()),
            key=message.key(),
            value=message.value(),
            headers=tuple(_headers(message)),
            timestamp_ms=timestamp if timestamp > 0 else None,
        )


def _int(value: int | None) -> int:
    return -1 if value is None else value


def _headers(message: Message) -> Iterator[tuple[str, bytes | None]]:
    # a consumed message's headers are a list of (key, value) pairs; the stubs allow more
    pairs = cast("list[tuple[str, str | bytes | None]]", message.headers() or [])
    for key, value in pairs:
        yield key, value.encode() if isinstance(value, str) else value


def encode_outputs(outputs: Mapping[str, Any]) -> dict[str, str]:
    """Output values as the contract carries them: JSON text per field."""
    return {name: json.dumps(value, default=str) for name, value in outputs.items()}


def chunk_response(request: Mapping[str, Any], seq: int, delta: str, pool: str) -> Record:
    """A non-final streamed chunk (status "progress") carrying ``delta`` text."""
    return {
        **_response_head(request, pool, None),
        "seq": seq,
        "final": False,
        "status": "progress",
        "delta": delta,
        "outputs": None,
        "error": None,
    }


def final_response(request: Mapping[str, Any], result: Result, seq: int, pool: str) -> Record:
    """The one final chunk: outputs when ``result`` is ok, else its error."""
    ok = result.status == "ok"
    return {
        **_response_head(request, pool, result.program_version),
        "seq": seq,
        "final": True,
        "status": result.status,
        "delta": "",
        "outputs": encode_outputs(result.outputs) if ok else None,
        "error": None if ok or result.error is None else result.error.record(),
    }


def _response_head(request: Mapping[str, Any], pool: str, version: int | None) -> Record:
    return {
        "request_id": request["request_id"],
        "cached": False,
        "program_id": request.get("program_id"),
        "program_version": version if version is not None else request.get("program_version"),
        "pool": pool,
        "produced_at": now(),
    }


def execution(
    request: Mapping[str, Any], result: Result, *, worker_id: str, pool: str, attempt: int = 1
) -> Record:
    """The audit record of one attempt to run ``request``."""
    route = request.get("route")
    return {
        "request_id": request["request_id"],
        "program_id": request.get("program_id"),
        "program_version": _version(request, result),
        "signature": request.get("signature") or "",
        "module_type": _module_type(request),
        "inputs": _capped(request.get("inputs") or {}),
        "outputs": _capped(encode_outputs(result.outputs)) if result.status == "ok" else {},
        "variables": dict(request.get("variables") or {}),
        "trace_json": None if result.trace is None else _trace(result.trace),
        "route": dict(route) if route else None,
        "timings": _timings(request, result),
        "usage": _usage(result.usage),
        "cost_usd": None,
        "error": result.error.record() if result.error else None,
        "worker_id": worker_id,
        "pool": pool,
        "attempt": attempt,
        "metadata": dict(request.get("metadata") or {}),
    }


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


def _version(request: Mapping[str, Any], result: Result) -> int | None:
    if result.program_version is not None:
        return result.program_version
    version: int | None = request.get("program_version")
    return version


def _module_type(request: Mapping[str, Any]) -> str:
    route = request.get("route") or {}
    return str(request.get("module_type") or route.get("module_type") or "Predict")


def _timings(request: Mapping[str, Any], result: Result) -> Record:
    return {
        "received_at": result.received_at,
        "started_at": result.started_at,
        "finished_at": result.finished_at,
        "queue_wait_ms": queue_wait_ms(request, result),
        "run_ms": result.run_ms,
    }


def queue_wait_ms(request: Mapping[str, Any], result: Result) -> float:
    """Milliseconds from the request's creation to the start of its execution."""
    created: datetime = request["created_at"]
    return millis_between(created, result.started_at)


def _usage(usage: tuple[int, int, int]) -> Record:
    prompt, completion, total = usage
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}


def telemetry(
    request: Mapping[str, Any],
    result: Result,
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
    return {
        "kind": "execution",
        "request_id": request["request_id"],
        "program_id": request.get("program_id"),
        "program_version": _version(request, result),
        "pool": pool,
        "variant": result.variant or route.get("variant"),
        "worker_id": worker_id,
        "emitted_at": now(),
        # the contract defines latency end to end: created_at to the final response
        "latency_ms": millis_between(request["created_at"], result.finished_at),
        "queue_wait_ms": queue_wait_ms(request, result),
        "prompt_tokens": result.usage[0],
        "completion_tokens": result.usage[1],
        "cost_usd": None,
        "success": result.status == "ok",
        "error_class": result.error.error_class if result.error else None,
        "cache_hit": False,
        "quality": None,
        "health": _health(result, in_flight),
    }


def _health(result: Result, in_flight: int) -> Record | None:
    if result.breaker_state is None:
        return None
    return health_sample(in_flight, result.breaker_state)


def health_sample(in_flight: int, breaker_state: str) -> Record:
    """The Avro ``Health`` record: in-flight requests, breaker state, resident memory."""
    return {
        "in_flight": in_flight,
        "breaker_state": breaker_state,
        "memory_bytes": recent_rss_bytes(),
    }


def health(worker_id: str, pool: str, in_flight: int, breaker_state: str) -> Record:
    """A worker's periodic Telemetry of kind ``health``."""
    return {
        "kind": "health",
        "request_id": None,
        "program_id": None,
        "program_version": None,
        "pool": pool,
        "variant": None,
        "worker_id": worker_id,
        "emitted_at": now(),
        "latency_ms": None,
        "queue_wait_ms": None,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "cost_usd": None,
        "success": None,
        "error_class": None,
        "cache_hit": False,
        "quality": None,
        "health": health_sample(in_flight, breaker_state),
    }


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
    origin: Origin,
    error: ErrorInfo,
    *,
    component: str,
    request_id: str | None = None,
    attempts: int = 1,
) -> Record:
    """A DeadLetter keeping the original message's exact bytes, for inspection and replay."""
    original = deadletter.Original(
        origin.topic,
        origin.partition,
        origin.offset,
        origin.timestamp_ms,
        origin.key,
        origin.value,
        tuple(origin.headers),
    )
    failure = deadletter.Failure(
        error.error_class,
        error.message,
        error.stage or "execute",
        error.field,
        retryable=error.retryable,
    )
    failed_at = now()
    return deadletter.dead_letter(
        original,
        failure,
        component=component,
        failed_at_ms=int(failed_at.timestamp() * 1000),
        request_id=request_id,
        attempts=attempts,
    )
