"""Stand-ins for the product's seams, shared by every test that runs product code without them.

Each fake implements the product's protocol for its seam, so mypy checks it
where it is passed in (no ``type: ignore``):

- :class:`FakeProducer` — :class:`dspex.agents.plumbing.publisher.Producer`
  (confluent-kafka's producer, without a broker);
- :class:`FakeExecutor` — :class:`dspex.agents.worker.execution.Executor`
  (the worker's program runner);
- :class:`FakeResolver` — :class:`dspex.agents.router.routing.ProgramResolver`;
- :class:`FakeStream` and :class:`FakeEvent` — the faust stream a manual-ack agent reads;
- :class:`FailingRegistry` — :class:`dspex.streams.serde.confluent.RegistryClient`
  (a Schema Registry that fails every call).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from confluent_kafka import KafkaError, KafkaException, Message
from confluent_kafka.schema_registry import Schema as RegistrySchema

from dspex.agents.plumbing.messages import Consumed, Header, TokenUsage
from dspex.agents.plumbing.publisher import DeliveryReport
from dspex.agents.worker.execution import ChunkCallback, Outcome
from dspex.agents.worker.faults import BackendFailure, BackendsExhausted
from dspex.streams.errors import InvalidRequest
from dspex.streams.serde import Serde, SingleObjectSerde

ALWAYS = sys.maxsize
"""``FakeProducer.failing[topic] = ALWAYS``: every delivery to ``topic`` fails."""

_LEGAL_TOPIC = re.compile(r"[a-zA-Z0-9._-]{1,249}")


class Produced(NamedTuple):
    """One record handed to :meth:`FakeProducer.produce`."""

    topic: str
    key: str | bytes | None
    value: bytes | None
    headers: list[Header]
    """As the broker keeps them: a ``str`` value is UTF-8 encoded, as librdkafka does."""


class FakeProducer:
    """confluent-kafka's producer without a broker: keeps every record, reports deliveries.

    As with librdkafka, a delivery report is served by ``poll``/``flush``, never
    inside ``produce``, and ``produce`` raises for an illegal topic name.
    ``failing[topic]`` deliveries to ``topic`` fail (UNKNOWN_TOPIC_OR_PART) before
    deliveries there succeed again. With ``hold_acks`` a report waits for
    :meth:`broker_acks` before a poll can serve it.
    """

    def __init__(
        self,
        fail_topics: Iterable[str] = (),
        *,
        hold_acks: bool = False,
        serde: Serde | None = None,
    ) -> None:
        self.produced: list[Produced] = []
        self.failing: Counter[str] = Counter(dict.fromkeys(fail_topics, ALWAYS))
        self.polls = 0
        self._hold = hold_acks
        self._serde = serde or SingleObjectSerde()
        self._unacked: list[tuple[DeliveryReport | None, KafkaError | None, Message]] = []
        self._ready: list[tuple[DeliveryReport | None, KafkaError | None, Message]] = []

    def produce(
        self,
        topic: str,
        value: bytes | None,
        key: str | bytes | None = None,
        *,
        on_delivery: DeliveryReport | None = None,
        headers: list[tuple[str, str | bytes | None]] | None = None,
        partition: int = -1,
    ) -> None:
        if not _LEGAL_TOPIC.fullmatch(topic):
            raise KafkaException(KafkaError(KafkaError._INVALID_ARG))
        kept = [(k, v.encode() if isinstance(v, str) else v) for k, v in headers or []]
        self.produced.append(Produced(topic, key, value, kept))
        error = None
        if self.failing[topic] > 0:
            self.failing[topic] -= 1
            error = KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)
        raw_key = key.encode() if isinstance(key, str) else key
        message = Message(topic=topic, key=raw_key, value=value, headers=headers, error=error)
        (self._unacked if self._hold else self._ready).append((on_delivery, error, message))

    def broker_acks(self) -> None:
        """The broker acknowledges every record produced so far (``hold_acks``)."""
        self._ready += self._unacked
        self._unacked = []

    def poll(self, timeout: float = -1) -> int:
        self.polls += 1
        served, self._ready = self._ready, []
        for callback, error, message in served:
            if callback is not None:
                callback(error, message)
        return len(served)

    def flush(self, timeout: float = -1) -> int:
        self.poll(0)
        return len(self)

    def __len__(self) -> int:
        return len(self._unacked) + len(self._ready)

    def topics(self) -> list[str]:
        """The topic of every record produced, in order."""
        return [p.topic for p in self.produced]

    def raw(self, topic: str) -> list[Produced]:
        """The records produced to ``topic``, as produced."""
        return [p for p in self.produced if p.topic == topic]

    def records(self, topic: str) -> list[dict[str, Any]]:
        """The records produced to ``topic``, decoded."""
        return [
            self._serde.decode(p.value, topic=topic).record
            for p in self.raw(topic)
            if p.value is not None
        ]


Behaviour = Callable[[Mapping[str, Any], ChunkCallback | None], Awaitable[Outcome]]


class FakeExecutor:
    """The worker's Executor: answers ``"echo: <question>"``, streamed word by word if asked.

    Counts calls per request id and the peak concurrency. The first ``fails``
    calls fail as an LM backend outage (a retryable error), after streaming one
    chunk when the request streams; ``behave`` replaces the answer; each call
    first sleeps a random time in ``sleep_s`` (min, max) seconds.
    """

    def __init__(
        self,
        behave: Behaviour | None = None,
        *,
        fails: int = 0,
        sleep_s: tuple[float, float] = (0.0, 0.0),
        seed: int = 7,
    ) -> None:
        self.calls: Counter[str] = Counter()
        self.running = 0
        self.peak = 0
        self._behave = behave
        self._fails = fails
        self._sleep_s = sleep_s
        self._rng = random.Random(seed)

    async def execute(self, request: Mapping[str, Any], on_chunk: ChunkCallback | None) -> Outcome:
        self.calls[request["request_id"]] += 1
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await asyncio.sleep(self._rng.uniform(*self._sleep_s))
            if self.calls.total() <= self._fails:
                return await self._fail(request, on_chunk)
            if self._behave is not None:
                return await self._behave(request, on_chunk)
            return await self._echo(request, on_chunk)
        finally:
            self.running -= 1

    async def _echo(self, request: Mapping[str, Any], on_chunk: ChunkCallback | None) -> Outcome:
        answer = "echo: " + json.loads(request["inputs"]["question"])
        if on_chunk is not None:
            for word in answer.split(" "):
                await on_chunk(word + " ")
        return Outcome({"answer": answer}, TokenUsage(5, 3, 8), [{"predictor": "fake"}], None)

    async def _fail(self, request: Mapping[str, Any], on_chunk: ChunkCallback | None) -> Outcome:
        if on_chunk is not None:
            await on_chunk("echo: ")
        failure = BackendFailure("flaky", "LMServerError", "503", 1)
        raise BackendsExhausted([failure], "closed", request["request_id"])


class FakeResolver:
    """The router's ProgramResolver without DSPy: inline signatures need a ``question`` input."""

    def resolve(
        self, request: Mapping[str, Any], registered: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        if "question" not in (request.get("inputs") or {}):
            raise InvalidRequest("inputs.question", "missing input")
        base = registered or {}
        return {
            "program_id": request.get("program_id"),
            "program_version": base.get("version"),
            "signature": request.get("signature") or base.get("signature"),
            "module_type": request.get("module_type") or base.get("module_type") or "Predict",
            "module_config_json": "{}",
            "state_json": base.get("state_json"),
            "tools": [],
        }


class FakeEvent:
    """A faust event of a manual-ack stream: acking appends its offset to ``acked``."""

    def __init__(self, message: Consumed, acked: list[int]) -> None:
        self.message = message  # has every field Consumed.from_faust reads
        self._acked = acked

    def ack(self) -> bool:
        self._acked.append(self.message.offset)
        return True


class FakeStream:
    """faust's stream as a manual-ack agent reads it: ``noack().events()``."""

    def __init__(self, events: Sequence[FakeEvent]) -> None:
        self._events = list(events)

    def noack(self) -> FakeStream:
        return self

    async def events(self) -> AsyncIterator[FakeEvent]:
        for event in self._events:
            yield event


class FailingRegistry:
    """A Schema Registry client whose every call raises ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def register_schema(self, subject_name: str, schema: RegistrySchema) -> int:
        raise self.error

    def get_schema(self, schema_id: int) -> RegistrySchema:
        raise self.error
