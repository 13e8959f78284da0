"""The worker's records, failure classes and per-message pipeline, without a broker.

Records are proven valid by encoding them with the real serde; the pipeline
(``WorkerHandler``) runs against a fake producer whose delivery reports the
test controls, and a fake executor (:mod:`tests.fakes`).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import pytest

from dspex.agents.plumbing import records
from dspex.agents.plumbing.deadlines import remaining_seconds
from dspex.agents.plumbing.messages import Consumed, ErrorInfo, TokenUsage
from dspex.agents.plumbing.publisher import DeliveryFailed, Publisher, serve_deliveries
from dspex.agents.plumbing.records import ExecutionResult
from dspex.agents.worker.execution import Outcome, backend_overrides, classify
from dspex.agents.worker.handler import Destinations, WorkerHandler, score_against_gold
from dspex.schemas import times
from dspex.schemas.samples import sample
from dspex.streams.errors import (
    BrokerUnavailable,
    CorruptRecord,
    InvalidRequest,
    ProgramError,
)
from dspex.streams.serde import SingleObjectSerde
from tests.fakes import FakeExecutor, FakeProducer

POOL_TOPIC = "dspex.pool.general"
TO = Destinations("dspex.responses", "dspex.executions", "dspex.telemetry", "dspex.dlq")
SERDE = SingleObjectSerde()


def _request(**changes: Any) -> dict[str, Any]:
    request = sample("Request")
    request.update(
        program_id=None,
        signature="question -> answer",
        stream=False,
        inputs={"question": json.dumps("What is 2 + 2?")},
        variables={},
    )
    request["route"]["pool"] = "general"
    request.update(changes)
    return request


def _origin(request: Mapping[str, Any] | None = None, value: bytes | None = None) -> Consumed:
    data = value if value is not None else SERDE.encode("Request", request or {}, topic=POOL_TOPIC)
    return Consumed(POOL_TOPIC, 2, 41, b"key", data, (("trace", b"abc"),), 1_700_000_000_000)


def _result(status: str = "ok", error: ErrorInfo | None = None) -> ExecutionResult:
    t = times.now()
    return ExecutionResult(
        status,
        t,
        t + timedelta(milliseconds=5),
        t + timedelta(milliseconds=25),
        outputs={"answer": "4", "confidence": 0.9} if status == "ok" else {},
        usage=TokenUsage(10, 2, 12),
        trace=[{"predictor": "predict", "inputs": {}, "outputs": {"answer": "4"}}],
        program_version=None,
        error=error,
    )


def _roundtrip(schema: str, record: Mapping[str, Any]) -> dict[str, Any]:
    decoded = SERDE.decode(SERDE.encode(schema, record, topic="t"), topic="t", expect=schema)
    return decoded.record


# -- records ------------------------------------------------------------------------------


def test_final_response_carries_json_outputs() -> None:
    request = _request()
    record = _roundtrip("Response", records.final_response(request, _result(), 3, "general"))
    assert record["request_id"] == request["request_id"]
    assert (record["seq"], record["final"], record["status"]) == (3, True, "ok")
    assert record["outputs"] == {"answer": '"4"', "confidence": "0.9"}
    assert record["error"] is None
    assert (record["pool"], record["cached"]) == ("general", False)


def test_error_response_carries_the_error_and_no_outputs() -> None:
    error = ErrorInfo("ProgramError", "cannot parse", None, "execute", False)
    record = _roundtrip(
        "Response", records.final_response(_request(), _result("error", error), 0, "general")
    )
    assert record["status"] == "error"
    assert record["outputs"] is None
    assert record["error"] == {
        "error_class": "ProgramError",
        "message": "cannot parse",
        "field": None,
        "stage": "execute",
        "retryable": False,
    }


def test_chunk_response_is_a_progress_chunk() -> None:
    record = _roundtrip("Response", records.chunk_response(_request(), 1, "Par", "general"))
    assert (record["seq"], record["final"], record["status"], record["delta"]) == (
        1,
        False,
        "progress",
        "Par",
    )


def test_execution_record_has_timings_usage_and_route() -> None:
    request = _request(metadata={"tenant": "acme"})
    result = _result()
    record = _roundtrip(
        "Execution", records.execution(request, result, worker_id="w1", pool="general")
    )
    assert record["signature"] == "question -> answer"
    assert record["module_type"] == "ChainOfThought"  # from the route
    assert record["inputs"] == request["inputs"]
    assert record["outputs"]["answer"] == '"4"'
    assert json.loads(record["trace_json"])[0]["predictor"] == "predict"
    assert record["usage"] == {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}
    assert record["timings"]["run_ms"] == pytest.approx(20.0)
    assert record["timings"]["queue_wait_ms"] >= 0
    assert record["route"]["pool"] == "general"
    assert (record["worker_id"], record["pool"], record["attempt"]) == ("w1", "general", 1)
    assert record["metadata"] == {"tenant": "acme"}


def test_telemetry_record_measures_the_execution() -> None:
    request = _request()
    record = _roundtrip(
        "Telemetry", records.telemetry(request, _result(), worker_id="w1", pool="general")
    )
    assert record["kind"] == "execution"
    assert record["variant"] == request["route"]["variant"]
    assert record["success"] is True
    assert record["error_class"] is None
    assert (record["prompt_tokens"], record["completion_tokens"]) == (10, 2)
    assert record["latency_ms"] >= record["queue_wait_ms"]


def test_telemetry_of_a_failure() -> None:
    error = ErrorInfo("TimeoutError", "too slow", None, "execute")
    record = _roundtrip(
        "Telemetry",
        records.telemetry(_request(), _result("timeout", error), worker_id="w", pool="general"),
    )
    assert record["success"] is False
    assert record["error_class"] == "TimeoutError"


def test_dead_letter_keeps_the_original_bytes() -> None:
    origin = _origin(value=b"\x00garbage")
    error = ErrorInfo("CorruptRecord", "bad bytes", None, "decode")
    record = _roundtrip(
        "DeadLetter", records.dead_letter(origin, error, component="worker.general")
    )
    assert record["original_value"] == b"\x00garbage"
    assert record["original_key"] == b"key"
    assert (record["original_partition"], record["original_offset"]) == (2, 41)
    assert record["original_headers"] == [{"key": "trace", "value": b"abc"}]
    assert (record["stage"], record["component"]) == ("decode", "worker.general")


def test_outputs_are_encoded_as_json_per_field() -> None:
    assert records.encode_outputs({"a": "x", "b": [1, 2], "c": None}) == {
        "a": '"x"',
        "b": "[1, 2]",
        "c": "null",
    }


# -- classify and helpers -----------------------------------------------------------------


def test_classify_timeout_is_a_final_timeout_not_dead_lettered() -> None:
    failure = classify(TimeoutError())
    assert failure.status == "timeout"
    assert not failure.dead_letter
    assert failure.error.stage == "execute"


@pytest.mark.parametrize(
    "exc",
    [ProgramError("bad output"), InvalidRequest("inputs.question", "missing"), ValueError("boom")],
)
def test_classify_permanent_errors(exc: Exception) -> None:
    failure = classify(exc)
    assert failure.status == "error"
    assert failure.dead_letter
    assert failure.error.retryable is False
    assert failure.error.error_class == type(exc).__name__


def test_classify_names_the_invalid_field() -> None:
    assert classify(InvalidRequest("inputs.question", "missing")).error.field == "inputs.question"


def test_classify_retryable_errors() -> None:
    assert classify(BrokerUnavailable("down")).error.retryable is True


def test_classify_dspy_transient_lm_errors_are_retryable() -> None:
    from dspy.utils import exceptions

    assert classify(exceptions.LMRateLimitError("slow down")).error.retryable is True


def test_remaining_seconds() -> None:
    request = _request()
    assert remaining_seconds({**request, "deadline_at": None}) is None
    assert 0 < (remaining_seconds(request) or 0) <= 30
    assert (
        remaining_seconds({**request, "deadline_at": times.now() - timedelta(seconds=1)}) or 0
    ) < 0


def test_backend_overrides_from_variables() -> None:
    assert backend_overrides({}) == {}
    assert backend_overrides({"temperature": "0.7", "max_tokens": "64", "x": "1"}) == {
        "temperature": 0.7,
        "max_tokens": 64,
    }
    with pytest.raises(InvalidRequest, match=r"variables\.temperature"):
        backend_overrides({"temperature": '"hot"'})


# -- the pipeline -------------------------------------------------------------------------


async def _pipeline(
    executor: FakeExecutor,
    producer: FakeProducer,
    *origins: Consumed,
    to: Destinations = TO,
    audit: FakeProducer | None = None,
) -> WorkerHandler:
    loop = asyncio.get_running_loop()
    publisher = Publisher(producer, SERDE, loop)
    handler = WorkerHandler(
        executor=executor,
        publisher=publisher,
        serde=SERDE,
        destinations=to,
        pool="general",
        worker_id="w1",
        in_flight=4,
        audit_publisher=Publisher(audit, SERDE, loop) if audit is not None else None,
    )
    await _run_handler(handler, *origins)
    return handler


async def _run_handler(handler: WorkerHandler, *origins: Consumed) -> None:
    publishers = {handler._publisher, handler._audit_publisher}
    server = asyncio.create_task(serve_deliveries(*publishers))
    try:
        await asyncio.wait_for(asyncio.gather(*(handler.handle(o) for o in origins)), 5)
    finally:
        server.cancel()


async def test_a_request_is_answered_audited_and_measured() -> None:
    request = _request()
    producer = FakeProducer()
    await _pipeline(FakeExecutor(), producer, _origin(request))
    (response,) = producer.records(TO.responses)
    assert response["status"] == "ok"
    assert response["outputs"] == {"answer": json.dumps("echo: What is 2 + 2?")}
    assert len(producer.records(TO.executions)) == 1
    assert len(producer.records(TO.telemetry)) == 1
    assert producer.records(TO.dlq) == []
    keys = {key for _, key, _, _ in producer.produced}
    assert keys == {request["request_id"]}  # telemetry keys by program id, else request id


async def test_an_ok_answer_to_a_cacheable_request_is_offered_to_the_cache() -> None:
    to = Destinations(TO.responses, TO.executions, TO.telemetry, TO.dlq, cache="dspex.cache")
    cacheable, uncached, failing = _request(), _request(), _request()
    cacheable["route"]["cache_key"] = "sha256:k1"
    uncached["route"]["cache_key"] = None
    failing["route"]["cache_key"] = "sha256:k2"

    async def answer(request: Mapping[str, Any], on_chunk: Any) -> Outcome:
        if request["request_id"] == failing["request_id"]:
            raise InvalidRequest("inputs.question", "must not be empty")
        return Outcome({"answer": "4"})

    producer = FakeProducer()
    origins = [_origin(r) for r in (cacheable, uncached, failing)]
    await _pipeline(FakeExecutor(answer), producer, *origins, to=to)
    assert len(producer.records(TO.responses)) == 3
    (entry,) = producer.records("dspex.cache")
    (final,) = [r for r in producer.records(TO.responses) if r["request_id"] == entry["request_id"]]
    assert entry == final and entry["request_id"] == cacheable["request_id"]
    assert [p.key for p in producer.raw("dspex.cache")] == ["sha256:k1"]


async def test_execution_and_telemetry_go_through_the_audit_publisher() -> None:
    # the worker batches them (kafka.audit_linger_ms); answers leave at kafka.linger_ms
    answers, audit = FakeProducer(), FakeProducer()
    await _pipeline(FakeExecutor(), answers, _origin(_request()), audit=audit)
    assert set(answers.topics()) == {TO.responses}
    assert sorted(audit.topics()) == [TO.executions, TO.telemetry]


async def test_a_reply_topic_replaces_the_responses_topic() -> None:
    producer = FakeProducer()
    await _pipeline(FakeExecutor(), producer, _origin(_request(reply_topic="app.replies")))
    assert len(producer.records("app.replies")) == 1
    assert producer.records(TO.responses) == []


async def test_streaming_produces_ordered_chunks_then_the_final() -> None:
    async def stream(request: Mapping[str, Any], on_chunk: Any) -> Outcome:
        for piece in ("Pa", "ri", "s"):
            await on_chunk(piece)
        return Outcome({"answer": "Paris"})

    producer = FakeProducer()
    await _pipeline(FakeExecutor(stream), producer, _origin(_request(stream=True)))
    chunks = producer.records(TO.responses)
    assert [(c["seq"], c["final"], c["delta"]) for c in chunks] == [
        (0, False, "Pa"),
        (1, False, "ri"),
        (2, False, "s"),
        (3, True, ""),
    ]


async def test_undecodable_bytes_are_dead_lettered() -> None:
    producer = FakeProducer()
    await _pipeline(FakeExecutor(), producer, _origin(value=b"\xc3\x01garbage"))
    (letter,) = producer.records(TO.dlq)
    assert letter["stage"] == "decode"
    assert letter["error_class"] == CorruptRecord.__name__
    assert letter["original_value"] == b"\xc3\x01garbage"
    assert producer.records(TO.responses) == []


async def test_an_expired_deadline_answers_timeout_without_running() -> None:
    executor = FakeExecutor()
    producer = FakeProducer()
    late = _request(deadline_at=times.now() - timedelta(seconds=1))
    await _pipeline(executor, producer, _origin(late))
    assert executor.calls == Counter()
    (response,) = producer.records(TO.responses)
    assert response["status"] == "timeout"
    assert response["error"]["error_class"] == "DeadlineExceeded"
    assert producer.records(TO.telemetry)[0]["success"] is False
    assert producer.records(TO.dlq) == []


async def test_a_request_that_expired_waiting_in_the_pool_topic_answers_overloaded() -> None:
    executor = FakeExecutor()
    producer = FakeProducer()
    waited = _request(
        created_at=times.now() - timedelta(seconds=10),
        deadline_at=times.now() - timedelta(seconds=1),
    )
    await _pipeline(executor, producer, _origin(waited))
    assert executor.calls == Counter()
    (response,) = producer.records(TO.responses)
    assert response["status"] == "overloaded"
    assert response["error"]["error_class"] == "Overloaded"
    assert "waited" in response["error"]["message"] and response["error"]["stage"] == "queue"
    assert producer.records(TO.telemetry)[0]["error_class"] == "Overloaded"


async def test_a_slow_program_times_out_at_the_deadline() -> None:
    async def slow(request: Mapping[str, Any], on_chunk: Any) -> Outcome:
        await asyncio.sleep(10)
        raise AssertionError("not reached")

    producer = FakeProducer()
    # not passed before it starts, even on a busy machine
    soon = _request(deadline_at=times.now() + timedelta(seconds=2))
    await _pipeline(FakeExecutor(slow), producer, _origin(soon))
    (response,) = producer.records(TO.responses)
    assert response["status"] == "timeout"


async def test_a_failing_program_is_answered_with_an_error_and_dead_lettered() -> None:
    async def broken(request: Mapping[str, Any], on_chunk: Any) -> Outcome:
        raise InvalidRequest("inputs.question", "must not be empty")

    producer = FakeProducer()
    await _pipeline(FakeExecutor(broken), producer, _origin(_request()))
    (response,) = producer.records(TO.responses)
    assert response["status"] == "error"
    assert response["error"]["field"] == "inputs.question"
    assert response["error"]["stage"] == "execute"
    assert producer.records(TO.executions)[0]["error"]["error_class"] == "InvalidRequest"
    assert producer.records(TO.dlq)[0]["stage"] == "execute"


async def test_the_same_request_twice_is_answered_once() -> None:
    request = _request()
    executor = FakeExecutor()
    producer = FakeProducer()
    handler = await _pipeline(executor, producer, _origin(request), _origin(request))
    await _run_handler(handler, _origin(request))  # a later redelivery too
    assert executor.calls == Counter({request["request_id"]: 1})
    assert len(producer.records(TO.responses)) == 1


async def test_a_broker_that_refuses_our_topics_raises_delivery_failed() -> None:
    producer = FakeProducer(fail_topics=(TO.executions,))
    with pytest.raises(DeliveryFailed, match=r"dspex\.executions"):
        await _pipeline(FakeExecutor(), producer, _origin(_request()))


async def test_an_unwritable_reply_topic_is_dead_lettered() -> None:
    producer = FakeProducer(fail_topics=("app.missing",))
    await _pipeline(FakeExecutor(), producer, _origin(_request(reply_topic="app.missing")))
    (letter,) = producer.records(TO.dlq)
    assert letter["stage"] == "produce"


def test_answers_with_a_gold_label_are_scored_by_the_named_metric() -> None:
    t = times.now()
    ok = ExecutionResult("ok", t, t, t, outputs={"answer": "The Paris!"})

    def scored(metadata: dict[str, str], result: ExecutionResult = ok) -> float | None:
        return score_against_gold({"request_id": "r", "metadata": metadata}, result)

    assert scored({"dspex.gold": json.dumps({"answer": "the paris"})}) == 1.0  # exact_match
    assert scored(
        {"dspex.gold": json.dumps({"answer": "Paris, France"}), "dspex.metric": "f1"}
    ) == (pytest.approx(0.5))
    assert scored({}) is None
    assert (
        scored({"dspex.gold": json.dumps({"answer": "x"})}, ExecutionResult("error", t, t, t))
        is None
    )
    for bad in ({"dspex.gold": "not json"}, {"dspex.gold": "[1]"}, {"dspex.gold": "{}"}):
        assert scored(bad) is None
    assert scored({"dspex.gold": json.dumps({"answer": "x"}), "dspex.metric": "nope"}) is None


def test_audit_and_dead_letters_stay_under_the_broker_limit_for_huge_requests() -> None:
    t = times.now()
    huge = json.dumps("z" * 900_000)
    request = {**sample("Request"), "inputs": {"question": huge, "small": json.dumps("ok")}}
    result = ExecutionResult(
        "ok", t, t, t, outputs={"answer": "y" * 900_000}, trace=[{"x": "w" * 400_000}]
    )
    execution = records.execution(request, result, worker_id="w", pool="general")
    stand_in = json.loads(execution["inputs"]["question"])["dspex.omitted"]
    assert stand_in["bytes"] == len(huge) and len(stand_in["sha256"]) == 64
    assert execution["inputs"]["small"] == json.dumps("ok")
    assert "dspex.omitted" in execution["outputs"]["answer"]
    assert "dspex.omitted" in (execution["trace_json"] or "")
    serde = SingleObjectSerde()
    assert len(serde.encode("Execution", execution, topic="t")) < 10_000

    origin = Consumed("dspex.pool.general", 2, 17, b"k", b"v" * 600_000)
    letter = records.dead_letter(origin, ErrorInfo("Boom", "m", None, "worker"), component="w")
    assert letter["original_value"] is None and letter["original_value_omitted"]
    assert letter["original_value_bytes"] == 600_000
    assert (letter["original_partition"], letter["original_offset"]) == (2, 17)
    small = records.dead_letter(
        Consumed("t", 0, 1, None, b"abc"), ErrorInfo("Boom", "m"), component="w"
    )
    assert small["original_value"] == b"abc" and not small["original_value_omitted"]
    assert len(serde.encode("DeadLetter", letter, topic="t")) < 10_000


def test_the_memory_in_a_health_sample_is_read_at_most_once_per_max_age(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    readings = iter([100, 200, 300])
    monkeypatch.setattr(records, "rss_bytes", lambda: next(readings))
    monkeypatch.setattr(records, "_rss_sample", [])
    first = records.health_sample(1, "closed")["memory_bytes"]
    again = [records.health_sample(1, "closed")["memory_bytes"] for _ in range(50)]
    assert first == 100 and set(again) == {100}  # one /proc read for 51 samples
    assert records.recent_rss_bytes(max_age_s=0.0) == 200  # an old reading is read again
    assert records.rss_bytes() == 300  # the uncached reading stays available


async def test_each_backend_that_gave_up_is_measured_for_the_learning_agent() -> None:
    from dspex.agents.worker.faults import BackendFailure, BackendsExhausted

    answered_by_fallback, failed_everywhere = _request(), _request()

    async def run(request: Mapping[str, Any], on_chunk: Any) -> Outcome:
        if request["request_id"] == answered_by_fallback["request_id"]:
            return Outcome({"answer": "4"}, variant="backup", failed_variants=(("main", "X"),))
        failures = [
            BackendFailure("main", "X", "down", 3),
            BackendFailure("backup", "Y", "down", 3),
        ]
        raise BackendsExhausted(failures, "open")

    producer = FakeProducer()
    origins = [_origin(answered_by_fallback), _origin(failed_everywhere)]
    await _pipeline(FakeExecutor(run), producer, *origins)
    seen = [
        (r["request_id"], r["kind"], r["variant"], r["success"], r["error_class"])
        for r in producer.records(TO.telemetry)
    ]
    first, second = answered_by_fallback["request_id"], failed_everywhere["request_id"]
    assert [s for s in seen if s[0] == first] == [
        (first, "attempt", "main", False, "X"),
        (first, "execution", "backup", True, None),
    ]
    route_variant = failed_everywhere["route"]["variant"]
    by_variant = {s[2]: s for s in seen if s[0] == second}
    assert by_variant[route_variant][1] == "execution"
    assert {v for v, s in by_variant.items() if s[1] == "attempt"} == {"main", "backup"} - {
        route_variant
    }
