"""One pool message, start to finish: decode, dedupe, check the deadline, run, answer, audit.

:meth:`WorkerHandler.handle` turns one consumed message into its records —
Response chunks, the final Response (and, for an ok answer to a cacheable
request, the same Response on ``cache`` under its cache key), the Execution audit
record, Telemetry, a DeadLetter when something failed — and returns only once the broker has
acknowledged every one of them, so the caller may then count the offset as done.
A bad message never raises out of it; only a broker that will not take the
answers does (:class:`~dspex.agents.plumbing.publisher.DeliveryFailed`).

An attempt that failed transiently, before any chunk was streamed, goes to the
``retry`` topic instead of being answered (:mod:`dspex.agents.plumbing.retry`): the pool record's
bytes unchanged, with the next attempt's headers, plus this attempt's Execution
and Telemetry — no Response, no DeadLetter. The last attempt is answered as
usual and its DeadLetter counts every attempt.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from dspex.agents.plumbing import records
from dspex.agents.plumbing.answers import FinalStatusLookup, answered_before
from dspex.agents.plumbing.deadlines import expired, remaining_seconds, status_of
from dspex.agents.plumbing.messages import Consumed, ErrorInfo
from dspex.agents.plumbing.offsets import RecentIds
from dspex.agents.plumbing.publisher import DeliveryFailed, Publisher
from dspex.agents.plumbing.records import ExecutionResult
from dspex.agents.plumbing.retry import (
    Retry,
    RetryTopicPolicy,
    attempt_of,
    tier_topic,
    without_retry_headers,
)
from dspex.agents.runtime.history import session_history
from dspex.agents.worker.execution import Executor, Outcome, classify
from dspex.agents.worker.sessions import Sessions, Turn
from dspex.schemas import times
from dspex.schemas.records import Record
from dspex.schemas.times import to_ms
from dspex.streams import tracing
from dspex.streams.errors import SerdeError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Destinations:
    """Physical topic names the worker writes to."""

    responses: str
    executions: str
    telemetry: str
    dlq: str
    retry: str | None = None
    """The retry topic; None: failed attempts are answered at once (no retry topic)."""
    cache: str | None = None
    """The result-cache topic; None: cacheable answers are not offered to the routers."""


class _Replies:
    """The Response chunks of one request, in order, with their delivery futures."""

    def __init__(
        self,
        publisher: Publisher,
        topic: str,
        request: Mapping[str, Any],
        pool: str,
        cache_topic: str | None = None,
    ) -> None:
        self._publisher = publisher
        self.topic = topic
        self._cache_topic = cache_topic
        self._request = request
        self._pool = pool
        self.seq = 0
        self.pending: list[asyncio.Future[None]] = []

    async def chunk(self, delta: str) -> None:
        record = records.chunk_response(self._request, self.seq, delta, self._pool)
        self.seq += 1
        await self._send("Response", record)

    async def final(self, result: ExecutionResult, session: Record | None = None) -> None:
        """The final Response; an ok answer to a cacheable request also goes to ``cache``."""
        record = records.final_response(self._request, result, self.seq, self._pool, session)
        with tracing.producing(self.topic):
            await self._send("Response", record)
        cache_key = (self._request.get("route") or {}).get("cache_key")
        if self._cache_topic and cache_key and record["status"] == "ok":
            sent = await self._publisher.send(self._cache_topic, cache_key, "Response", record)
            self.pending.append(sent)

    async def _send(self, schema: str, record: Mapping[str, Any]) -> None:
        key = self._request["request_id"]
        self.pending.append(await self._publisher.send(self.topic, key, schema, record))


class WorkerHandler:
    """Answers pool messages through an :class:`Executor`, at most ``in_flight`` running at once."""

    def __init__(
        self,
        *,
        executor: Executor,
        publisher: Publisher,
        serde: Any,
        destinations: Destinations,
        pool: str,
        worker_id: str,
        in_flight: int,
        recent: RecentIds | None = None,
        retry_topic: RetryTopicPolicy | None = None,
        audit_publisher: Publisher | None = None,
        answers: FinalStatusLookup | None = None,
        sessions: Sessions | None = None,
    ) -> None:
        """``audit_publisher`` sends Execution and Telemetry (default: ``publisher``).

        ``answers`` finds a final answer already on a reply topic (blocking; see
        :mod:`dspex.agents.plumbing.answers`): a possibly redone request whose deadline
        has passed is not answered again when it was answered before. ``sessions``:
        session state for requests with a session id (None: keys only).
        """
        self._sessions = sessions
        self._executor = executor
        self._publisher = publisher
        self._audit_publisher = audit_publisher or publisher
        self._serde = serde
        self._to = destinations
        self._pool = pool
        self._worker_id = worker_id
        self._slots = asyncio.Semaphore(in_flight)
        self._recent = recent if recent is not None else RecentIds()
        self._retry = retry_topic if destinations.retry is not None else None
        self._answers = answers
        self._active: dict[str, asyncio.Future[None]] = {}
        self.delivering = 0
        """Requests answered and waiting only for the broker's acknowledgements."""

    @property
    def executor(self) -> Executor:
        return self._executor

    @property
    def component(self) -> str:
        return f"worker.{self._pool}"

    async def handle(self, origin: Consumed) -> None:
        """Process one message; returns once all its records are acknowledged.

        Raises only :class:`DeliveryFailed` (the broker will not take our records);
        any other surprise is logged and dead-lettered so one message cannot stop a pool.
        """
        try:
            await self._handle(origin)
        except (DeliveryFailed, asyncio.CancelledError):
            raise
        except Exception as exc:
            logger.exception("unexpected failure %s", origin.where())
            error = ErrorInfo(type(exc).__name__, str(exc) or repr(exc), None, "worker", False)
            await self._dead_letter(origin, error, None)

    async def _handle(self, origin: Consumed) -> None:
        received_at = times.now()
        try:
            decoded = self._serde.decode(origin.value or b"", topic=origin.topic, expect="Request")
        except SerdeError as exc:
            logger.warning("undecodable request %s error=%s", origin.where(), exc)
            error = ErrorInfo(type(exc).__name__, str(exc), None, "decode", False)
            await self._dead_letter(origin, error, None)
            return
        await self._dedupe_and_answer(origin, decoded.record, received_at)

    async def _dedupe_and_answer(
        self, origin: Consumed, request: dict[str, Any], received_at: datetime
    ) -> None:
        # An answered request is remembered by its id; an attempt handed to the retry
        # topic by id and attempt, so its own redelivery is skipped but the retry is not.
        request_id: str = request["request_id"]
        attempt = attempt_of(origin.headers)
        handed_off = f"{request_id}#{attempt}"
        if self._recent.seen(request_id) or self._recent.seen(handed_off):
            logger.info("skipping answered request %s request_id=%s", origin.where(), request_id)
            return
        if origin.maybe_redone and await self._answered_before(origin, request):
            self._recent.add(request_id)
            return
        running = self._active.get(handed_off)
        if running is not None:  # the same request twice in a row: answer once
            await asyncio.shield(running)
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._active[handed_off] = done
        try:
            retried = await self._answer(origin, request, received_at, attempt)
            self._recent.add(handed_off if retried else request_id)
        finally:
            del self._active[handed_off]
            done.set_result(None)

    async def _answered_before(self, origin: Consumed, request: Mapping[str, Any]) -> bool:
        """A redo past its deadline that an earlier owner already answered: say nothing.

        Answering it would contradict the first answer (``ok``, then ``overloaded``).
        A redo still within its deadline runs again: its answer is a duplicate, which
        clients drop, not a contradiction.
        """
        remaining = remaining_seconds(request)
        if self._answers is None or remaining is None or remaining > 0:
            return False
        topic = request.get("reply_topic") or self._to.responses
        created_ms = to_ms(request.get("created_at")) or 0
        request_id = request["request_id"]
        return await answered_before(self._answers, origin.where(), topic, request_id, created_ms)

    async def _answer(
        self, origin: Consumed, request: dict[str, Any], received_at: datetime, attempt: int
    ) -> bool:
        """Run and answer one attempt (a session's turns one at a time, in consumed order)."""
        if self._sessions is None or not request.get("session_id"):
            return await self._answer_turn(origin, request, received_at, attempt, None)
        async with self._sessions.turn(request) as turn:
            return await self._answer_turn(origin, request, received_at, attempt, turn)

    async def _answer_turn(
        self,
        origin: Consumed,
        request: dict[str, Any],
        received_at: datetime,
        attempt: int,
        turn: Turn | None,
    ) -> bool:
        """Run and answer one attempt; True when it went to the retry topic instead."""
        if turn is not None:
            request = dict(turn.request)  # the pinned variant, when sticky
            session_history.set(turn.history)
        replies = _Replies(
            self._publisher,
            request.get("reply_topic") or self._to.responses,
            request,
            self._pool,
            self._to.cache,
        )
        async with self._slots:
            result = await self._run(origin, request, replies, received_at)
        tracing.outcome(result.status, result.error)
        retry = self._plan_retry(origin, request, result, streamed=replies.seq > 0)
        if retry is None:
            await replies.final(result, turn.record() if turn is not None else None)
        pending = [
            *replies.pending,
            *(await self._audit(origin, request, result, attempt, final=retry is None)),
        ]
        if turn is not None and retry is None and self._sessions is not None:
            recorded = await self._sessions.record(turn, result)
            pending.extend([recorded] if recorded is not None else [])
        if retry is not None:
            pending.append(await self._send_retry(origin, request, retry))
        await self._await_delivery(origin, request, replies.topic, pending)
        return retry is not None

    def _plan_retry(
        self,
        origin: Consumed,
        request: Mapping[str, Any],
        result: ExecutionResult,
        *,
        streamed: bool,
    ) -> Retry | None:
        """The retry record's headers when this failed attempt goes round again, else None."""
        if self._retry is None or result.status != "error":
            return None
        time_left = remaining_seconds(request)
        return self._retry.plan(
            origin.headers, self._pool, result.error, streamed=streamed, time_left_s=time_left
        )

    async def _send_retry(
        self, origin: Consumed, request: Mapping[str, Any], retry: Retry
    ) -> asyncio.Future[None]:
        """The pool record's bytes, unchanged, to the retry delay tier of its backoff."""
        assert self._to.retry is not None  # noqa: S101 - no retry policy without the topic
        topic = tier_topic(self._to.retry, retry.backoff_s)
        logger.info(
            "retry via topic %s request_id=%s next_attempt=%d backoff_s=%s",
            origin.where(),
            request["request_id"],
            retry.attempt,
            retry.backoff_s,
        )
        key, value = request["request_id"], origin.value or b""
        return await self._publisher.send_bytes(topic, key, value, retry.headers)

    async def _run(
        self, origin: Consumed, request: dict[str, Any], replies: _Replies, received_at: datetime
    ) -> ExecutionResult:
        started_at = times.now()
        remaining = remaining_seconds(request, started_at)
        if remaining is not None and remaining <= 0:
            reason = expired(request, int(started_at.timestamp() * 1000), "a worker")
            status = status_of(reason)
            error = ErrorInfo(type(reason).__name__, reason.reason, "deadline_at", "queue")
            return ExecutionResult(status, received_at, started_at, started_at, error=error)
        on_chunk = replies.chunk if request.get("stream") else None
        try:
            outcome = await asyncio.wait_for(self._executor.execute(request, on_chunk), remaining)
        except Exception as exc:
            return self._failed(origin, request, exc, received_at, started_at)
        return _succeeded(outcome, received_at, started_at)

    def _failed(
        self,
        origin: Consumed,
        request: Mapping[str, Any],
        exc: Exception,
        received_at: datetime,
        started_at: datetime,
    ) -> ExecutionResult:
        failure = classify(exc)
        level = logging.WARNING if failure.dead_letter else logging.INFO
        logger.log(
            level,
            "execution failed %s request_id=%s status=%s error=%s: %s",
            origin.where(),
            request["request_id"],
            failure.status,
            failure.error.error_class,
            failure.error.message,
        )
        return ExecutionResult(
            failure.status,
            received_at,
            started_at,
            times.now(),
            error=failure.error,
            breaker_state=failure.breaker_state,
            failed_variants=failure.failed_variants,
        )

    async def _audit(
        self,
        origin: Consumed,
        request: Mapping[str, Any],
        result: ExecutionResult,
        attempt: int = 1,
        *,
        final: bool = True,
    ) -> list[asyncio.Future[None]]:
        """Execution and Telemetry for every attempt, a DeadLetter for a final error."""
        request_id = request["request_id"]
        execution = records.execution(
            request, result, worker_id=self._worker_id, pool=self._pool, attempt=attempt
        )
        measured = records.telemetry(
            request, result, worker_id=self._worker_id, pool=self._pool, in_flight=len(self._active)
        )
        measured["quality"] = score_against_gold(request, result)
        telemetry_key = request.get("program_id") or request_id
        sent = [
            await self._audit_publisher.send(
                self._to.executions, request_id, "Execution", execution
            ),
        ]
        # the failed variants first: one key, one partition, so the learner meets the
        # request's own record (which credits the variant that answered) last
        for attempt_record in [*records.failed_attempts(measured, result), measured]:
            sent.append(
                await self._audit_publisher.send(
                    self._to.telemetry, telemetry_key, "Telemetry", attempt_record
                )
            )
        if final and result.status == "error" and result.error is not None:
            sent.append(await self._send_dead_letter(origin, result.error, request_id, attempt))
        return sent

    async def _await_delivery(
        self,
        origin: Consumed,
        request: Mapping[str, Any],
        reply_topic: str,
        pending: list[asyncio.Future[None]],
    ) -> None:
        self.delivering += 1
        try:
            results = await asyncio.gather(*pending, return_exceptions=True)
        finally:
            self.delivering -= 1
        failures = [r for r in results if isinstance(r, BaseException)]
        if not failures:
            return
        first = failures[0]
        is_reply = isinstance(first, DeliveryFailed) and first.topic == reply_topic
        if is_reply and reply_topic != self._to.responses and len(failures) == 1:
            # the client named a topic we cannot write to: its request is bad, not the broker
            error = ErrorInfo("DeliveryFailed", str(first), "reply_topic", "produce", False)
            await self._dead_letter(origin, error, request["request_id"])
            return
        raise first

    async def _dead_letter(
        self, origin: Consumed, error: ErrorInfo, request_id: str | None
    ) -> None:
        delivered = await self._send_dead_letter(origin, error, request_id)
        await delivered

    async def _send_dead_letter(
        self, origin: Consumed, error: ErrorInfo, request_id: str | None, attempts: int = 1
    ) -> asyncio.Future[None]:
        # without the retry headers: a replayed dead letter starts again at attempt 1
        first = replace(origin, headers=without_retry_headers(origin.headers))
        record = records.dead_letter(
            first, error, component=self.component, request_id=request_id, attempts=attempts
        )
        return await self._publisher.send(self._to.dlq, origin.key, "DeadLetter", record)


