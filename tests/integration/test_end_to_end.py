"""End to end on a real broker: client -> requests -> router -> pool.<x> -> worker -> client.

Nothing is mocked: the router and the pool workers run as ``python -m dspex.agents ...``
subprocesses (:mod:`tests.integration.stack`) with this test's topic prefix, the
client is :mod:`dspex.streams.client.client`, and programs run through DSPy. Every test but
the GPU smoke routes all pools to ``dspex/echo`` (the deterministic simulation:
a ``str`` output is ``"echo: "`` + the first input), so answers are exact. A
separate consumer tails the output topics to count what was really produced, and
the reliability figures are printed (run with ``-s`` to see them). Before a test
counts what was *not* produced, it waits until every agent has committed all it
consumed (:meth:`Stack.wait_idle`) and the tail has read the topics to their end.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from dspex.streams import kafka
from dspex.streams.client.client import AsyncClient, Program, RequestFailed, Result
from dspex.streams.ops.admin import TopicReport
from dspex.streams.serde import make_serde
from dspex.streams.settings import Settings, load_settings
from dspex.streams.topics import Topics
from tests.integration.stack import POOLS, Stack
from tests.integration.tail import OpenTail, Tail, end_offsets, wait_for_records

CreateTopics = Callable[[], list[TopicReport]]
StartStack = Callable[..., Stack]
"""``start_stack(settings, pools, pipeline=False)``."""
INLINE = Program.inline("question -> answer")
POOL_TOPICS = [f"pool.{pool}" for pool in POOLS]


def echo_settings(settings: Settings, **router: Any) -> Settings:
    """The test's broker and prefix, every pool on the echo simulation."""
    return load_settings(
        kafka={"bootstrap_servers": settings.kafka.bootstrap_servers},
        topics={"prefix": settings.topics.prefix},
        lm={"pool_variants": {}},
        router=router,
    )


@pytest.fixture
def start_stack(create_topics: CreateTopics, tmp_path: Path) -> Iterator[StartStack]:
    """Factory: create the topics, start router + workers; always stop them afterwards.

    Teardown fails the test when a process did not stop cleanly on SIGTERM.
    """
    stacks: list[Stack] = []

    def start(settings: Settings, pools: Sequence[str], *, pipeline: bool = False) -> Stack:
        create_topics()
        stack = Stack(settings, pools, tmp_path, pipeline=pipeline)
        stacks.append(stack)
        stack.start()
        return stack

    yield start
    for stack in stacks:
        stack.stop()
        _delete_internal_topics(stack.settings)
    for stack in stacks:
        unclean = {n: c for n, c in stack.exit_codes.items() if c != 0}
        assert not unclean and not stack.killed, (unclean, stack.killed, stack.log_tails())


def _delete_internal_topics(settings: Settings) -> None:
    """The router's faust topics (changelog, assignor); the catalog's go with create_topics."""
    admin = kafka.admin_client(settings)
    catalog = {name for name, _ in Topics(settings.topics).all()}
    prefix = settings.topics.prefix
    internal = [
        t for t in admin.list_topics(timeout=10).topics if t.startswith(prefix) and t not in catalog
    ]
    if internal:
        for future in admin.delete_topics(internal, operation_timeout=30).values():
            future.result()


def _finals(tail: Tail) -> list[dict[str, Any]]:
    return [r for r in tail.of("responses") if r["final"]]


def _question(label: str) -> str:
    return f"{label} {uuid.uuid4().hex[:8]}"


