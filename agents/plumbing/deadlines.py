"""Request deadlines: when a request may still run, and what to answer when it may not.

The router checks a deadline before routing, the worker before running and while
running (the time left bounds the LM call). A deadline that passed while the
request waited in Kafka means DSPex is behind (``overloaded``); one already past
when the request was created is the client's (``timeout``).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from dspex.schemas.times import to_ms
from dspex.streams.errors import InvalidRequest

# A deadline further out than the requests topic's retention cannot be meant.
MAX_DEADLINE_AHEAD_MS = 7 * 24 * 60 * 60 * 1000


class DeadlineExceeded(InvalidRequest):
    """The request's deadline passed before it could run: answered with "timeout"."""


class Overloaded(DeadlineExceeded):
    """The deadline passed while the request waited in Kafka: answered with "overloaded"."""


def status_of(exc: DeadlineExceeded) -> str:
    """The final Response status for a passed deadline: ``overloaded`` or ``timeout``."""
    return "overloaded" if isinstance(exc, Overloaded) else "timeout"


def expired(request: Mapping[str, Any], now_ms: int, where: str) -> DeadlineExceeded:
    """Why a request whose deadline passed before it started is not run."""
    deadline = to_ms(request.get("deadline_at")) or 0
    created = to_ms(request.get("created_at"))
    if created is not None and created < deadline:
        waited = max(now_ms - created, 0)
        return Overloaded(
            "deadline_at",
            f"waited {waited} ms for {where}; the deadline passed before it could start "
            "(DSPex is overloaded: requests wait in Kafka)",
        )
    return DeadlineExceeded("deadline_at", f"the deadline had passed before {where}")


def deadline_passed(request: Mapping[str, Any], now_ms: int) -> bool:
    """True when the request carries a deadline that is already over."""
    deadline = to_ms(request.get("deadline_at"))
    return deadline is not None and deadline <= now_ms


def check_deadline(value: Any, now_ms: int) -> None:
    """Refuse a deadline that is no epoch-millisecond time or lies over 7 days ahead."""
    deadline = to_ms(value)
    if deadline is None:
        return
    if deadline <= 0:
        raise InvalidRequest("deadline_at", f"{deadline} is not a UTC epoch-millisecond time")
    if deadline > now_ms + MAX_DEADLINE_AHEAD_MS:
        raise InvalidRequest("deadline_at", "is more than 7 days ahead")


def remaining_seconds(request: Mapping[str, Any], at: datetime | None = None) -> float | None:
    """Seconds left before the request's deadline (negative when passed); None without one."""
    deadline: datetime | None = request.get("deadline_at")
    if deadline is None:
        return None
    return (deadline - (at or datetime.now(UTC))).total_seconds()
