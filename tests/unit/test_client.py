"""The client's pure parts, without a broker: request records, chunk order, the dispatcher."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from dspex.streams.client._replies import ChunkAssembler, Dispatcher, Inbox
from dspex.streams.client._requests import build_request, json_map, request_headers, request_key
from dspex.streams.client.client import (
    Chunk,
    ClientClosed,
    Program,
    RequestFailed,
    RequestTimeout,
    Result,
)
from dspex.streams.errors import InvalidRequest
from dspex.streams.serde import SingleObjectSerde

TOPIC = "dspex.requests"


def chunk(seq: int, *, final: bool = False, rid: str = "r1", delta: str = "") -> Chunk:
    status = "ok" if final else "progress"
    outputs = {"answer": "abc"} if final else None
    return Chunk(rid, seq, final, status, delta or f"d{seq}", outputs, None, False, "general")


def inbox(rid: str = "r1", wait_s: float = 5.0) -> Inbox:
    loop = asyncio.get_running_loop()
    return Inbox(rid, datetime.now(UTC), loop.time() + wait_s, 0.0)


# --- programs ---------------------------------------------------------------------------


def test_program_helpers_name_registered_and_inline_programs() -> None:
    assert Program.registered("qa", version=3) == Program(program_id="qa", version=3)
    inline = Program.inline("question -> answer", module_type="ChainOfThought", tools=("search",))
    assert inline.signature == "question -> answer"
    assert inline.module_type == "ChainOfThought"
    assert inline.tools == ("search",)
    assert Program.of("qa") == Program.registered("qa")
    assert Program.of(inline) is inline


def test_program_must_name_something() -> None:
    with pytest.raises(InvalidRequest) as info:
        Program()
    assert info.value.field == "program"


# --- requests ---------------------------------------------------------------------------


def test_request_record_is_valid_against_the_schema() -> None:
    serde = SingleObjectSerde()
    record = build_request(
        Program.inline("question -> answer", state_json="{}", tools=("search",)),
        {"question": "Capital of France?", "k": 3},
        stream=True,
        reply_topic="my.replies",
        deadline_s=5,
        session_id="s-1",
        variables={"temperature": 0.2},
        pool_hint="gpu",
        cache=False,
        metadata={"tenant": "acme"},
    )
    decoded = serde.decode(serde.encode("Request", record, topic=TOPIC), topic=TOPIC)
    assert decoded.record == record
    assert record["inputs"] == {"question": '"Capital of France?"', "k": "3"}
    assert record["variables"] == {"temperature": "0.2"}
    assert record["deadline_at"] - record["created_at"] == timedelta(seconds=5)
    assert (record["stream"], record["cache"], record["pool_hint"]) == (True, False, "gpu")
    assert record["tools"] == ["search"]


def test_registered_program_request_has_fresh_uuid_and_defaults() -> None:
    first = build_request("qa", {"q": 1})
    second = build_request(Program.registered("qa", 2), {"q": 1})
    assert uuid.UUID(first["request_id"]).version == 4
    assert first["request_id"] != second["request_id"]
    assert (first["program_id"], first["program_version"]) == ("qa", None)
    assert second["program_version"] == 2
    assert first["signature"] is None and first["reply_topic"] is None
    assert first["stream"] is False and first["cache"] is True
    assert first["deadline_at"] - first["created_at"] == timedelta(seconds=30)
    SingleObjectSerde().encode("Request", first, topic=TOPIC)


def test_key_is_session_else_request_id() -> None:
    plain = build_request("qa", {})
    session = build_request("qa", {}, session_id="s-9")
    assert request_key(plain) == plain["request_id"].encode()
    assert request_key(session) == b"s-9"


def test_headers_follow_the_contract() -> None:
    shared = build_request("qa", {})
    own = build_request("qa", {}, reply_topic="app.replies")
    assert request_headers(shared) == [
        ("dspex-request-id", shared["request_id"].encode()),
        ("content-type", b"application/vnd.dspex.request+avro"),
    ]
    assert ("dspex-reply-topic", b"app.replies") in request_headers(own)


@pytest.mark.parametrize(
    "value", ["Paris", 0.93, [1, 2], {"a": None}, True, None], ids=lambda v: type(v).__name__
)
def test_inputs_are_json_encoded(value: Any) -> None:
    assert json.loads(json_map("inputs", {"x": value})["x"]) == value


@pytest.mark.parametrize("bad", [object(), float("nan"), {1, 2}], ids=["object", "nan", "set"])
def test_inputs_json_cannot_carry_are_refused_with_their_field(bad: Any) -> None:
    with pytest.raises(InvalidRequest) as info:
        build_request("qa", {"question": bad})
    assert info.value.field == "inputs.question"


@pytest.mark.parametrize("deadline", [0, -1, float("inf")])
def test_bad_deadline_is_refused(deadline: float) -> None:
    with pytest.raises(InvalidRequest) as info:
        build_request("qa", {}, deadline_s=deadline)
    assert info.value.field == "deadline_s"


def test_unknown_option_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="deadline"):
        build_request("qa", {}, deadline=3)


# --- chunks and results ----------------------------------------------------------------------


def test_chunk_from_record_decodes_outputs() -> None:
    record = {
        "request_id": "r1",
        "seq": 2,
        "final": True,
        "status": "ok",
        "delta": "",
        "outputs": {"answer": '"Paris"', "confidence": "0.9", "raw": "not json"},
        "error": None,
        "cached": True,
        "pool": None,
        "program_version": 4,
    }
    got = Chunk.from_record(record)
    assert got.outputs == {"answer": "Paris", "confidence": 0.9, "raw": "not json"}
    assert (got.cached, got.pool, got.program_version) == (True, None, 4)


def test_result_concatenates_deltas_and_takes_the_final_chunk() -> None:
    chunks = [chunk(0, delta="a"), chunk(1, delta="b"), chunk(2, final=True, delta="c")]
    result = Result.from_chunks(chunks, 0.5)
    assert (result.text, result.outputs, result.chunks) == ("abc", {"answer": "abc"}, 3)
    assert (result.status, result.pool, result.elapsed_s) == ("ok", "general", 0.5)


def test_request_failed_names_the_error() -> None:
    error = {"error_class": "InvalidRequest", "message": "bad", "field": "inputs.q"}
    final = Chunk("r1", 0, True, "error", "", None, {**error, "stage": "validate"}, False, None)
    failed = RequestFailed(Result.from_chunks([final], 0.1), final.error)
    assert (failed.field, failed.stage, failed.error_class) == (
        "inputs.q",
        "validate",
        "InvalidRequest",
    )
    assert "request_id=r1" in str(failed) and "field=inputs.q" in str(failed)


# --- ordering and dedupe ----------------------------------------------------------------------


def test_assembler_orders_by_seq() -> None:
    assembler = ChunkAssembler()
    assert assembler.push(chunk(2)) == []
    assert assembler.push(chunk(1)) == []
    assert [c.seq for c in assembler.push(chunk(0))] == [0, 1, 2]
    assert [c.seq for c in assembler.push(chunk(3, final=True))] == [3]
    assert assembler.done


def test_assembler_drops_duplicates_and_anything_after_final() -> None:
    assembler = ChunkAssembler()
    delivered = []
    for seq in [0, 0, 2, 1, 2, 1, 0]:
        delivered += assembler.push(chunk(seq))
    delivered += assembler.push(chunk(3, final=True))
    delivered += assembler.push(chunk(3, final=True))
    delivered += assembler.push(chunk(4))
    assert [c.seq for c in delivered] == [0, 1, 2, 3]


def test_assembler_final_waits_behind_a_gap_until_flushed() -> None:
    assembler = ChunkAssembler()
    assembler.push(chunk(0))
    assert assembler.push(chunk(2, final=True)) == []
    assert assembler.has_final
    assert [c.seq for c in assembler.flush()] == [2]
    assert assembler.done and assembler.push(chunk(1)) == []


# --- dispatcher ---------------------------------------------------------------------------


async def test_dispatcher_routes_by_request_id_and_ignores_unknown_ids() -> None:
    dispatcher = Dispatcher()
    box = dispatcher.open(inbox("r1"))
    dispatcher.deliver(chunk(0, rid="someone-else"))
    dispatcher.deliver(chunk(1, rid="r1", final=True))
    dispatcher.deliver(chunk(0, rid="r1"))
    assert [(await box.next()).seq, (await box.next()).seq] == [0, 1]
    dispatcher.discard("r1")
    dispatcher.deliver(chunk(0, rid="r1"))  # late duplicate: ignored, no error
    assert len(dispatcher) == 0


async def test_inbox_times_out_at_its_deadline() -> None:
    box = inbox("r-slow", wait_s=0.2)
    box.put(chunk(0, rid="r-slow"))
    assert (await box.next()).seq == 0
    started = time.monotonic()
    with pytest.raises(RequestTimeout) as info:
        await box.next()
    assert 0.1 < time.monotonic() - started < 1.0
    assert info.value.request_id == "r-slow"
    assert "r-slow" in str(info.value) and "1 chunk(s)" in str(info.value)


async def test_inbox_notes_when_its_final_chunk_became_deliverable() -> None:
    # submit_many collects answers in input order: a request's elapsed time must
    # end when its own final chunk came, not when the caller got round to it
    box = inbox()
    box.put(chunk(0))
    assert box.answered_at is None
    box.put(chunk(2, final=True))  # behind a gap: not deliverable yet
    assert box.answered_at is None
    before = time.monotonic()
    box.put(chunk(1))
    assert box.answered_at is not None and before <= box.answered_at <= time.monotonic()


async def test_inbox_delivers_a_final_chunk_stuck_behind_a_gap_at_the_deadline() -> None:
    box = inbox("r1", wait_s=0.1)
    box.put(chunk(1))
    box.put(chunk(3, final=True))
    assert [(await box.next()).seq, (await box.next()).seq] == [1, 3]


async def test_closing_the_dispatcher_wakes_waiters_with_client_closed() -> None:
    dispatcher = Dispatcher()
    box = dispatcher.open(inbox("r1"))
    waiter = asyncio.create_task(box.next())
    await asyncio.sleep(0)
    dispatcher.close(ClientClosed("closed"))
    with pytest.raises(ClientClosed):
        await waiter
    with pytest.raises(ClientClosed):
        dispatcher.open(inbox("r2"))