async def test_300_requests_over_three_pools_answered_exactly_once(
    settings: Settings, start_stack: StartStack, tails: OpenTail
) -> None:
    settings = echo_settings(settings)
    stack = start_stack(settings, POOLS)
    tail = tails(["responses", "executions", "dlq"], settings=settings)
    questions = {pool: [_question(f"{pool} #{n}") for n in range(100)] for pool in POOLS}
    async with AsyncClient(settings) as client:
        batches = await asyncio.gather(
            *(
                client.submit_many(
                    [(INLINE, {"question": q}) for q in questions[pool]],
                    pool_hint=pool,
                    deadline_s=120,
                )
                for pool in POOLS
            )
        )
    sent = {
        result.request_id: (pool, question)
        for pool, results in zip(POOLS, batches, strict=True)
        for result, question in zip(results, questions[pool], strict=True)
        if isinstance(result, Result)
    }
    failures = [r for results in batches for r in results if not isinstance(r, Result)]
    tail.wait(lambda t: len(_finals(t)) >= len(sent), 60, "300 final responses")
    tail.wait(lambda t: len(t.of("executions")) >= len(sent), 60, "300 executions")
    stack.wait_idle()  # every agent committed all it consumed: nothing is redone after this
    tail.catch_up()  # and everything they produced has been read
    stack.check_alive()

    finals = Counter(r["request_id"] for r in _finals(tail))
    executions = Counter(r["request_id"] for r in tail.of("executions"))
    lost = [rid for rid in sent if rid not in finals]
    duplicated = [rid for rid, n in finals.items() if n > 1]
    foreign = [rid for rid in finals if rid not in sent]
    per_pool = Counter(pool for pool, _ in sent.values())
    print(
        f"\nend to end: sent 300 ({dict(per_pool)} ok at the client, {len(failures)} failed), "
        f"answered {len(finals)}, lost {len(lost)}, duplicated {len(duplicated)}, "
        f"executions {sum(executions.values())} for {len(executions)} requests"
    )
    assert failures == []
    assert len(sent) == 300 and per_pool == {pool: 100 for pool in POOLS}
    assert lost == [] and duplicated == [] and foreign == []
    assert executions == Counter(dict.fromkeys(sent, 1))
    assert tail.of("dlq") == []
    for results, pool in zip(batches, POOLS, strict=True):
        for result, question in zip(results, questions[pool], strict=True):
            assert isinstance(result, Result)
            assert result.outputs == {"answer": f"echo: {question}"}
            assert (result.status, result.pool, result.cached) == ("ok", pool, False)
    by_id = {r["request_id"]: r for r in tail.of("executions")}
    assert all(by_id[rid]["pool"] == pool for rid, (pool, _) in sent.items())


async def test_streamed_answer_equals_the_plain_answer(
    settings: Settings, start_stack: StartStack
) -> None:
    settings = echo_settings(settings)
    start_stack(settings, ["general"])
    question = _question("What streams?")
    async with AsyncClient(settings) as client:
        chunks = [c async for c in client.stream(INLINE, {"question": question}, deadline_s=60)]
        plain = await client.submit(INLINE, {"question": question}, cache=False, deadline_s=60)
    text = "".join(chunk.delta for chunk in chunks)
    print(f"\nstreamed: {len(chunks)} chunks {[c.delta for c in chunks]}")
    assert [chunk.seq for chunk in chunks] == list(range(len(chunks)))
    assert [chunk.final for chunk in chunks] == [False] * (len(chunks) - 1) + [True]
    assert len(chunks) > 2  # progress chunks, then the final one
    final = chunks[-1]
    assert (final.status, final.pool, final.cached) == ("ok", "general", False)
    assert (plain.cached, plain.pool, plain.chunks) == (False, "general", 1)
    assert plain.outputs == final.outputs == {"answer": f"echo: {question}"}
    assert text == plain.outputs["answer"]


