"""The pool worker against a real broker: answers, audit records, commits, back-pressure, handover.

Requests are produced straight to ``pool.general`` the way the router forwards
them. The worker runs in-process as an asyncio task; a fake executor makes
completion order random and counts concurrency. Counts are printed so a reader
sees the figures (sent, answered, duplicated, requests/s).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

from confluent_kafka import TopicPartition

from dspex.agents.plumbing.messages import TokenUsage
from dspex.agents.worker.execution import Executor, Outcome
from dspex.agents.worker.worker import PoolWorker
from dspex.schemas import times
from dspex.schemas.samples import sample
from dspex.streams import kafka
from dspex.streams.ops.admin import TopicReport
from dspex.streams.serde import make_serde
from dspex.streams.settings import GeneralPoolSettings, PoolsSettings, Settings
from dspex.streams.topics import Topics

CreateTopics = Callable[[], list[TopicReport]]
OUTPUTS = ("responses", "executions", "telemetry", "dlq")


class FakeExecutor:
    """Answers "echo: <question>" after a random sleep; counts calls and peak concurrency."""

    def __init__(self, max_sleep_s: float = 0.05, min_sleep_s: float = 0.0, seed: int = 7) -> None:
        self.calls: Counter[str] = Counter()
        self.running = 0
        self.peak = 0
        self._sleep = (min_sleep_s, max_sleep_s)
        self._rng = random.Random(seed)

    async def execute(self, request: Mapping[str, Any], on_chunk: Any) -> Outcome:
        self.calls[request["request_id"]] += 1
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await asyncio.sleep(self._rng.uniform(*self._sleep))
            answer = "echo: " + json.loads(request["inputs"]["question"])
            if on_chunk is not None:
                for word in answer.split(" "):
                    await on_chunk(word + " ")
            return Outcome({"answer": answer}, TokenUsage(5, 3, 8), [{"predictor": "fake"}], None)
        finally:
            self.running -= 1


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


class Outputs:
    """Reads everything the worker writes, decoded, by short topic name."""

    def __init__(self, settings: Settings) -> None:
        topics = Topics(settings.topics)
        self._short = {topics.name(n): n for n in OUTPUTS}
        self._serde = make_serde(settings)
        self._consumer = kafka.consumer(settings, f"test-{uuid.uuid4().hex}")
        self._consumer.subscribe(list(self._short))
        self.records: dict[str, list[dict[str, Any]]] = {n: [] for n in OUTPUTS}

    def finals(self) -> list[dict[str, Any]]:
        return [r for r in self.records["responses"] if r["final"]]

    def measured(self) -> list[dict[str, Any]]:
        """Telemetry of executions (workers also send periodic ``health`` records)."""
        return [r for r in self.records["telemetry"] if r["kind"] == "execution"]

    def health(self) -> list[dict[str, Any]]:
        return [r for r in self.records["telemetry"] if r["kind"] == "health"]

    async def until(self, done: Callable[[Outputs], bool], timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not done(self):
            assert time.monotonic() < deadline, {n: len(r) for n, r in self.records.items()}
            for msg in await asyncio.to_thread(self._consumer.consume, 1000, 0.2):
                assert msg.error() is None, msg.error()
                topic = msg.topic()
                decoded = self._serde.decode(msg.value(), topic=topic)
                self.records[self._short[topic]].append(decoded.record)

    async def settle(self, seconds: float = 1.5) -> None:
        """Keep reading for a while: anything produced twice shows up now."""
        end = time.monotonic() + seconds
        await self.until(lambda _: time.monotonic() > end, timeout_s=seconds + 30)

    def close(self) -> None:
        self._consumer.close()


@asynccontextmanager
async def running(worker: PoolWorker) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


@asynccontextmanager
async def outputs(settings: Settings) -> AsyncIterator[Outputs]:
    reader = Outputs(settings)
    try:
        yield reader
    finally:
        reader.close()


def _worker(settings: Settings, executor: Executor | None, group: str, **kw: Any) -> PoolWorker:
    return PoolWorker(settings, "general", executor=executor, group_id=group, **kw)


def _committed_equals_end(settings: Settings, group: str) -> None:
    topic = Topics(settings.topics).name("pool.general")
    partitions = Topics(settings.topics).spec("pool.general").partitions
    consumer = kafka.consumer(settings, group)
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        committed = {tp.partition: tp.offset for tp in consumer.committed(tps, timeout=10)}
        for p in range(partitions):
            _, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > 0:
                assert committed[p] == high, (p, committed[p], high)
    finally:
        consumer.close()


def _group() -> str:
    return f"test-pool-{uuid.uuid4().hex[:8]}"


async def test_hundred_requests_answered_once_each_and_committed(
    settings: Settings, create_topics: CreateTopics
) -> None:
    create_topics()
    requests = [_request(n) for n in range(100)]
    _produce_requests(settings, requests)
    executor, group = FakeExecutor(max_sleep_s=0.05), _group()
    async with outputs(settings) as out:
        started = time.monotonic()
        async with running(_worker(settings, executor, group)):
            await out.until(lambda o: len(o.finals()) >= 100)
            elapsed = time.monotonic() - started
            await out.until(lambda o: len(o.measured()) >= 100)
            await out.settle(1.0)
    finals = Counter(r["request_id"] for r in out.finals())
    assert finals == Counter({r["request_id"]: 1 for r in requests})
    assert all(r["status"] == "ok" for r in out.finals())
    by_id = {r["request_id"]: r for r in out.finals()}
    assert by_id[requests[7]["request_id"]]["outputs"] == {"answer": json.dumps("echo: question 7")}
    assert Counter(r["request_id"] for r in out.records["executions"]) == finals
    assert Counter(r["request_id"] for r in out.measured()) == finals
    assert out.records["dlq"] == []
    _committed_equals_end(settings, group)
    stamps = sorted(r["produced_at"] for r in out.finals())
    spread = max((stamps[-1] - stamps[0]).total_seconds(), 1e-3)
    print(
        f"\nworker: 100 requests, 100 answered, 0 duplicated; {100 / elapsed:.0f} requests/s "
        f"incl. group join ({elapsed:.2f}s), {99 / spread:.0f} requests/s first to last answer; "
        f"peak concurrency {executor.peak}"
    )


async def test_worker_reports_its_health_periodically(
    settings: Settings, create_topics: CreateTopics
) -> None:
    create_topics()
    settings = settings.model_copy(
        update={"metrics": settings.metrics.model_copy(update={"worker_health_interval_s": 0.5})}
    )
    worker = _worker(settings, FakeExecutor(), _group())
    async with outputs(settings) as out, running(worker):
        await out.until(lambda o: len(o.health()) >= 3)
    samples = out.health()
    assert {r["worker_id"] for r in samples} == {worker.worker_id}
    assert all(r["pool"] == "general" and r["request_id"] is None for r in samples)
    assert all(r["health"]["memory_bytes"] > 10_000_000 for r in samples)  # a real RSS
    assert all(r["health"]["breaker_state"] == "closed" for r in samples)


async def test_streaming_request_gets_ordered_chunks_then_final(
    settings: Settings, create_topics: CreateTopics
) -> None:
    create_topics()
    request = _request(3, stream=True)
    _produce_requests(settings, [request])
    async with outputs(settings) as out, running(_worker(settings, FakeExecutor(), _group())):
        await out.until(lambda o: len(o.finals()) == 1)
    chunks = out.records["responses"]
    assert [c["seq"] for c in chunks] == [0, 1, 2, 3]
    assert "".join(c["delta"] for c in chunks) == "echo: question 3 "
    assert [c["final"] for c in chunks] == [False, False, False, True]
    assert chunks[-1]["outputs"] == {"answer": json.dumps("echo: question 3")}


async def test_garbage_is_dead_lettered_and_the_rest_answered(
    settings: Settings, create_topics: CreateTopics
) -> None:
    create_topics()
    requests = [_request(n) for n in range(5)]
    _produce(settings, [("junk", b"\xc3\x01not avro at all")])
    _produce_requests(settings, requests)
    async with outputs(settings) as out, running(_worker(settings, FakeExecutor(), _group())):
        await out.until(lambda o: len(o.finals()) == 5 and len(o.records["dlq"]) == 1)
    (letter,) = out.records["dlq"]
    assert (letter["stage"], letter["original_key"]) == ("decode", b"junk")
    assert letter["original_value"] == b"\xc3\x01not avro at all"
    assert {r["request_id"] for r in out.finals()} == {r["request_id"] for r in requests}


async def test_expired_deadline_times_out_without_running(
    settings: Settings, create_topics: CreateTopics
) -> None:
    create_topics()
    late = _request(1, deadline_at=times.now() - timedelta(seconds=5))
    executor = FakeExecutor()
    async with outputs(settings) as out, running(_worker(settings, executor, _group())):
        _produce_requests(settings, [late])
        await out.until(lambda o: len(o.finals()) == 1 and len(o.measured()) == 1)
    (final,) = out.finals()
    assert final["status"] == "timeout"
    assert final["error"]["error_class"] == "DeadlineExceeded"
    assert executor.calls == Counter()


async def test_the_same_request_twice_is_answered_once(
    settings: Settings, create_topics: CreateTopics
) -> None:
    create_topics()
    request = _request(9)
    executor = FakeExecutor()
    async with outputs(settings) as out, running(_worker(settings, executor, _group())):
        _produce_requests(settings, [request, request])
        await out.until(lambda o: len(o.finals()) == 1)
        _produce_requests(settings, [request])  # and once more, after it was answered
        await out.settle(1.5)
    assert len(out.finals()) == 1
    assert executor.calls == Counter({request["request_id"]: 1})


async def test_in_flight_limit_bounds_concurrency(
    settings: Settings, create_topics: CreateTopics
) -> None:
    create_topics()
    settings = _with_in_flight(settings, 4)
    executor = FakeExecutor(min_sleep_s=0.05, max_sleep_s=0.1)
    _produce_requests(settings, [_request(n) for n in range(50)])
    async with outputs(settings) as out, running(_worker(settings, executor, _group())) as task:
        await out.until(lambda o: len(o.finals()) == 50)
        assert not task.done()
    print(f"\nin_flight=4: peak concurrency {executor.peak}")
    assert executor.peak == 4


async def test_graceful_stop_then_new_worker_answers_everything_exactly_once(
    settings: Settings, create_topics: CreateTopics
) -> None:
    create_topics()
    settings = _with_in_flight(settings, 4)
    group = _group()
    requests = [_request(n) for n in range(40)]
    first = FakeExecutor(min_sleep_s=0.05, max_sleep_s=0.1, seed=1)
    second = FakeExecutor(min_sleep_s=0.05, max_sleep_s=0.1, seed=2)
    async with outputs(settings) as out:
        async with running(_worker(settings, first, group)):
            _produce_requests(settings, requests)
            await out.until(lambda o: len(o.finals()) >= 10)
        stopped_after = len(out.finals())
        async with running(_worker(settings, second, group)):
            await out.until(lambda o: len(o.finals()) >= 40)
            await out.settle(1.5)
    answered = Counter(r["request_id"] for r in out.finals())
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
    _committed_equals_end(settings, group)


async def test_dspy_executor_answers_through_the_echo_lm(
    settings: Settings, create_topics: CreateTopics
) -> None:
    create_topics()
    plain, streamed = _request(1), _request(2, stream=True)
    async with outputs(settings) as out, running(_worker(settings, None, _group())):
        _produce_requests(settings, [plain, streamed])
        await out.until(lambda o: len(o.finals()) == 2 and len(o.records["executions"]) == 2)
    by_id = {r["request_id"]: r for r in out.finals()}
    assert by_id[plain["request_id"]]["status"] == "ok", by_id[plain["request_id"]]["error"]
    assert by_id[plain["request_id"]]["outputs"] == {"answer": json.dumps("echo: question 1")}
    chunks = [r for r in out.records["responses"] if r["request_id"] == streamed["request_id"]]
    assert chunks[-1]["final"] and chunks[-1]["status"] == "ok"
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))
    execution = next(r for r in out.records["executions"] if r["request_id"] == plain["request_id"])
    assert execution["usage"]["total_tokens"] > 0
    assert json.loads(execution["trace_json"])
