"""The pool worker against a real broker: answers, audit records, commits, back-pressure, handover.

Requests are produced straight to ``pool.general`` the way the router forwards
them. The worker runs in-process as an asyncio task; a fake executor
(:mod:`tests.fakes`) makes completion order random and counts concurrency. Before a
test counts duplicates, the worker has committed every request (so it redoes none)
and the tail has read its topics to their end. Counts are printed so a reader
sees the figures (sent, answered, duplicated, requests/s).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import pytest

from dspex.agents.worker.execution import Executor
from dspex.agents.worker.worker import PoolWorker
from dspex.schemas import times
from dspex.schemas.samples import sample
from dspex.streams import kafka
from dspex.streams.ops.admin import TopicReport
from dspex.streams.serde import make_serde
from dspex.streams.settings import GeneralPoolSettings, PoolsSettings, Settings
from dspex.streams.topics import Topics
from tests.fakes import FakeExecutor
from tests.integration.tail import OpenTail, Tail, committed, lag

CreateTopics = Callable[[], list[TopicReport]]
OUTPUTS = ("responses", "executions", "telemetry", "dlq")


def _with_in_flight(settings: Settings, in_flight: int) -> Settings:
    pools = PoolsSettings(general=GeneralPoolSettings(in_flight=in_flight))
    return settings.model_copy(update={"pools": pools})


def _request(n: int = 0, **changes: Any) -> dict[str, Any]:
    request = sample("Request")
    request.update(
        program_id=None,
        signature="question -> answer",
        module_type="Predict",
        stream=False,
        inputs={"question": json.dumps(f"question {n}")},
        variables={},
    )
    request["route"].update(pool="general", variant="echo", module_type="Predict")
    request.update(changes)
    return request


def _produce(settings: Settings, values: list[tuple[str, bytes]]) -> None:
    topic = Topics(settings.topics).name("pool.general")
    producer = kafka.producer(settings)
    for key, value in values:
        producer.produce(topic, value, key.encode())
    assert producer.flush(30) == 0


def _produce_requests(settings: Settings, requests: list[dict[str, Any]]) -> None:
    topic = Topics(settings.topics).name("pool.general")
    serde = make_serde(settings)
    _produce(
        settings, [(r["request_id"], serde.encode("Request", r, topic=topic)) for r in requests]
    )


def _finals(out: Tail) -> list[dict[str, Any]]:
    return [r for r in out.of("responses") if r["final"]]


def _measured(out: Tail) -> list[dict[str, Any]]:
    """Telemetry of executions (workers also send periodic ``health`` records)."""
    return [r for r in out.of("telemetry") if r["kind"] == "execution"]


def _health(out: Tail) -> list[dict[str, Any]]:
    return [r for r in out.of("telemetry") if r["kind"] == "health"]


@asynccontextmanager
async def running(worker: PoolWorker) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


@pytest.fixture
def outputs(create_topics: CreateTopics, tails: OpenTail) -> Iterator[Tail]:
    """Everything the worker writes, decoded (the topics are created first); all of it valid."""
    create_topics()
    out = tails(OUTPUTS, from_beginning=True)
    yield out
    assert out.errors == [] and out.undecodable() == 0


def _executor(min_sleep_s: float = 0.0, max_sleep_s: float = 0.05, seed: int = 7) -> FakeExecutor:
    """Completion order made random: each call sleeps a random time."""
    return FakeExecutor(sleep_s=(min_sleep_s, max_sleep_s), seed=seed)


def _worker(settings: Settings, executor: Executor | None, group: str, **kw: Any) -> PoolWorker:
    return PoolWorker(settings, "general", executor=executor, group_id=group, **kw)


def _group() -> str:
    return f"test-pool-{uuid.uuid4().hex[:8]}"


async def test_hundred_requests_answered_once_each_and_committed(
    settings: Settings, outputs: Tail
) -> None:
    requests = [_request(n) for n in range(100)]
    _produce_requests(settings, requests)
    executor, group = _executor(), _group()
    started = time.monotonic()
    async with running(_worker(settings, executor, group)):
        await outputs.until(lambda o: len(_finals(o)) >= 100, 60, "100 answers")
        elapsed = time.monotonic() - started
        await outputs.until(lambda o: len(_measured(o)) >= 100, 60, "100 telemetry records")
        await committed(settings, group, ["pool.general"])  # it handled all: none is redone
        await outputs.caught_up()  # and all it wrote is read
    finals = Counter(r["request_id"] for r in _finals(outputs))
    assert finals == Counter({r["request_id"]: 1 for r in requests})
    assert all(r["status"] == "ok" for r in _finals(outputs))
    by_id = {r["request_id"]: r for r in _finals(outputs)}
    assert by_id[requests[7]["request_id"]]["outputs"] == {"answer": json.dumps("echo: question 7")}
    assert Counter(r["request_id"] for r in outputs.of("executions")) == finals
    assert Counter(r["request_id"] for r in _measured(outputs)) == finals
    assert outputs.of("dlq") == []
    assert lag(settings, group, ["pool.general"]) == 0  # committed up to the end
    stamps = sorted(r["produced_at"] for r in _finals(outputs))
    spread = max((stamps[-1] - stamps[0]).total_seconds(), 1e-3)
    print(
        f"\nworker: 100 requests, 100 answered, 0 duplicated; {100 / elapsed:.0f} requests/s "
        f"incl. group join ({elapsed:.2f}s), {99 / spread:.0f} requests/s first to last answer; "
        f"peak concurrency {executor.peak}"
    )


async def test_worker_reports_its_health_periodically(settings: Settings, outputs: Tail) -> None:
    settings = settings.model_copy(
        update={"metrics": settings.metrics.model_copy(update={"worker_health_interval_s": 0.5})}
    )
    worker = _worker(settings, _executor(), _group())
    async with running(worker):
        await outputs.until(lambda o: len(_health(o)) >= 3, 60, "3 health samples")
    samples = _health(outputs)
    assert {r["worker_id"] for r in samples} == {worker.worker_id}
    assert all(r["pool"] == "general" and r["request_id"] is None for r in samples)
    assert all(r["health"]["memory_bytes"] > 10_000_000 for r in samples)  # a real RSS
    assert all(r["health"]["breaker_state"] == "closed" for r in samples)


async def test_streaming_request_gets_ordered_chunks_then_final(
    settings: Settings, outputs: Tail
) -> None:
    request = _request(3, stream=True)
    _produce_requests(settings, [request])
    async with running(_worker(settings, _executor(), _group())):
        await outputs.until(lambda o: len(_finals(o)) == 1, 60, "the answer")
    chunks = outputs.of("responses")
    assert [c["seq"] for c in chunks] == [0, 1, 2, 3]
    assert "".join(c["delta"] for c in chunks) == "echo: question 3 "
    assert [c["final"] for c in chunks] == [False, False, False, True]
    assert chunks[-1]["outputs"] == {"answer": json.dumps("echo: question 3")}


async def test_garbage_is_dead_lettered_and_the_rest_answered(
    settings: Settings, outputs: Tail
) -> None:
    requests = [_request(n) for n in range(5)]
    _produce(settings, [("junk", b"\xc3\x01not avro at all")])
    _produce_requests(settings, requests)
    async with running(_worker(settings, _executor(), _group())):
        await outputs.until(
            lambda o: len(_finals(o)) == 5 and len(o.of("dlq")) == 1,
            60,
            "5 answers and 1 dead letter",
        )
    (letter,) = outputs.of("dlq")
    assert (letter["stage"], letter["original_key"]) == ("decode", b"junk")
    assert letter["original_value"] == b"\xc3\x01not avro at all"
    assert {r["request_id"] for r in _finals(outputs)} == {r["request_id"] for r in requests}


async def test_expired_deadline_times_out_without_running(
    settings: Settings, outputs: Tail
) -> None:
    late = _request(1, deadline_at=times.now() - timedelta(seconds=5))
    executor = _executor()
    async with running(_worker(settings, executor, _group())):
        _produce_requests(settings, [late])
        await outputs.until(
            lambda o: len(_finals(o)) == 1 and len(_measured(o)) == 1,
            60,
            "the answer and its telemetry",
        )
    (final,) = _finals(outputs)
    assert final["status"] == "timeout"
    assert final["error"]["error_class"] == "DeadlineExceeded"
    assert executor.calls == Counter()


async def test_the_same_request_twice_is_answered_once(settings: Settings, outputs: Tail) -> None:
    request = _request(9)
    executor, group = _executor(), _group()
    async with running(_worker(settings, executor, group)):
        _produce_requests(settings, [request, request])
        await outputs.until(lambda o: len(_finals(o)) == 1, 60, "the answer")
        _produce_requests(settings, [request])  # and once more, after it was answered
        await committed(settings, group, ["pool.general"])  # all three handled
        await outputs.caught_up()  # and whatever they were answered with is read
    assert len(_finals(outputs)) == 1
    assert executor.calls == Counter({request["request_id"]: 1})


async def test_in_flight_limit_bounds_concurrency(settings: Settings, outputs: Tail) -> None:
    settings = _with_in_flight(settings, 4)
    executor = _executor(0.05, 0.1)
    _produce_requests(settings, [_request(n) for n in range(50)])
    async with running(_worker(settings, executor, _group())) as task:
        await outputs.until(lambda o: len(_finals(o)) == 50, 60, "50 answers")
        assert not task.done()
    print(f"\nin_flight=4: peak concurrency {executor.peak}")
    assert executor.peak == 4


async def test_graceful_stop_then_new_worker_answers_everything_exactly_once(
    settings: Settings, outputs: Tail
) -> None:
    settings = _with_in_flight(settings, 4)
    group = _group()
    requests = [_request(n) for n in range(40)]
    first = _executor(0.05, 0.1, seed=1)
    second = _executor(0.05, 0.1, seed=2)
    async with running(_worker(settings, first, group)):
        _produce_requests(settings, requests)
        await outputs.until(lambda o: len(_finals(o)) >= 10, 60, "10 answers")
    stopped_after = len(_finals(outputs))
    async with running(_worker(settings, second, group)):
        await outputs.until(lambda o: len(_finals(o)) >= 40, 60, "40 answers")
        await committed(settings, group, ["pool.general"])  # all 40 handled by the two
        await outputs.caught_up()
    answered = Counter(r["request_id"] for r in _finals(outputs))
    runs = first.calls + second.calls
    lost = [r["request_id"] for r in requests if r["request_id"] not in answered]
    duplicated = [rid for rid, n in answered.items() if n > 1]
    print(
        f"\nhandover: sent 40, first worker answered {sum(first.calls.values())} "
        f"(stop seen at {stopped_after}), second {sum(second.calls.values())}, "
        f"lost {len(lost)}, duplicated {len(duplicated)}"
    )
    assert lost == []
    assert duplicated == []
    assert all(n == 1 for n in runs.values())
    assert lag(settings, group, ["pool.general"]) == 0  # committed up to the end


async def test_dspy_executor_answers_through_the_echo_lm(settings: Settings, outputs: Tail) -> None:
    plain, streamed = _request(1), _request(2, stream=True)
    async with running(_worker(settings, None, _group())):
        _produce_requests(settings, [plain, streamed])
        await outputs.until(
            lambda o: len(_finals(o)) == 2 and len(o.of("executions")) == 2,
            60,
            "2 answers and 2 executions",
        )
    by_id = {r["request_id"]: r for r in _finals(outputs)}
    assert by_id[plain["request_id"]]["status"] == "ok", by_id[plain["request_id"]]["error"]
    assert by_id[plain["request_id"]]["outputs"] == {"answer": json.dumps("echo: question 1")}
    chunks = [r for r in outputs.of("responses") if r["request_id"] == streamed["request_id"]]
    assert chunks[-1]["final"] and chunks[-1]["status"] == "ok"
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))
    execution = next(r for r in outputs.of("executions") if r["request_id"] == plain["request_id"])
    assert execution["usage"]["total_tokens"] > 0
    assert json.loads(execution["trace_json"])