async def test_invalid_requests_are_answered_and_dead_lettered_while_valid_ones_flow(
    settings: Settings, start_stack: StartStack, tails: OpenTail
) -> None:
    settings = echo_settings(settings, max_request_bytes=2048)
    stack = start_stack(settings, ["general"])
    invalid = {
        "malformed signature": (Program.inline("question answer"), {"question": "x"}, "signature"),
        "unknown module type": (
            Program.inline("question -> answer", module_type="Telepathy"),
            {"question": "x"},
            "module_type",
        ),
        "missing input": (INLINE, {}, "inputs.question"),
        "mistyped input": (Program.inline("n: int -> answer"), {"n": "three"}, "inputs.n"),
        "oversized payload": (INLINE, {"question": "x" * 4096}, "request"),
        "unknown registered program": (
            Program.registered("e2e.nowhere"),
            {"question": "x"},
            "program_id",
        ),
    }
    garbage = b"\xc3\x01 this is not an Avro record"
    calls: list[tuple[str, Program, dict[str, Any]]] = []
    for n, (kind, (program, inputs, _)) in enumerate(invalid.items()):
        calls.append((f"valid {n}", INLINE, {"question": _question(f"valid {n}")}))
        calls.append((kind, program, inputs))
    calls.append(("valid last", INLINE, {"question": _question("valid last")}))
    pools_before = end_offsets(settings, POOL_TOPICS)
    tail = tails(["dlq"], settings=settings)
    producer = kafka.producer(settings)
    producer.produce(Topics(settings.topics).name("requests"), garbage, b"garbage-key")
    assert producer.flush(10) == 0
    async with AsyncClient(settings) as client:
        results = await client.submit_many(
            [(program, inputs) for _, program, inputs in calls], deadline_s=60
        )
    tail.wait(lambda t: len(t.of("dlq")) >= len(invalid) + 1, 30, "dead letters")
    stack.wait_idle()  # the router committed every request: all it will write is written
    tail.catch_up()
    pools_after = end_offsets(settings, POOL_TOPICS)

    outcome = dict(zip([kind for kind, _, _ in calls], results, strict=True))
    valid = {kind: r for kind, r in outcome.items() if kind.startswith("valid")}
    for kind, _, inputs in calls:
        result = valid.get(kind)
        if result is not None:
            assert isinstance(result, Result), (kind, result)
            assert result.outputs == {"answer": f"echo: {inputs['question']}"}
    letters = tail.of("dlq")
    serde = make_serde(settings)
    requests_topic = Topics(settings.topics).name("requests")
    for kind, (_, _, field) in invalid.items():
        error = outcome[kind]
        assert isinstance(error, RequestFailed), (kind, error)
        assert (error.status, error.field, error.stage) == ("error", field, "validate"), kind
        assert error.error_class == "InvalidRequest" and error.result.pool is None
        (letter,) = [d for d in letters if d["request_id"] == error.request_id]
        assert (letter["stage"], letter["component"]) == ("validate", "router"), kind
        assert letter["error_class"] == "InvalidRequest"
        assert field in letter["error_message"], letter["error_message"]
        assert letter["original_topic"] == requests_topic
        original = serde.decode(letter["original_value"], topic=requests_topic).record
        assert original["request_id"] == error.request_id
    (undecodable,) = [d for d in letters if d["request_id"] is None]
    assert (undecodable["stage"], undecodable["component"]) == ("decode", "router")
    assert undecodable["error_class"] in ("CorruptRecord", "SchemaNotFound")
    assert undecodable["original_value"] == garbage
    assert undecodable["original_key"] == b"garbage-key"
    assert len(letters) == len(invalid) + 1
    forwarded = pools_after["pool.general"] - pools_before["pool.general"]
    print(
        f"\ninvalid: {len(invalid)} rejected + 1 undecodable -> {len(letters)} dead letters; "
        f"{len(valid)} valid answered; {forwarded} records reached pool.general"
    )
    assert forwarded == len(valid)
    assert pools_after["pool.gpu"] == pools_before["pool.gpu"]
    assert pools_after["pool.optimizer"] == pools_before["pool.optimizer"]


async def test_a_deterministic_repeat_is_answered_from_the_cache_without_a_pool(
    settings: Settings, start_stack: StartStack
) -> None:
    settings = echo_settings(settings)
    stack = start_stack(settings, ["general"])
    question = _question("Capital of France?")
    cache_topic = f"{settings.topics.prefix}cache"
    watched = [*POOL_TOPICS, "executions"]
    async with AsyncClient(settings) as client:
        first = await client.submit(INLINE, {"question": question}, deadline_s=60)
        await asyncio.to_thread(wait_for_records, settings, cache_topic, 1, 30.0)
        # the router follows `cache` on its own consumer: repeat until it answers from it
        tries, give_up = 0, time.monotonic() + 30
        while True:
            tries += 1
            await asyncio.to_thread(stack.wait_idle)  # all that earlier requests did is done
            before = end_offsets(settings, watched)
            second = await client.submit(INLINE, {"question": question}, deadline_s=60)
            if second.cached or time.monotonic() > give_up:
                break
        # the router committed the repeat, the worker everything forwarded before it: what a
        # pool did for the repeat would be on the topics now
        await asyncio.to_thread(stack.wait_idle)
        after = end_offsets(settings, watched)
    print(
        f"\ncache: first pool={first.pool}, repeat cached={second.cached} at try {tries}; "
        f"{before} -> {after}"
    )
    assert (first.cached, first.pool) == (False, "general")
    assert (second.cached, second.pool, second.status) == (True, None, "ok")
    assert second.outputs == first.outputs == {"answer": f"echo: {question}"}
    assert after == before


