"""The client against a real broker, answered by a tiny in-test responder thread.

The responder stands in for the router and workers: it reads the requests topic
and answers each request with chunks "a", "b", "c" and a final chunk whose
outputs are {"answer": "abc", "n": <the request's input n>}, on the responses
topic or the request's reply_topic. Modes make it shuffle and duplicate its
chunks, answer with an error, or stay silent.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from dspex.streams import kafka
from dspex.streams.client.client import (
    AsyncClient,
    Client,
    ClientClosed,
    Program,
    RequestFailed,
    RequestTimeout,
    Result,
)
from dspex.streams.errors import InvalidRequest
from dspex.streams.ops.admin import TopicReport
from dspex.streams.serde import Serde, make_serde
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics
from tests.integration.tail import OpenTail, Tail

CreateTopics = Callable[[], list[TopicReport]]
INLINE = Program.inline("question -> answer")


@dataclass
class Responder:
    """Answers every request on the requests topic; ``mode`` picks how."""

    settings: Settings
    mode: str = "ok"  # ok | shuffled | error | silent
    seen: list[tuple[dict[str, Any], dict[str, bytes]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.topics = Topics(self.settings.topics)
        self.serde: Serde = make_serde(self.settings)
        self.producer = kafka.producer(self.settings)
        self.consumer = kafka.consumer(self.settings, f"responder-{uuid.uuid4().hex}")
        requests = self.topics.name("requests")
        partitions = self.consumer.list_topics(requests, timeout=10).topics[requests].partitions
        self.consumer.assign([TopicPartition(requests, p, OFFSET_BEGINNING) for p in partitions])
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)
        self.producer.flush(10)

    def _run(self) -> None:
        consumer: Consumer = self.consumer
        try:
            while not self._stop.is_set():
                message = consumer.poll(0.1)
                if message is not None and message.error() is None:
                    self._answer(message.value() or b"", _headers(message.headers()))
                self.producer.poll(0)
        finally:
            consumer.close()

    def _answer(self, value: bytes, headers: dict[str, bytes]) -> None:
        topic = self.topics.name("requests")
        request = self.serde.decode(value, topic=topic, expect="Request").record
        self.seen.append((request, headers))
        if self.mode == "silent":
            return
        reply_topic = request["reply_topic"] or self.topics.name("responses")
        chunks = self._chunks(request)
        if self.mode == "shuffled":
            chunks = chunks + chunks[:2]
            random.shuffle(chunks)
        for record in chunks:
            data = self.serde.encode("Response", record, topic=reply_topic)
            self.producer.produce(reply_topic, data, request["request_id"].encode())

    def _chunks(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        rid = request["request_id"]
        if self.mode == "error":
            error = {
                "error_class": "InvalidRequest",
                "message": "no such field",
                "field": "inputs.q",
            }
            return [_response(rid, 0, final=True, status="error", error=error)]
        outputs = {"answer": json.dumps("abc"), "n": request["inputs"].get("n", "null")}
        progress = [_response(rid, i, delta=d) for i, d in enumerate("abc")]
        return [*progress, _response(rid, 3, final=True, outputs=outputs)]


def _headers(raw: Any) -> dict[str, bytes]:
    return {key: value for key, value in raw or []}


def _response(rid: str, seq: int, *, final: bool = False, **fields: Any) -> dict[str, Any]:
    record = {
        "request_id": rid,
        "seq": seq,
        "final": final,
        "status": "ok" if final else "progress",
        "delta": "",
        "outputs": None,
        "error": None,
        "cached": False,
        "program_id": None,
        "program_version": None,
        "pool": "general",
        "produced_at": datetime.now(UTC),
    }
    return {**record, **fields}


@pytest.fixture
def responder(settings: Settings, create_topics: CreateTopics) -> Iterator[Responder]:
    create_topics()
    answering = Responder(settings)
    yield answering
    answering.stop()


def _check(result: Result | Exception, n: int | None = None) -> None:
    assert isinstance(result, Result), result
    assert (result.status, result.outputs["answer"], result.text) == ("ok", "abc", "abc")
    assert result.chunks == 4 and result.pool == "general"
    if n is not None:
        assert result.outputs["n"] == n


async def test_submit_returns_the_result(responder: Responder, settings: Settings) -> None:
    async with AsyncClient(settings) as client:
        result = await client.submit(INLINE, {"question": "q", "n": 7}, deadline_s=20)
    _check(result, 7)
    request, headers = responder.seen[0]
    assert result.request_id == request["request_id"]
    assert request["stream"] is False and request["inputs"]["question"] == '"q"'
    assert headers["dspex-request-id"] == request["request_id"].encode()
    assert headers["content-type"] == b"application/vnd.dspex.request+avro"
    assert "dspex-reply-topic" not in headers


async def test_stream_yields_ordered_chunks_ending_in_final(
    responder: Responder, settings: Settings
) -> None:
    async with AsyncClient(settings) as client:
        chunks = [c async for c in client.stream(INLINE, {"question": "q"}, deadline_s=20)]
    assert [c.seq for c in chunks] == [0, 1, 2, 3]
    assert [c.final for c in chunks] == [False, False, False, True]
    assert chunks[-1].outputs is not None
    assert "".join(c.delta for c in chunks) == chunks[-1].outputs["answer"]
    assert responder.seen[0][0]["stream"] is True


def test_shuffled_and_duplicated_chunks_arrive_once_in_order(
    responder: Responder, settings: Settings
) -> None:
    responder.mode = "shuffled"
    with Client(settings) as client:
        for _ in range(5):
            chunks = list(client.stream(INLINE, {"question": "q"}, deadline_s=20))
            assert [c.seq for c in chunks] == [0, 1, 2, 3]
            assert "".join(c.delta for c in chunks) == "abc"
            _check(client.submit(INLINE, {"n": 1}, deadline_s=20), 1)


def test_undecodable_replies_are_logged_and_skipped(
    responder: Responder, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    responses = Topics(settings.topics).name("responses")
    with Client(settings) as client:
        garbage = kafka.producer(settings)
        garbage.produce(responses, b"\xc3\x01not avro at all", b"k")
        garbage.produce(responses, b"", b"k")
        assert garbage.flush(10) == 0
        _check(client.submit(INLINE, {"n": 2}, deadline_s=20), 2)
        stream = client.stream(INLINE, {"n": 3}, deadline_s=20)
        assert next(stream).seq == 0
        stream.close()  # leaving a stream early releases it
        _check(client.submit(INLINE, {"n": 4}, deadline_s=20), 4)
    skipped = [r.getMessage() for r in caplog.records if "undecodable reply" in r.getMessage()]
    assert len(skipped) == 2
    assert all(f"topic={responses} partition=" in m and "offset=" in m for m in skipped)


async def test_close_wakes_waiting_requests(responder: Responder, settings: Settings) -> None:
    responder.mode = "silent"
    client = AsyncClient(settings)
    await client.start()
    waiting = asyncio.create_task(client.submit(INLINE, {"n": 1}, deadline_s=30))
    while not responder.seen:
        await asyncio.sleep(0.05)
    started = time.monotonic()
    await client.close()
    with pytest.raises(ClientClosed):
        await waiting
    assert time.monotonic() - started < 5
    with pytest.raises(ClientClosed):
        await client.submit(INLINE, {"n": 2})


def test_submit_many_matches_fifty_answers_by_id(responder: Responder, settings: Settings) -> None:
    with Client(settings) as client:
        started = time.monotonic()
        results = client.submit_many([(INLINE, {"n": n}) for n in range(50)], deadline_s=30)
        elapsed = time.monotonic() - started
    print(f"submit_many: sent=50 answered={len(results)} in {elapsed:.2f}s")
    for n, result in enumerate(results):
        _check(result, n)
    assert len({r.request_id for r in results if isinstance(r, Result)}) == 50


async def test_submit_many_returns_a_bad_request_in_its_place_and_keeps_no_inbox(
    responder: Responder, settings: Settings
) -> None:
    requests: list[tuple[Program, dict[str, Any]]] = [
        (INLINE, {"n": 0}),
        (INLINE, {"n": float("nan")}),
        (INLINE, {"n": 2}),
    ]
    async with AsyncClient(settings) as client:
        results = await client.submit_many(requests, deadline_s=30)
        assert len(client._dispatcher) == 0  # every inbox discarded once answered
    assert isinstance(results[1], InvalidRequest) and results[1].field == "inputs.n"
    for n in (0, 2):
        result = results[n]
        _check(result, n)
        assert isinstance(result, Result) and 0 < result.elapsed_s < 30


async def test_unanswered_request_times_out_within_deadline_and_grace(
    responder: Responder, settings: Settings
) -> None:
    responder.mode = "silent"
    async with AsyncClient(settings, grace_s=2.0) as client:
        started = time.monotonic()
        with pytest.raises(RequestTimeout) as info:
            await client.submit(INLINE, {"question": "anyone?"}, deadline_s=1.0)
        waited = time.monotonic() - started
    assert 1.0 <= waited < 1.0 + 2.0 + 1.5
    assert info.value.request_id == responder.seen[0][0]["request_id"]


async def test_error_final_chunk_raises_request_failed(
    responder: Responder, settings: Settings
) -> None:
    responder.mode = "error"
    async with AsyncClient(settings) as client:
        with pytest.raises(RequestFailed) as info:
            await client.submit("qa", {"q": 1}, deadline_s=20)
        many = await client.submit_many([("qa", {"q": 1})], deadline_s=20)
    assert info.value.field == "inputs.q"
    assert info.value.error_class == "InvalidRequest"
    assert info.value.result.status == "error"
    assert isinstance(many[0], RequestFailed)


def test_reply_topic_carries_the_answers(
    responder: Responder, settings: Settings, admin: AdminClient
) -> None:
    reply_topic = f"{settings.topics.prefix}replies.{uuid.uuid4().hex[:8]}"
    admin.create_topics([NewTopic(reply_topic, 2, 1)])[reply_topic].result(30)
    try:
        with Client(settings, reply_topic=reply_topic) as client:
            _check(client.submit(INLINE, {"n": 3}, deadline_s=20), 3)
        request, headers = responder.seen[0]
        assert request["reply_topic"] == reply_topic
        assert headers["dspex-reply-topic"] == reply_topic.encode()
    finally:
        admin.delete_topics([reply_topic])[reply_topic].result(30)


async def test_two_clients_on_the_shared_topic_each_get_only_their_answers(
    responder: Responder, settings: Settings
) -> None:
    async with AsyncClient(settings) as one, AsyncClient(settings) as two:
        first = await one.submit_many([(INLINE, {"n": n}) for n in range(10)], deadline_s=20)
        second = await two.submit_many([(INLINE, {"n": n}) for n in range(10, 20)], deadline_s=20)
    for n, result in enumerate([*first, *second]):
        _check(result, n)


def test_publish_program_numbers_versions(
    settings: Settings, create_topics: CreateTopics, tails: OpenTail
) -> None:
    create_topics()
    with Client(settings) as client:
        first = client.publish_program("qa", "question -> answer", description="first")
        second = client.publish_program("qa", "question -> answer", module_type="ChainOfThought")
        other = client.publish_program("other", "x -> y")
    assert (first, second, other) == (1, 2, 1)
    programs = tails(["programs"], from_beginning=True)
    programs.catch_up()  # the client returned once the broker had them: all 3 are there
    assert sorted(_program_versions_of(programs, make_serde(settings), "qa", expected=3)) == [1, 2]


def _program_versions_of(programs: Tail, serde: Serde, program_id: str, expected: int) -> list[int]:
    """The versions of ``program_id`` on the programs topic, which holds ``expected`` records."""
    messages = programs.messages("programs")
    assert len(messages) == expected and programs.errors == []
    versions: list[int] = []
    for message in messages:
        topic = str(message.topic())
        record = serde.decode(message.value() or b"", topic=topic, expect="ProgramVersion").record
        if record["program_id"] == program_id:
            assert message.key() == program_id.encode()
            versions.append(record["version"])
    return versions


async def test_async_publish_program_after_existing_versions(
    settings: Settings, create_topics: CreateTopics
) -> None:
    create_topics()
    async with AsyncClient(settings) as client:
        assert await client.publish_program("qa", "question -> answer") == 1
        assert await client.publish_program("qa", "question -> answer", version=5) == 5
        assert await client.publish_program("qa", "question -> answer") == 6
