"""The retry-topic path without a broker: the decision, the worker's records, the retrier.

The worker side runs :class:`~dspex.agents.worker.handler.WorkerHandler` against a fake
producer and a flaky fake executor; the router side runs
:meth:`dspex.agents.router.router.RouterHandler.handle_retry` and the retry agent's
scheduling against a fake faust stream and producer (all from :mod:`tests.fakes`).
Clocks are fixed or fake.
The flaky backend is the ``dspex/sim?fail=N`` SIMULATION.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import dspy
import pytest

from dspex.agents.plumbing.catalog import ProgramCatalog, RoutingCatalog
from dspex.agents.plumbing.messages import Consumed, ErrorInfo
from dspex.agents.plumbing.publisher import DeliveryFailed, Publisher, serve_deliveries
from dspex.agents.plumbing.retry import (
    ATTEMPT,
    NOT_BEFORE,
    RETRY_POOL,
    RetryTopicPolicy,
    attempt_of,
    retry_due,
    tier_topic,
    without_retry_headers,
)
from dspex.agents.router.cache import ResultCache
from dspex.agents.router.router import RouterApp, RouterHandler
from dspex.agents.runtime.lms import build_lm
from dspex.agents.runtime.lms.simulations import SimOptions
from dspex.agents.worker.execution import Executor, Outcome
from dspex.agents.worker.faults import is_retryable
from dspex.agents.worker.handler import Destinations, WorkerHandler
from dspex.schemas import times
from dspex.schemas.samples import sample
from dspex.streams.errors import ConfigError, InvalidRequest
from dspex.streams.serde import SingleObjectSerde
from dspex.streams.settings import LMBackend, Settings, load_settings
from tests.fakes import FakeExecutor, FakeProducer, FakeResolver, Produced

SERDE = SingleObjectSerde()
POOL_TOPIC = "dspex.pool.general"
RETRY_TOPIC = "dspex.retry"
TO = Destinations(
    "dspex.responses", "dspex.executions", "dspex.telemetry", "dspex.dlq", RETRY_TOPIC
)
NOW_S = 1_800_000_000.0
RETRYABLE = ErrorInfo("BackendsExhausted", "every LM backend failed", None, "execute", True)
PERMANENT = ErrorInfo("InvalidRequest", "bad input", "inputs.question", "execute", False)


def _retries(producer: FakeProducer) -> list[Produced]:
    """The records a worker wrote to the retry delay tiers, in order."""
    return [p for p in producer.produced if p.topic.startswith(f"{RETRY_TOPIC}.")]


def _policy(attempts: int = 3, backoff: Sequence[float] = (1.0, 5.0)) -> RetryTopicPolicy:
    return RetryTopicPolicy(attempts, backoff, clock=lambda: NOW_S)


# -- the decision -------------------------------------------------------------------------


def test_the_attempt_header_is_parsed_and_absent_means_the_first() -> None:
    assert attempt_of([]) == 1
    assert attempt_of([(ATTEMPT, b"2")]) == 2
    assert attempt_of([(ATTEMPT, b"2"), ("x", b"y"), (ATTEMPT, b"3")]) == 3  # the last wins
    for garbled in (b"two", b"0", b"-4", b"\xff", None):
        assert attempt_of([(ATTEMPT, garbled)]) == 1


def test_the_nth_retry_waits_the_nth_backoff_and_the_last_one_repeats() -> None:
    policy = _policy(attempts=6, backoff=(1.0, 5.0))
    assert [policy.backoff(n) for n in (1, 2, 3, 4)] == [1.0, 5.0, 5.0, 5.0]


def test_only_retryable_errors_with_attempts_and_time_left_are_retried() -> None:
    policy = _policy()
    assert policy.refusal(1, RETRYABLE, streamed=False, time_left_s=None) is None
    assert policy.refusal(2, RETRYABLE, streamed=False, time_left_s=30.0) is None
    assert policy.refusal(1, PERMANENT, streamed=False, time_left_s=None) == "not retryable"
    assert policy.refusal(1, None, streamed=False, time_left_s=None) == "not retryable"
    assert "exhausted" in (policy.refusal(3, RETRYABLE, streamed=False, time_left_s=None) or "")
    # the deadline must outlast the backoff (1 s before the first retry, 5 s before the second)
    assert "deadline" in (policy.refusal(1, RETRYABLE, streamed=False, time_left_s=1.0) or "")
    assert policy.refusal(1, RETRYABLE, streamed=False, time_left_s=1.01) is None
    assert "deadline" in (policy.refusal(2, RETRYABLE, streamed=False, time_left_s=4.0) or "")


def test_no_retry_once_part_of_the_answer_was_streamed() -> None:
    reason = _policy().refusal(1, RETRYABLE, streamed=True, time_left_s=None)
    assert reason is not None and "streamed" in reason


def test_one_attempt_turns_the_retry_topic_off() -> None:
    assert (
        _policy(attempts=1).plan([], "general", RETRYABLE, streamed=False, time_left_s=None) is None
    )


def test_the_retry_record_headers_replace_the_old_bookkeeping_and_keep_the_rest() -> None:
    headers = [("trace", b"abc"), (ATTEMPT, b"2"), (RETRY_POOL, b"gpu"), (NOT_BEFORE, b"1")]
    retry = _policy().plan(headers, "general", RETRYABLE, streamed=False, time_left_s=None)
    assert retry is not None and (retry.attempt, retry.backoff_s) == (3, 5.0)
    assert retry.headers == (
        (ATTEMPT, b"3"),
        (RETRY_POOL, b"general"),
        (NOT_BEFORE, str(int(NOW_S * 1000) + 5000).encode()),
        ("trace", b"abc"),
    )
    assert without_retry_headers(retry.headers) == (("trace", b"abc"),)


def test_retry_due_reads_pool_and_wait_and_caps_the_wait() -> None:
    now = int(NOW_S * 1000)

    def headers(not_before: int, pool: bytes = b"general") -> list[tuple[str, bytes | None]]:
        return [(ATTEMPT, b"2"), (RETRY_POOL, pool), (NOT_BEFORE, str(not_before).encode())]

    due = retry_due(headers(now + 1500), now, 5.0)
    assert (due.pool, due.attempt, due.delay_s) == ("general", 2, 1.5)
    assert retry_due(headers(now - 10_000), now, 5.0).delay_s == 0.0  # overdue: at once
    assert retry_due(headers(now + 10**12), now, 5.0).delay_s == 5.0  # forged or skewed clock


@pytest.mark.parametrize(
    ("headers", "missing"),
    [
        ([(RETRY_POOL, b"general"), (NOT_BEFORE, b"1")], ATTEMPT),
        ([(ATTEMPT, b"1"), (RETRY_POOL, b"general"), (NOT_BEFORE, b"1")], ATTEMPT),
        ([(ATTEMPT, b"2"), (RETRY_POOL, b"general")], NOT_BEFORE),
        ([(ATTEMPT, b"2"), (NOT_BEFORE, b"soon"), (RETRY_POOL, b"general")], NOT_BEFORE),
        ([(ATTEMPT, b"2"), (NOT_BEFORE, b"1")], RETRY_POOL),
        ([(ATTEMPT, b"2"), (NOT_BEFORE, b"1"), (RETRY_POOL, b"\xff")], RETRY_POOL),
    ],
)
def test_retry_due_names_a_missing_or_bad_header(
    headers: list[tuple[str, bytes | None]], missing: str
) -> None:
    with pytest.raises(InvalidRequest) as raised:
        retry_due(headers, 0, 5.0)
    assert raised.value.field == f"headers.{missing}"


# -- the worker ---------------------------------------------------------------------------


@dataclass
class Worker:
    handler: WorkerHandler
    producer: FakeProducer
    publisher: Publisher

    async def handle(self, *origins: Consumed) -> None:
        server = asyncio.create_task(serve_deliveries(self.publisher))
        try:
            await asyncio.wait_for(asyncio.gather(*(self.handler.handle(o) for o in origins)), 5)
        finally:
            server.cancel()

    def retried(self, offset: int) -> Consumed:
        """The last retry record as the pool worker receives it after the retrier forwarded it."""
        last = _retries(self.producer)[-1]
        assert isinstance(last.key, str)
        return Consumed(POOL_TOPIC, 1, offset, last.key.encode(), last.value, tuple(last.headers))


def _worker(
    executor: Executor, policy: RetryTopicPolicy | None = None, fail: tuple[str, ...] = ()
) -> Worker:
    producer = FakeProducer(fail)
    publisher = Publisher(producer, SERDE, asyncio.get_running_loop())
    handler = WorkerHandler(
        executor=executor,
        publisher=publisher,
        serde=SERDE,
        destinations=TO,
        pool="general",
        worker_id="w1",
        in_flight=4,
        retry_topic=policy or RetryTopicPolicy(3, (0.5, 1.0)),
    )
    return Worker(handler, producer, publisher)


def _request(**changes: Any) -> dict[str, Any]:
    request = sample("Request")
    request.update(
        program_id=None,
        signature="question -> answer",
        stream=False,
        inputs={"question": json.dumps("capital of France?")},
        variables={},
        deadline_at=None,
    )
    request["route"]["pool"] = "general"
    request.update(changes)
    return request


def _origin(request: Mapping[str, Any]) -> Consumed:
    value = SERDE.encode("Request", request, topic=POOL_TOPIC)
    return Consumed(POOL_TOPIC, 0, 7, b"session-1", value, (("trace", b"abc"),), 1_700_000_000_000)


async def test_a_transient_failure_goes_to_the_retry_topic_and_the_retry_is_answered() -> None:
    request = _request()
    first = _origin(request)
    worker = _worker(FakeExecutor(fails=1))
    await worker.handle(first)

    ((_, key, value, headers),) = _retries(worker.producer)
    assert key == request["request_id"] and value == first.value  # the bytes, unchanged
    assert dict(headers)[ATTEMPT] == b"2" and dict(headers)[RETRY_POOL] == b"general"
    assert ("trace", b"abc") in headers
    assert worker.producer.records(TO.responses) == [] and worker.producer.records(TO.dlq) == []
    (execution,) = worker.producer.records(TO.executions)
    assert execution["attempt"] == 1 and execution["error"]["retryable"] is True
    assert worker.producer.records(TO.telemetry)[0]["success"] is False

    await worker.handle(worker.retried(offset=3))
    (response,) = worker.producer.records(TO.responses)
    assert response["status"] == "ok"
    attempts = [(e["attempt"], e["error"] is None) for e in worker.producer.records(TO.executions)]
    assert attempts == [(1, False), (2, True)]
    assert worker.producer.records(TO.dlq) == []


async def test_exhausted_attempts_answer_the_error_and_dead_letter_once_with_the_count() -> None:
    worker = _worker(FakeExecutor(fails=99))
    await worker.handle(_origin(_request()))
    await worker.handle(worker.retried(offset=3))
    await worker.handle(worker.retried(offset=4))

    assert len(_retries(worker.producer)) == 2
    (response,) = worker.producer.records(TO.responses)
    assert response["status"] == "error" and response["error"]["retryable"] is True
    (letter,) = worker.producer.records(TO.dlq)
    assert letter["attempts"] == 3
    # the retry bookkeeping is left out, so a replay starts again at attempt 1
    assert letter["original_headers"] == [{"key": "trace", "value": b"abc"}]
    executions = worker.producer.records(TO.executions)
    assert [e["attempt"] for e in executions] == [1, 2, 3]


async def test_a_streamed_chunk_means_no_retry() -> None:
    worker = _worker(FakeExecutor(fails=1))
    await worker.handle(_origin(_request(stream=True)))
    assert _retries(worker.producer) == []
    chunks = worker.producer.records(TO.responses)
    assert [c["final"] for c in chunks] == [False, True] and chunks[-1]["status"] == "error"
    assert len(worker.producer.records(TO.dlq)) == 1


async def test_a_deadline_shorter_than_the_backoff_answers_now() -> None:
    soon = _request(deadline_at=times.now() + timedelta(seconds=30))
    worker = _worker(FakeExecutor(fails=1), RetryTopicPolicy(3, (60.0,)))
    await worker.handle(_origin(soon))
    assert _retries(worker.producer) == []
    assert worker.producer.records(TO.responses)[0]["error"]["retryable"] is True


async def test_permanent_errors_are_never_sent_round_again() -> None:
    async def broken(request: Mapping[str, Any], on_chunk: Any) -> Outcome:
        raise InvalidRequest("inputs.question", "must not be empty")

    worker = _worker(FakeExecutor(broken))
    await worker.handle(_origin(_request()))
    assert _retries(worker.producer) == []
    assert worker.producer.records(TO.dlq)[0]["attempts"] == 1


async def test_a_redelivered_attempt_is_skipped_but_its_retry_is_not() -> None:
    executor = FakeExecutor(fails=1)
    worker = _worker(executor)
    request = _request()
    first = _origin(request)
    await worker.handle(first)
    await worker.handle(first)  # the same pool record again (a rebalance): skipped
    assert executor.calls == Counter({request["request_id"]: 1})
    assert len(_retries(worker.producer)) == 1
    await worker.handle(worker.retried(offset=3))
    assert executor.calls == Counter({request["request_id"]: 2})
    assert len(worker.producer.records(TO.responses)) == 1


async def test_a_retry_record_the_broker_refuses_fails_the_message() -> None:
    worker = _worker(FakeExecutor(fails=1), fail=(f"{RETRY_TOPIC}.1s",))
    with pytest.raises(DeliveryFailed, match=r"dspex\.retry\.1s"):
        await worker.handle(_origin(_request()))


async def test_without_a_retry_topic_a_transient_failure_is_answered_at_once() -> None:
    producer = FakeProducer()
    publisher = Publisher(producer, SERDE, asyncio.get_running_loop())
    handler = WorkerHandler(
        executor=FakeExecutor(fails=1),
        publisher=publisher,
        serde=SERDE,
        destinations=Destinations(TO.responses, TO.executions, TO.telemetry, TO.dlq),
        pool="general",
        worker_id="w1",
        in_flight=4,
        retry_topic=RetryTopicPolicy(3, (1.0,)),
    )
    await Worker(handler, producer, publisher).handle(_origin(_request()))
    assert _retries(producer) == [] and len(producer.records(TO.dlq)) == 1


# -- the retrier (router side) ------------------------------------------------------------

SETTINGS = load_settings(reliability={"retry_topic_backoff_s": [1.0, 5.0]})
NOW_MS = int(NOW_S * 1000)


def _router(clock_ms: Callable[[], int] = lambda: NOW_MS) -> RouterHandler:
    return RouterHandler(
        SETTINGS,
        SERDE,
        programs=ProgramCatalog(),
        routing=RoutingCatalog(),
        resolver=FakeResolver(),  # never reached by retry records
        cache=ResultCache(),
        clock=lambda: clock_ms() / 1000,
    )


def _retry_record(pool: bytes, not_before: int, offset: int = 5) -> Consumed:
    headers = ((ATTEMPT, b"2"), (RETRY_POOL, pool), (NOT_BEFORE, str(not_before).encode()))
    return Consumed("dspex.retry", 0, offset, b"req-1", b"\xc3\x01bytes", headers, NOW_MS)


def test_a_retry_record_goes_back_to_its_pool_unchanged_after_its_backoff() -> None:
    record = _retry_record(b"gpu", NOW_MS + 1000)
    delay, (out,) = _router().handle_retry(record)
    assert delay == 1.0
    assert (out.topic, out.key, out.value) == ("dspex.pool.gpu", b"req-1", record.value)
    assert tuple(out.headers) == record.headers


@pytest.mark.parametrize("pool", [b"nope", b"general.x", b""])
def test_an_unknown_pool_is_dead_lettered_at_stage_retry(pool: bytes) -> None:
    delay, (out,) = _router().handle_retry(_retry_record(pool, NOW_MS))
    assert delay == 0.0 and out.topic == "dspex.dlq"
    letter = SERDE.decode(out.value, topic="t").record
    assert letter["stage"] == "retry" and letter["request_id"] == "req-1"
    assert letter["original_value"] == b"\xc3\x01bytes" and RETRY_POOL in letter["error_message"]


async def test_the_retrier_does_not_hold_a_short_backoff_behind_a_long_one() -> None:
    producer = FakeProducer()
    router = RouterApp.__new__(RouterApp)  # only the retry path's parts: no broker
    router.handler = _router(lambda: NOW_MS)
    router._retry_topic = "dspex.retry"
    router._own_topics = frozenset()
    router._publisher = publisher = Publisher(producer, SERDE, asyncio.get_running_loop())
    done: list[int] = []
    long_one = _retry_record(b"general", NOW_MS + 300, offset=1)
    short_one = _retry_record(b"gpu", NOW_MS + 50, offset=2)

    async def handle(record: Consumed) -> None:
        await router.handle(record)
        done.append(record.offset)

    async def serve_deliveries() -> None:  # as the router's deliveries task does
        while True:
            publisher.poll()
            await asyncio.sleep(0.01)

    # the loop runs each record as its own task, as ConsumerLoop does
    tasks = [asyncio.create_task(handle(r)) for r in (long_one, short_one)]
    await asyncio.sleep(0)
    assert producer.produced == []  # both wait for their not-before time
    deliveries = asyncio.create_task(serve_deliveries())
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
    finally:
        deliveries.cancel()
    assert producer.topics() == ["dspex.pool.gpu", "dspex.pool.general"]
    assert done == [2, 1]  # each done (so committable) once forwarded


# -- the flaky simulation -----------------------------------------------------------------


def test_the_fail_option_is_checked() -> None:
    assert SimOptions.parse("dspex/sim?task=echo&fail=2").fail == 2
    for bad in ("dspex/sim?fail=-1", "dspex/sim?fail=some"):
        with pytest.raises(ConfigError, match="dspex/sim"):
            SimOptions.parse(bad)


def test_the_simulated_outage_fails_the_first_calls_retryably_then_answers() -> None:
    model = "dspex/sim?task=upper&fail=2&max_temperature=0.99"  # an option set of its own
    predict = dspy.Predict("question -> answer")
    errors = []
    for _ in range(2):
        # a fresh LM per call, as a worker builds for a request's overrides: still counted
        with dspy.context(lm=build_lm(LMBackend(model=model))), pytest.raises(Exception) as raised:
            predict(question="paris")
        errors.append(raised.value)
    assert all(is_retryable(e) and "SIMULATED" in str(e) for e in errors)
    with dspy.context(lm=build_lm(LMBackend(model=model))):
        assert predict(question="paris").answer == "PARIS"


def test_settings_default_to_three_attempts_with_growing_backoff() -> None:
    reliability = Settings().reliability
    assert reliability.retry_topic_attempts == 3
    assert reliability.retry_topic_backoff_s == (1.0, 5.0)


def test_a_backoff_goes_to_the_shortest_delay_tier_that_holds_it() -> None:
    assert tier_topic("p.retry", 0.2) == "p.retry.1s"
    assert tier_topic("p.retry", 1.0) == "p.retry.1s"
    assert tier_topic("p.retry", 4.0) == "p.retry.5s"
    assert tier_topic("p.retry", 30.0) == "p.retry.30s"
    assert tier_topic("p.retry", 60.0) == "p.retry.30s"  # longer: the longest tier, due later
