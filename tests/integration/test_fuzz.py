"""Fuzzing the requests topic on the real stack: bad input is contained, valid input flows.

About 300 bad records (random bytes, truncated Avro, a record of the wrong schema,
well-formed Requests with absurd values) are interleaved with 100 valid requests
(seeded, so a failure replays) and produced raw to ``requests``, where the router
agent and a general-pool worker (real ``python -m dspex.agents`` processes, every pool on
the ``dspex/echo`` simulation) consume them. Every bad record must end as a dead
letter or an error Response, every valid request must be answered exactly once, and
no agent process may exit. Run with ``-s`` to see the counts.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from confluent_kafka.admin import ConfigResource, ResourceType

from dspex.schemas.samples import sample
from dspex.streams import kafka
from dspex.streams.client._requests import Program, build_request, request_headers, request_key
from dspex.streams.serde import Serde, make_serde
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics
from tests.integration.tail import OpenTail, Tail
from tests.integration.test_end_to_end import (  # noqa: F401 - the fixture is used by name
    StartStack,
    echo_settings,
    start_stack,
)

SEED = 20_260_606
INLINE = Program.inline("question -> answer")


@dataclass
class Fuzzed:
    """One record produced to ``requests`` and what the test expects of it."""

    kind: str
    value: bytes | None
    key: bytes | None
    request_id: str | None = None  # set when the bytes are a decodable Request
    bad: bool = True  # False: a valid request that must be answered ok
    question: str | None = None


def _valid(serde: Serde, topic: str, rng: random.Random, n: int) -> Fuzzed:
    question = f"valid #{n} {rng.getrandbits(32):08x}"
    record = build_request(INLINE, {"question": question}, deadline_s=120, cache=False)
    value = serde.encode("Request", record, topic=topic)
    return Fuzzed("valid", value, request_key(record), record["request_id"], False, question)


def _absurd_requests(max_bytes: int) -> list[tuple[str, dict[str, Any]]]:
    """Well-formed Requests whose values no worker should run: (kind, changes)."""
    now = datetime.now(UTC)
    deep = "[" * 5000 + "]" * 5000
    return [
        ("huge input", {"inputs": {"question": json.dumps("x" * max_bytes)}}),
        ("deeply nested JSON input", {"inputs": {"question": deep}}),
        ("NaN JSON input", {"inputs": {"question": "NaN"}}),
        ("not JSON input", {"inputs": {"question": "{'a': 1"}}),
        ("negative deadline", {"deadline_at": datetime(1969, 12, 31, 23, 59, tzinfo=UTC)}),
        ("deadline passed", {"deadline_at": now - timedelta(seconds=5)}),
        ("deadline year 9999", {"deadline_at": datetime(9999, 1, 1, tzinfo=UTC)}),
        ("unknown program", {"program_id": "fuzz.nowhere", "signature": None}),
        ("no signature", {"signature": None}),
        ("malformed signature", {"signature": "question answer"}),
        ("signature of arrows", {"signature": "a -> b -> c"}),
        ("signature bad type", {"signature": "question: list[ -> answer"}),
        ("dunder field name", {"signature": "__class__ -> answer", "inputs": {"__class__": '"x"'}}),
        ("shell field name", {"signature": "a; rm -rf / -> answer", "inputs": {"a": '"x"'}}),
        ("import field name", {"signature": "__import__('os').system('id') -> answer"}),
        ("unknown module type", {"module_type": "Telepathy"}),
        ("module config garbage", {"module_type": "ReAct", "module_config_json": "{"}),
        ("state with an lm", {"state_json": json.dumps({"lm": {"api_base": "http://evil"}})}),
        ("unknown tool", {"module_type": "ReAct", "tools": ["os.system"]}),
        ("pool hint injection", {"pool_hint": "gpu; DROP TABLE"}),
        ("reply topic traversal", {"reply_topic": "../../etc/passwd"}),
        ("empty request id", {"request_id": ""}),
        ("missing input", {"inputs": {}}),
        ("temperature NaN", {"variables": {"temperature": "NaN"}}),
        ("temperature huge", {"variables": {"temperature": "1e999"}}),
    ]


def _bad_request(serde: Serde, topic: str, kind: str, changes: dict[str, Any]) -> Fuzzed:
    record = build_request(INLINE, {"question": "fuzz"}, deadline_s=120, cache=False)
    record.update(changes)
    value = serde.encode("Request", record, topic=topic)
    request_id = record["request_id"] or None
    return Fuzzed(kind, value, request_key(record) if request_id else None, request_id)


def _garbage(serde: Serde, topic: str, rng: random.Random, n: int) -> Fuzzed:
    """Undecodable bytes: random, truncated Avro, or a valid record of another schema."""
    shape = n % 3
    if shape == 0:
        value = rng.randbytes(rng.randint(0, 300))
        return Fuzzed("random bytes", value, rng.choice([None, b"k", rng.randbytes(8)]))
    if shape == 1:
        record = build_request(INLINE, {"question": f"truncated {n}"}, deadline_s=60)
        whole = serde.encode("Request", record, topic=topic)
        return Fuzzed("truncated Avro", whole[: rng.randint(0, len(whole) - 1)], b"t")
    telemetry = sample("Telemetry") | {"request_id": str(uuid.uuid4())}
    return Fuzzed("wrong schema", serde.encode("Telemetry", telemetry, topic=topic), b"w")


def _corpus(settings: Settings, max_bytes: int) -> list[Fuzzed]:
    rng = random.Random(SEED)
    serde = make_serde(settings)
    topic = Topics(settings.topics).name("requests")
    absurd = _absurd_requests(max_bytes)
    bad = [_garbage(serde, topic, rng, n) for n in range(150)]
    bad += [_bad_request(serde, topic, *absurd[n % len(absurd)]) for n in range(150)]
    valid = [_valid(serde, topic, rng, n) for n in range(100)]
    # within router.max_request_bytes, so a valid request: it must be answered, once
    large = {"inputs": {"question": json.dumps("y" * 900_000)}}
    big = [_bad_request(serde, topic, "900 KB input", large) for _ in range(3)]
    corpus = bad + valid + [replace(f, bad=False) for f in big]
    rng.shuffle(corpus)
    return corpus


def _huge_size(settings: Settings) -> int:
    """A string too big for the router's limit yet under the topic's max.message.bytes."""
    admin = kafka.admin_client(settings)
    resource = ConfigResource(ResourceType.TOPIC, Topics(settings.topics).name("requests"))
    configs = admin.describe_configs([resource])[resource].result()
    topic_max = int(configs["max.message.bytes"].value)
    limit = settings.router.max_request_bytes
    return min(10_000_000, max(limit + 1000, topic_max - 20_000))


def _produce(settings: Settings, corpus: list[Fuzzed]) -> None:
    topic = Topics(settings.topics).name("requests")
    producer = kafka.producer(settings, **{"message.max.bytes": 20_000_000})
    for item in corpus:
        headers = None
        if item.request_id and not item.bad:
            headers = request_headers({"request_id": item.request_id, "reply_topic": None})
        producer.produce(topic, item.value, item.key, headers=headers)
        producer.poll(0)
    assert producer.flush(30) == 0


def _accounted(tail: Tail, corpus: list[Fuzzed]) -> Callable[[Tail], bool]:
    def done(t: Tail) -> bool:
        finals = {r["request_id"] for r in t.of("responses") if r["final"]}
        letters = t.of("dlq")
        ids = finals | {d["request_id"] for d in letters if d["request_id"]}
        undecodable = sum(1 for d in letters if d["request_id"] is None)
        with_id = [f for f in corpus if f.request_id]
        return all(f.request_id in ids for f in with_id) and undecodable >= sum(
            1 for f in corpus if f.request_id is None
        )

    return done


async def test_fuzzed_requests_are_contained_and_valid_ones_answered(
    settings: Settings,
    start_stack: StartStack,  # noqa: F811 - the fixture imported above
    tails: OpenTail,
) -> None:
    settings = echo_settings(settings)
    stack = start_stack(settings, ["general"])
    corpus = _corpus(settings, _huge_size(settings))
    tail = tails(["responses", "dlq"], settings=settings)
    started = time.monotonic()
    _produce(settings, corpus)
    tail.wait(_accounted(tail, corpus), 120, "every fuzzed record accounted for")
    elapsed = time.monotonic() - started
    stack.wait_idle()  # every agent committed all it consumed: nothing more will be written
    tail.catch_up()
    alive = {name: process.poll() for name, process in stack.processes.items()}

    finals = [r for r in tail.of("responses") if r["final"]]
    final_count = Counter(r["request_id"] for r in finals)
    by_id = {r["request_id"]: r for r in finals}
    letters = tail.of("dlq")
    lettered = Counter(d["request_id"] for d in letters if d["request_id"])
    big = [f for f in corpus if f.kind == "900 KB input"]
    big_finals = [by_id.get(f.request_id or "", {}).get("status") for f in big]
    # their Execution record would carry 1.8 MB of inputs + outputs; the audit log
    # replaces values over 64 KiB by a size + hash stand-in, so nothing is dead-lettered
    big_letters = [d for d in letters if d["request_id"] is None and d["stage"] == "worker"]
    letters = [d for d in letters if d not in big_letters]
    valid = [f for f in corpus if not f.bad and f not in big]
    bad = [f for f in corpus if f.bad]
    answered_ok = [f for f in valid if by_id.get(f.request_id, {}).get("status") == "ok"]
    contained = [
        f
        for f in bad
        if f.request_id is not None
        and (lettered[f.request_id] or by_id.get(f.request_id, {}).get("status", "ok") != "ok")
    ]
    undecodable_sent = Counter(f.value for f in bad if f.request_id is None)
    undecodable_letters = Counter(d["original_value"] for d in letters if d["request_id"] is None)
    escaped = [
        (f.kind, by_id.get(f.request_id or "", {}).get("status"))
        for f in bad
        if f.request_id and f not in contained
    ]
    duplicated = [rid for rid, n in final_count.items() if n > 1 and rid]
    error_responses = sum(1 for r in finals if r["status"] != "ok")
    print(
        f"\nfuzz (seed {SEED}): {len(bad)} bad + {len(valid)} valid records in {elapsed:.1f}s; "
        f"bad contained {len(contained) + sum(undecodable_letters.values())}/{len(bad)} "
        f"({sum(undecodable_letters.values())} undecodable dead-lettered, "
        f"{len(contained)} requests: {len(letters)} dead letters in all, "
        f"{error_responses} error responses); valid answered ok {len(answered_ok)}/{len(valid)}; "
        f"finals duplicated {len(duplicated)}; "
        f"escaped {escaped}; 900 KB requests answered {big_finals} "
        f"(+{len(big_letters)} dead letters from the worker); processes {alive}"
    )
    by_kind = Counter(
        (f.kind, by_id.get(f.request_id or "", {}).get("status"), bool(lettered[f.request_id]))
        for f in bad
        if f.request_id
    )
    print("bad requests by (kind, final status, dead-lettered):", dict(sorted(by_kind.items())))
    assert all(code is None for code in alive.values()), stack.log_tails()
    assert escaped == []
    assert undecodable_letters == undecodable_sent
    assert len(answered_ok) == len(valid)
    assert all(
        by_id[f.request_id]["outputs"] == {"answer": json.dumps(f"echo: {f.question}")}
        for f in valid
        if f.request_id
    )
    assert duplicated == []
    assert all(status == "ok" for status in big_finals)
    assert big_letters == []
    huge = [f for f in bad if f.kind == "huge input" and f.request_id]
    assert huge and all(lettered[f.request_id] == 1 for f in huge)  # too big, yet dead-lettered
    omitted = [d for d in letters if d["original_value_omitted"]]
    assert {d["request_id"] for d in omitted} == {f.request_id for f in huge}
    assert all(lettered[f.request_id] == 0 for f in valid if f.request_id)