GOLD, METRIC = "dspex.gold", "dspex.metric"


def score_against_gold(request: Mapping[str, Any], result: ExecutionResult) -> float | None:
    """The metric's score of a successful answer when the request carries a gold answer.

    ``metadata["dspex.gold"]`` is a JSON object of expected output fields;
    ``metadata["dspex.metric"]`` names the metric (the router copies a registered
    program's own metric there). Anything unusable is logged and scores nothing:
    scoring never fails a request.
    """
    metadata = request.get("metadata") or {}
    if result.status != "ok" or GOLD not in metadata:
        return None
    from dspex.agents.runtime.scoring import get_metric

    try:
        gold = json.loads(metadata[GOLD])
        if not isinstance(gold, dict) or not gold:
            raise ValueError("not a non-empty JSON object of output fields")
        metric = get_metric(metadata.get(METRIC) or "exact_match")
        score = float(metric(gold, dict(result.outputs)))
    except Exception as exc:
        logger.warning(
            "not scored request_id=%s metadata.%s: %s", request.get("request_id"), GOLD, exc
        )
        return None
    return score if math.isfinite(score) else None


def _succeeded(outcome: Outcome, received_at: datetime, started_at: datetime) -> ExecutionResult:
    return ExecutionResult(
        "ok",
        received_at,
        started_at,
        times.now(),
        outputs=outcome.outputs,
        usage=outcome.usage,
        trace=outcome.trace,
        program_version=outcome.program_version,
        variant=outcome.variant,
        breaker_state=outcome.breaker_state,
        failed_variants=outcome.failed_variants,
    )
