"""Records an agent produces when it gives up on an input: DeadLetters and error Responses.

A rejected or undecodable record becomes a ``DeadLetter`` on the ``dlq`` topic
that keeps the exact original bytes, key, headers and coordinates, so it can be
inspected and replayed. When a client is waiting (the request id is known), it
also gets one final error ``Response`` saying what was wrong. Both builders
return plain dicts shaped for the serde (``DeadLetter`` / ``Response`` schemas).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dspex.streams.errors import InvalidRequest

Record = dict[str, Any]
Header = tuple[str, bytes | None]

# Error messages are for people; a clipped message keeps a record small.
_MAX_MESSAGE = 2000
# An original larger than this is not embedded (the dead letter would exceed the
# broker's 1 MB message limit and be lost); its coordinates say where it is.
MAX_EMBEDDED_BYTES = 512 * 1024


@dataclass(frozen=True, slots=True)
class Original:
    """Where a record came from and its exact bytes: what a DeadLetter must keep."""

    topic: str
    partition: int = -1
    offset: int = -1
    timestamp_ms: int | None = None
    key: bytes | None = None
    value: bytes | None = None
    headers: Sequence[Header] = field(default_factory=tuple)

    def where(self) -> str:
        """``topic=... partition=... offset=...`` for log lines and messages."""
        return f"topic={self.topic} partition={self.partition} offset={self.offset}"


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a record was given up on: class, message, stage, and the field if known."""

    error_class: str
    message: str
    stage: str
    field: str | None = None
    status: str = "error"
    retryable: bool = False

    @classmethod
    def from_exception(cls, exc: BaseException, stage: str, *, status: str = "error") -> Failure:
        """The failure an exception describes; ``InvalidRequest`` contributes its field."""
        if isinstance(exc, InvalidRequest):
            return cls(type(exc).__name__, exc.reason, stage, exc.field, status)
        return cls(type(exc).__name__, str(exc) or type(exc).__name__, stage, None, status)


def dead_letter(
    original: Original,
    failure: Failure,
    *,
    component: str,
    failed_at_ms: int,
    request_id: str | None = None,
    attempts: int = 1,
) -> Record:
    """A ``DeadLetter`` record keeping ``original`` byte for byte.

    A value over :data:`MAX_EMBEDDED_BYTES` is left out (``original_value_omitted``)
    so the dead letter itself still fits the broker; replay reads it from its
    topic by coordinates.
    """
    value = original.value
    omitted = value is not None and len(value) > MAX_EMBEDDED_BYTES
    return {
        "original_topic": original.topic,
        "original_partition": original.partition,
        "original_offset": original.offset,
        "original_timestamp": original.timestamp_ms,
        "original_key": original.key,
        "original_value": None if omitted else value,
        "original_value_bytes": -1 if value is None else len(value),
        "original_value_omitted": omitted,
        "original_headers": [{"key": k, "value": v} for k, v in original.headers],
        "error_class": failure.error_class,
        "error_message": _clip(_message(failure)),
        "stage": failure.stage,
        "attempts": attempts,
        "failed_at": failed_at_ms,
        "request_id": request_id,
        "component": component,
    }


def error_response(
    request_id: str,
    failure: Failure,
    *,
    produced_at_ms: int,
    program: Mapping[str, Any] | None = None,
) -> Record:
    """The one final ``Response`` chunk that tells a waiting client why its request failed."""
    program = program or {}
    return {
        "request_id": request_id,
        "seq": 0,
        "final": True,
        "status": failure.status,
        "delta": "",
        "outputs": None,
        "error": {
            "error_class": failure.error_class,
            "message": _clip(_message(failure)),
            "field": failure.field,
            "stage": failure.stage,
            "retryable": failure.retryable,
        },
        "cached": False,
        "program_id": program.get("program_id"),
        "program_version": program.get("program_version"),
        "pool": None,
        "produced_at": produced_at_ms,
    }


def _message(failure: Failure) -> str:
    if failure.field and failure.field not in failure.message:
        return f"{failure.field}: {failure.message}"
    return failure.message


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE else f"{text[: _MAX_MESSAGE - 3]}..."
