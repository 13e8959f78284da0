"""LM fault handling for a worker: retries with backoff, per-backend circuit breakers, fallback.

:meth:`FaultPolicy.run` runs one request's LM work on an ordered list of backend
variants (the route's variant, its configured fallbacks, the pool's default):

* each call goes through the variant's pybreaker ``CircuitBreaker`` as
  ``with breaker.calling(): await ...`` (``call()`` would serialize concurrent
  requests behind its lock; ``call_async`` is Tornado-only);
* a *retryable* failure (DSPy's transient LM errors: rate limit, timeout,
  server, transport) is retried on the same variant after an exponential
  backoff with full jitter, honouring the provider's ``retry_after``, as long
  as the request's deadline leaves room; anything else (invalid request,
  unparseable output, program errors) is raised at once, never retried;
* a variant whose retries ran out or whose circuit is open hands over to the
  next one; when none is left :class:`BackendsExhausted` names each variant and
  the error class it failed with.

Only retryable errors count against a breaker: a request that is wrong for
every backend must not switch a healthy backend off. Once a streamed chunk has
reached the client the request is never replayed (DSPy's own advice: do not
replay after visible stream output).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import pybreaker

from dspex.streams.errors import PermanentError, RetryableError

logger = logging.getLogger(__name__)

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]
Clock = Callable[[], float]


def is_retryable(exc: BaseException) -> bool:
    """Whether the same call may succeed if made again later (DSPy's helper for LM errors)."""
    if isinstance(exc, RetryableError):
        return True
    if isinstance(exc, PermanentError) or not isinstance(exc, Exception):
        return False
    if type(exc).__module__.startswith("dspy"):
        from dspy.utils.exceptions import is_retryable_lm_error

        return bool(is_retryable_lm_error(exc))
    return False


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently one backend is retried: ``attempts`` calls in all."""

    attempts: int = 3
    base_s: float = 0.2
    max_s: float = 5.0

    def delay(self, retry: int, rng: random.Random, retry_after: float | None = None) -> float:
        """Seconds before retry ``retry`` (1-based): full jitter, at least ``retry_after``."""
        ceiling = min(self.max_s, self.base_s * 2 ** (retry - 1))
        jittered = rng.uniform(0.0, ceiling)
        if retry_after is not None and math.isfinite(retry_after) and retry_after > 0:
            return max(jittered, retry_after)
        return jittered


class _LogStateChanges(pybreaker.CircuitBreakerListener):
    def state_change(self, cb: pybreaker.CircuitBreaker, old: Any, new: Any) -> None:
        level = logging.WARNING if new.name == pybreaker.STATE_OPEN else logging.INFO
        logger.log(level, "circuit breaker variant=%s %s -> %s", cb.name, old.name, new.name)


class BreakerBoard:
    """One circuit breaker per LM backend variant, created on first use."""

    def __init__(self, fail_max: int = 5, reset_timeout_s: float = 30.0) -> None:
        self._fail_max = fail_max
        self._reset_timeout_s = reset_timeout_s
        self._breakers: dict[str, pybreaker.CircuitBreaker] = {}

    def get(self, variant: str) -> pybreaker.CircuitBreaker:
        """The breaker of ``variant``; only retryable errors count as its failures."""
        breaker = self._breakers.get(variant)
        if breaker is None:
            breaker = pybreaker.CircuitBreaker(
                fail_max=self._fail_max,
                reset_timeout=self._reset_timeout_s,
                exclude=[lambda exc: not is_retryable(exc)],
                listeners=[_LogStateChanges()],
                name=variant,
                throw_new_error_on_trip=False,  # the call that trips it keeps its own error
            )
            self._breakers[variant] = breaker
        return breaker

    def state(self, variant: str) -> str:
        """``"closed"``, ``"open"`` or ``"half-open"`` (closed for a variant never called)."""
        breaker = self._breakers.get(variant)
        return pybreaker.STATE_CLOSED if breaker is None else str(breaker.current_state)

    def worst_state(self) -> str:
        """The most alarming state over every breaker: open, else half-open, else closed."""
        states = {str(b.current_state) for b in self._breakers.values()}
        for state in (pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN):
            if state in states:
                return str(state)
        return str(pybreaker.STATE_CLOSED)


@dataclass(frozen=True)
class BackendFailure:
    """Why one variant gave up: the last error's class and message, after ``calls`` LM calls."""

    variant: str
    error_class: str
    message: str
    calls: int

    def describe(self) -> str:
        return f"{self.variant}: {self.error_class} after {self.calls} call(s) ({self.message})"


class BackendsExhausted(RetryableError):
    """Every LM backend variant a request may use failed with a transient error or was open."""

    def __init__(
        self, failures: Sequence[BackendFailure], breaker_state: str, request_id: str | None = None
    ) -> None:
        self.failures = tuple(failures)
        self.breaker_state = breaker_state
        """State of the first variant's breaker when the request gave up."""
        where = f"request_id={request_id}: " if request_id else ""
        tried = "; ".join(f.describe() for f in self.failures) or "no backend to try"
        super().__init__(f"{where}every LM backend failed: {tried}")


@dataclass(frozen=True)
class Answered(Generic[T]):
    """A successful run: its value, the variant that produced it, and who failed before."""

    value: T
    variant: str
    breaker_state: str
    failures: tuple[BackendFailure, ...] = ()


@dataclass(frozen=True)
class _GaveUp:
    failure: BackendFailure


class FaultPolicy:
    """Retries, breakers and fallback around one request's LM work (see the module doc).

    ``sleep``, ``rng`` and ``clock`` (monotonic seconds) are injectable so tests
    run the whole policy deterministically without real waiting.
    """

    def __init__(
        self,
        retry: RetryPolicy | None = None,
        breakers: BreakerBoard | None = None,
        *,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self.breakers = breakers or BreakerBoard()
        self._sleep = sleep
        self._rng = rng or random.Random()  # noqa: S311 - backoff jitter, not security
        self._clock = clock

    async def run(
        self,
        variants: Sequence[str],
        attempt: Callable[[str], Awaitable[T]],
        *,
        time_left_s: float | None = None,
        replayable: Callable[[], bool] = lambda: True,
        request_id: str | None = None,
    ) -> Answered[T]:
        """``attempt(variant)`` on each variant in turn until one succeeds.

        No backoff sleeps past ``time_left_s`` (the request's deadline) from now;
        ``replayable()`` turning False (a chunk was streamed) stops any further call.
        Raises the first non-retryable error as it is, else :class:`BackendsExhausted`.
        """
        deadline = None if time_left_s is None else self._clock() + time_left_s
        failures: list[BackendFailure] = []
        for variant in variants:
            outcome = await self._on_backend(variant, attempt, deadline, replayable)
            if not isinstance(outcome, _GaveUp):
                state = self.breakers.state(variant)
                return Answered(outcome, variant, state, tuple(failures))
            failures.append(outcome.failure)
            logger.info("backend gave up request_id=%s %s", request_id, outcome.failure.describe())
            if not replayable():
                break
        first = variants[0] if variants else ""
        raise BackendsExhausted(failures, self.breakers.state(first), request_id)

    async def _on_backend(
        self,
        variant: str,
        attempt: Callable[[str], Awaitable[T]],
        deadline: float | None,
        replayable: Callable[[], bool],
    ) -> T | _GaveUp:
        breaker = self.breakers.get(variant)
        calls = 0
        while True:
            try:
                with breaker.calling():
                    calls += 1
                    return await attempt(variant)
            except pybreaker.CircuitBreakerError:
                message = f"circuit open after {breaker.fail_counter} failures"
                return _GaveUp(BackendFailure(variant, "CircuitOpen", message, calls))
            except Exception as exc:
                if not is_retryable(exc):
                    raise
                last = exc
            delay = self._next_delay(calls, last, deadline, replayable)
            if delay is None:
                return _GaveUp(BackendFailure(variant, type(last).__name__, str(last), calls))
            await self._sleep(delay)

    def _next_delay(
        self,
        calls: int,
        error: Exception,
        deadline: float | None,
        replayable: Callable[[], bool],
    ) -> float | None:
        """The backoff before the next call, or None when this backend should give up."""
        if calls >= self.retry.attempts or not replayable():
            return None
        delay = self.retry.delay(calls, self._rng, getattr(error, "retry_after", None))
        if deadline is not None and self._clock() + delay >= deadline:
            return None  # no time to wait and call again: let the next backend try
        return delay