async def test_a_streamed_cache_hit_and_a_list_output_stream_their_answer(
    settings: Settings, start_stack: StartStack
) -> None:
    """Contract rule: the streamed chunks' deltas concatenate to the answer, for a cache hit
    (the router streams the cached text) and for a program with no text output (its last
    output, as JSON)."""
    settings = echo_settings(settings)
    start_stack(settings, ["general"])
    question = _question("What is cached?")
    ideas = Program.inline("topic -> ideas: list[str]")
    async with AsyncClient(settings) as client:
        first = await client.submit(INLINE, {"question": question}, deadline_s=60)
        give_up, hit = time.monotonic() + 60, []
        while time.monotonic() < give_up:  # the router follows `cache` on its own consumer
            hit = [c async for c in client.stream(INLINE, {"question": question}, deadline_s=60)]
            if hit[-1].cached:
                break
            await asyncio.sleep(0.5)
        listed = [c async for c in client.stream(ideas, {"topic": "rain"}, deadline_s=60)]
    print(f"\ncache hit chunks {[c.delta for c in hit]}; list chunks {[c.delta for c in listed]}")
    assert hit[-1].cached and hit[-1].final and hit[-1].outputs == first.outputs
    assert [c.seq for c in hit] == list(range(len(hit))) and len(hit) == 2
    assert all(c.delta for c in hit[:-1]) and first.outputs is not None
    assert "".join(c.delta for c in hit) == first.outputs["answer"]
    final = listed[-1]
    assert final.status == "ok" and final.outputs is not None
    assert isinstance(final.outputs["ideas"], list)
    assert all(c.delta for c in listed[:-1]) and len(listed) >= 2
    assert json.loads("".join(c.delta for c in listed)) == final.outputs["ideas"]


async def test_a_program_version_published_mid_run_is_used_by_later_requests(
    settings: Settings, start_stack: StartStack
) -> None:
    settings = echo_settings(settings)
    start_stack(settings, ["general"])
    program = Program.registered("e2e.qa")
    async with AsyncClient(settings) as client:
        assert await client.publish_program("e2e.qa", "question -> answer") == 1
        first, tries_v1 = await _submit_until_version(client, program, 1)
        assert await client.publish_program("e2e.qa", "question -> reply: str") == 2
        second, tries_v2 = await _submit_until_version(client, program, 2)
        later = await client.submit_many(
            [(program, {"question": _question(f"later {n}")}) for n in range(5)], deadline_s=60
        )
    print(f"\nprogram versions: v1 answered after {tries_v1} try, v2 after {tries_v2}")
    assert list(first.outputs) == ["answer"] and first.outputs["answer"].startswith("echo: ")
    assert list(second.outputs) == ["reply"] and second.outputs["reply"].startswith("echo: ")
    for result in later:
        assert isinstance(result, Result), result
        assert result.program_version == 2 and list(result.outputs) == ["reply"]


async def _submit_until_version(
    client: AsyncClient, program: Program, version: int, timeout_s: float = 30.0
) -> tuple[Result, int]:
    """Submit until the router answers with ``version``: it follows the programs topic
    on its own consumer, so a version takes effect shortly after publishing, not at once."""
    deadline = time.monotonic() + timeout_s
    for tries in range(1, 1000):
        question = _question(f"v{version} try {tries}")
        try:
            result = await client.submit(program, {"question": question}, deadline_s=30)
        except RequestFailed as exc:
            assert exc.field == "program_id", exc  # version 1 not seen yet: unknown program
        else:
            assert result.program_version in (version - 1, version), result
            if result.program_version == version:
                return result, tries
        assert time.monotonic() < deadline, f"version {version} not used after {timeout_s}s"
        await asyncio.sleep(0.2)
    raise AssertionError("unreachable")


async def test_gpu_pool_streams_an_answer_from_the_local_model(
    settings: Settings, start_stack: StartStack
) -> None:
    assert settings.lm.pool_variants == {"gpu": "local"}  # the default: Gemma 3 270M
    start_stack(settings, ["gpu"])
    question = "What is the capital of France?"
    async with AsyncClient(settings) as client:
        stream = client.stream(
            INLINE, {"question": question}, pool_hint="gpu", deadline_s=60, cache=False
        )
        chunks = [chunk async for chunk in stream]
    final = chunks[-1]
    text = "".join(chunk.delta for chunk in chunks)
    print(f"\ngpu smoke: {len(chunks)} chunks, answer {text!r}, outputs {final.outputs}")
    assert final.final and final.status == "ok", final.error
    assert [chunk.seq for chunk in chunks] == list(range(len(chunks)))
    assert final.pool == "gpu" and not final.cached
    assert len(chunks) > 1 and text.strip()
    assert isinstance((final.outputs or {}).get("answer"), str)
    assert final.outputs is not None and final.outputs["answer"].strip()
