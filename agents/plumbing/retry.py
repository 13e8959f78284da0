"""Retry topics: a request that failed transiently goes round again through ``retry``, later.

Both halves of the path, free of Kafka so they are unit-tested with fakes:

* the worker's side, :class:`RetryTopicPolicy`: whether a failed attempt is sent
  to ``retry`` (retryable error, nothing streamed to the client yet, attempts
  left, and a deadline that outlasts the backoff) and the headers of that record;
* the router's side, :func:`retry_due`: where a ``retry`` record goes back to and
  how long to wait first.

Waits are durable: a worker writes a failed attempt to the delay tier that holds
its backoff (:func:`tier_topic`: ``retry.1s``, ``retry.5s``, ``retry.30s``, as
Spring Kafka's and Kafka Connect's retry topics do), and the router's retrier
(:mod:`dspex.agents.router.retrier`) pauses a tier partition until its first
record is due instead of holding the wait in memory. In one tier, records are
due roughly in the order written, so waiting for the first one delays the
others by at most the tier's width.

The pool record's bytes travel unchanged; the bookkeeping is in headers:

=====================  ==================================================================
``dspex-attempt``      1-based number of the attempt this record is for (absent: 1)
``dspex-retry-pool``   the pool whose worker failed it: the retrier sends it back there
``dspex-not-before``   UTC epoch milliseconds before which the retrier must not forward it
=====================  ==================================================================
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from dspex.agents.plumbing.messages import ErrorInfo
from dspex.streams.errors import InvalidRequest
from dspex.streams.settings import ReliabilitySettings
from dspex.streams.topics import RETRY_TIERS

ATTEMPT = "dspex-attempt"
RETRY_POOL = "dspex-retry-pool"
NOT_BEFORE = "dspex-not-before"
RETRY_HEADERS = frozenset({ATTEMPT, RETRY_POOL, NOT_BEFORE})

Header = tuple[str, bytes | None]


def header(headers: Iterable[Header], name: str) -> bytes | None:
    """The value of the last header called ``name`` (None when absent)."""
    found = None
    for key, value in headers:
        if key == name:
            found = value
    return found


def attempt_of(headers: Iterable[Header]) -> int:
    """The attempt a pool record is for: its ``dspex-attempt`` header, 1 when absent or unusable.

    Treating a garbled header as the first attempt cannot loop: the retry record
    the worker writes next carries a valid number.
    """
    value = _int_header(headers, ATTEMPT)
    return value if value is not None and value >= 1 else 1


def without_retry_headers(headers: Iterable[Header]) -> tuple[Header, ...]:
    """``headers`` minus the retry bookkeeping: what the request carried before any retry."""
    return tuple((k, v) for k, v in headers if k not in RETRY_HEADERS)


def tier_topic(retry_topic: str, backoff_s: float) -> str:
    """The delay tier of ``retry_topic`` for ``backoff_s``: the shortest that holds it."""
    label = next((label for label, most in RETRY_TIERS.items() if backoff_s <= most), None)
    return f"{retry_topic}.{label or next(reversed(RETRY_TIERS))}"


@dataclass(frozen=True)
class Retry:
    """A failed attempt that goes round again: the next attempt's number, wait and headers."""

    attempt: int
    backoff_s: float
    headers: tuple[Header, ...]


class RetryTopicPolicy:
    """When a worker hands a failed request to the ``retry`` topic, and with which headers.

    ``attempts`` counts attempts through the retry topic, the first included (1:
    never retry); the nth retry waits ``backoff_s[n-1]`` seconds, the last entry
    repeating. ``clock`` gives UTC epoch seconds (injectable for tests).
    """

    def __init__(
        self,
        attempts: int,
        backoff_s: Sequence[float],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if attempts < 1 or not backoff_s:
            raise ValueError("a retry topic needs attempts >= 1 and at least one backoff")
        self.attempts = attempts
        self.backoff_s = tuple(backoff_s)
        self._clock = clock

    @classmethod
    def from_settings(cls, reliability: ReliabilitySettings) -> RetryTopicPolicy:
        """The policy ``reliability.retry_topic_attempts`` / ``retry_topic_backoff_s`` describe."""
        return cls(reliability.retry_topic_attempts, reliability.retry_topic_backoff_s)

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` (the wait before retry ``attempt``)."""
        return self.backoff_s[min(max(attempt, 1), len(self.backoff_s)) - 1]

    def refusal(
        self,
        attempt: int,
        error: ErrorInfo | None,
        *,
        streamed: bool,
        time_left_s: float | None,
    ) -> str | None:
        """Why failed attempt ``attempt`` is *not* retried, or None when it goes to ``retry``."""
        if error is None or not error.retryable:
            return "not retryable"
        if streamed:
            return "part of the answer was streamed already"
        if attempt >= self.attempts:
            return f"attempt {attempt} of {self.attempts}: attempts exhausted"
        wait = self.backoff(attempt)
        if time_left_s is not None and time_left_s <= wait:
            return f"{max(time_left_s, 0.0):.3f}s left before the deadline, backoff {wait}s"
        return None

    def plan(
        self,
        headers: Iterable[Header],
        pool: str,
        error: ErrorInfo | None,
        *,
        streamed: bool,
        time_left_s: float | None,
    ) -> Retry | None:
        """The retry record's headers for a failed attempt, or None when it is not retried."""
        headers = tuple(headers)
        attempt = attempt_of(headers)
        if self.refusal(attempt, error, streamed=streamed, time_left_s=time_left_s) is not None:
            return None
        wait = self.backoff(attempt)
        not_before = round((self._clock() + wait) * 1000)
        bookkeeping: tuple[Header, ...] = (
            (ATTEMPT, str(attempt + 1).encode()),
            (RETRY_POOL, pool.encode()),
            (NOT_BEFORE, str(not_before).encode()),
        )
        return Retry(attempt + 1, wait, bookkeeping + without_retry_headers(headers))


@dataclass(frozen=True)
class Due:
    """Where a ``retry`` record goes back to and how long the retrier waits first."""

    pool: str
    attempt: int
    delay_s: float


def retry_due(headers: Sequence[Header], now_ms: int, max_delay_s: float) -> Due:
    """Read a ``retry`` record's headers; :class:`InvalidRequest` names a missing or bad one.

    The wait is capped at ``max_delay_s`` (the longest configured backoff): a
    clock ahead of the router's, or a forged far-future header, must not hold the
    record (and the commit of its partition) for longer than any real backoff.
    """
    attempt = _int_header(headers, ATTEMPT)
    if attempt is None or attempt < 2:
        raise InvalidRequest(f"headers.{ATTEMPT}", "missing, or not an attempt number >= 2")
    not_before = _int_header(headers, NOT_BEFORE)
    if not_before is None:
        raise InvalidRequest(f"headers.{NOT_BEFORE}", "missing, or not epoch milliseconds")
    raw_pool = header(headers, RETRY_POOL)
    try:
        pool = (raw_pool or b"").decode("utf-8")
    except UnicodeDecodeError:
        pool = ""
    if not pool:
        raise InvalidRequest(f"headers.{RETRY_POOL}", "missing or not UTF-8 text")
    delay_s = min(max(0.0, (not_before - now_ms) / 1000.0), max_delay_s)
    return Due(pool, attempt, delay_s)


def _int_header(headers: Iterable[Header], name: str) -> int | None:
    raw = header(headers, name)
    if raw is None:
        return None
    try:
        return int(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
