"""Timestamps as the contract keeps them: Avro ``timestamp-millis``, UTC.

fastavro decodes a ``timestamp-millis`` field to an aware ``datetime`` and encodes
either a ``datetime`` or epoch milliseconds; these helpers are the one place that
converts between the two and rounds to the millisecond (so a record equals its
own round trip).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any


def to_ms(value: Any) -> int | None:
    """Epoch milliseconds from a timestamp field (aware ``datetime`` or int); None if neither."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    stamp = getattr(value, "timestamp", None)
    return round(float(stamp()) * 1000) if callable(stamp) else None


def millis(moment: datetime) -> datetime:
    """``moment`` truncated to the millisecond (what ``timestamp-millis`` keeps)."""
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def now() -> datetime:
    """The current UTC time at millisecond precision."""
    return millis(datetime.now(UTC))


def now_ms() -> int:
    """The current time in epoch milliseconds."""
    return int(time.time() * 1000)


def millis_between(start: datetime, end: datetime) -> float:
    """Milliseconds from ``start`` to ``end`` (never negative: clocks of two hosts drift)."""
    return max(0.0, (end - start).total_seconds() * 1000.0)
