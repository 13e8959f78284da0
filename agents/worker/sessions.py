"""Sessions in the worker: history in, the turn recorded, the variant pinned, one turn at a time.

For a request with a ``session_id`` the worker (:class:`Sessions`, called from
the handler):

1. takes the session's lock, in the order the requests were consumed — turns of
   one session run one after another, in key order, even with ``in_flight`` > 1;
2. gets its state from the hot-session cache or the topic
   (:mod:`dspex.agents.worker.sessionstore`); a state past ``expires_at``, or a
   tombstone, means the turn starts afresh and says ``expired``;
3. gives a program with a ``History`` input the session's earlier turns *of that
   program* (``session_history``), and runs a sticky program on the variant its
   first turn used;
4. after an ``ok`` answer, writes the new state (the turn appended, the history
   trimmed to its caps, the counters added up) to ``sessions``; the request is
   done only once the broker has it. A redelivered turn (its request id already in
   the history) sees the history before it and is not recorded again.

What "fresh", "expired", the caps and the limits mean: docs/sessions.md.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from dspex.agents.plumbing.publisher import Publisher
from dspex.agents.plumbing.records import ExecutionResult, encode_outputs
from dspex.agents.worker.sessionstore import Invalidator, Loader, SessionCache, SessionLoader
from dspex.schemas import records, times
from dspex.schemas.records import Record
from dspex.streams.errors import InvalidRequest
from dspex.streams.serde import Serde
from dspex.streams.sessions import WRITER_HEADER, Found, session_partition
from dspex.streams.settings import SessionSettings, Settings
from dspex.streams.signatures import history_inputs, parse_signature_fields
from dspex.streams.topics import Topics

logger = logging.getLogger(__name__)


@dataclass
class Turn:
    """One turn of a session, between taking its lock and recording it."""

    session_id: str
    number: int
    fresh: bool
    expired: bool
    redelivered: bool
    history: list[dict[str, Any]]
    """Messages for the program's History input: earlier turns of the same program."""
    request: Mapping[str, Any]
    """The request to run: the consumed one, with the pinned variant when sticky."""
    base: Record | None
    """The state this turn continues (None: a fresh session)."""
    pin: str | None = None
    """The program key to pin after this turn (sticky, not pinned yet)."""
    extra: dict[str, Any] = field(default_factory=dict)

    def record(self) -> Record:
        """The Response's ``session`` field."""
        return records.session_turn(
            session_id=self.session_id, turn=self.number, fresh=self.fresh, expired=self.expired
        )


def program_key(request: Mapping[str, Any]) -> str:
    """A registered program's id; ``inline:`` + sha256 of an inline program's signature."""
    if request.get("program_id"):
        return str(request["program_id"])
    digest = hashlib.sha256(str(request.get("signature") or "").encode()).hexdigest()
    return f"inline:{digest[:16]}"


def _history_fields(signature: str | None) -> tuple[str, ...]:
    try:
        return history_inputs(parse_signature_fields(signature or ""))
    except InvalidRequest:
        return ()


def is_sticky(settings: SessionSettings, request: Mapping[str, Any]) -> bool:
    """``sessions.sticky[program_id]`` if set, else whether the program has a History input."""
    program_id = request.get("program_id")
    if program_id in settings.sticky:
        return settings.sticky[program_id]
    return bool(_history_fields(request.get("signature")))


def trim(turns: Sequence[Record], max_turns: int, max_bytes: int) -> tuple[list[Record], int]:
    """The newest turns within both caps, oldest first, and how many were dropped.

    A turn's size is the UTF-8 length of its inputs' and outputs' names and JSON
    values. A single turn over ``max_bytes`` is not kept at all.
    """
    kept = list(turns)
    sizes = [_size(turn) for turn in kept]
    total = sum(sizes)
    dropped = 0
    while kept and (len(kept) > max_turns or total > max_bytes):
        kept.pop(0)
        total -= sizes.pop(0)
        dropped += 1
    return kept, dropped


def _size(turn: Mapping[str, Any]) -> int:
    fields = {**turn.get("inputs", {}), **turn.get("outputs", {})}
    return sum(len(k.encode()) + len(v.encode()) for k, v in fields.items())


def _message(turn: Mapping[str, Any]) -> dict[str, Any]:
    values = {**turn.get("inputs", {}), **turn.get("outputs", {})}
    return {name: json.loads(value) for name, value in values.items()}


def _expired(state: Mapping[str, Any], now: datetime) -> bool:
    return bool(times.to_ms(state["expires_at"]) <= times.to_ms(now))  # type: ignore[operator]


class Sessions:
    """The worker's session hook: :meth:`turn` around a run, :meth:`record` after it."""

    def __init__(
        self,
        settings: Settings,
        serde: Serde,
        publisher: Publisher,
        worker_id: str,
        *,
        loader: Loader | None = None,
    ) -> None:
        topics = Topics(settings.topics)
        self.topic = topics.name("sessions")
        self._partitions = topics.spec("sessions").partitions
        self._settings = settings.sessions
        self._backends = settings.lm.backends
        self._serde = serde
        self._publisher = publisher
        self._worker_id = worker_id
        self.cache = SessionCache(settings.sessions.cache_size)
        self._loader: Loader = loader or SessionLoader(
            settings, serde, self.topic, self._partitions
        )
        self._invalidator: Invalidator | None = None
        self._full_settings = settings
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    async def start(self) -> None:
        """Follow the topic for others' writes (they invalidate the cached copy)."""
        loop = asyncio.get_running_loop()
        invalidator = Invalidator(self._full_settings, self.topic, self._worker_id, self.cache.drop)
        await asyncio.to_thread(invalidator.start, loop)
        self._invalidator = invalidator

    async def stop(self) -> None:
        if self._invalidator is not None:
            await asyncio.to_thread(self._invalidator.stop)
        await asyncio.to_thread(self._loader.close)

    @asynccontextmanager
    async def turn(self, request: Mapping[str, Any]) -> AsyncIterator[Turn]:
        """The session's next turn, holding its lock (taken without yielding when free).

        Turns of one session therefore run in the order the handler was called: the
        order their records were consumed.
        """
        session_id = str(request["session_id"])
        lock, users = self._locks.get(session_id) or (asyncio.Lock(), 0)
        self._locks[session_id] = (lock, users + 1)
        try:
            async with lock:
                yield self._begin(request, await self._state(session_id))
        finally:
            lock, users = self._locks[session_id]
            if users == 1:
                del self._locks[session_id]
            else:
                self._locks[session_id] = (lock, users - 1)

    async def _state(self, session_id: str) -> Found:
        if session_id in self.cache and self._invalidator is not None:
            # others' writes (an end, another owner) that came before this turn drop it
            await self._invalidator.settle(session_partition(session_id, self._partitions))
        cached = self.cache.get(session_id)
        if cached is not None:
            return Found(cached)
        return await self._loader.load(session_id)

    def _begin(self, request: Mapping[str, Any], found: Found) -> Turn:
        now = times.now()
        state, expired = found.state, found.ended is not None
        if state is not None and _expired(state, now):
            state, expired = None, True
        turns = list(state["turns"]) if state else []
        request_id = request["request_id"]
        index = next((i for i, t in enumerate(turns) if t["request_id"] == request_id), None)
        if index is not None:  # redelivered: the history before it, recorded once already
            number = turns[index]["turn"]
            fresh, expired, prior = number == 1, bool(state and state["restarted"]), turns[:index]
        else:
            number = state["counters"]["turns"] + 1 if state else 1
            fresh, prior = state is None, turns
        key = program_key(request)
        history = [_message(t) for t in prior if program_key(t) == key]
        run, pin = self._pinned(request, state, key)
        return Turn(
            str(request["session_id"]), number, fresh, expired, index is not None, history, run,
            state, pin,
        )  # fmt: skip

    def _pinned(
        self, request: Mapping[str, Any], state: Record | None, key: str
    ) -> tuple[Mapping[str, Any], str | None]:
        """The request on its session's pinned variant, and the key to pin after this turn."""
        if not is_sticky(self._settings, request):
            return request, None
        pinned = (state or {}).get("pinned", {}).get(key)
        if pinned is None:
            return request, key
        route = dict(request.get("route") or {})
        if pinned not in self._backends or route.get("variant") == pinned:
            return request, None
        route.update(variant=pinned, model=self._backends[pinned].model, reason="sticky")
        return {**request, "route": route}, None

    async def record(self, turn: Turn, result: ExecutionResult) -> asyncio.Future[None] | None:
        """Write the state with this turn appended (ok answers only; a redelivery is not)."""
        if result.status != "ok" or turn.redelivered:
            return None
        state = self._next_state(turn, result)
        self.cache.put(turn.session_id, state)
        value = self._serde.encode("SessionState", state, topic=self.topic)
        return await self._publisher.send_bytes(
            self.topic,
            turn.session_id,
            value,
            [(WRITER_HEADER, self._worker_id.encode())],
            partition=session_partition(turn.session_id, self._partitions),
        )

    def _next_state(self, turn: Turn, result: ExecutionResult) -> Record:
        now, base, request = times.now(), turn.base, turn.request
        variant = result.variant or (request.get("route") or {}).get("variant")
        hidden = set(_history_fields(request.get("signature")))
        appended = records.history_turn(
            request_id=request["request_id"],
            turn=turn.number,
            program_id=request.get("program_id"),
            pipeline_id=request.get("pipeline_id"),
            signature=request.get("signature"),
            inputs={k: v for k, v in (request.get("inputs") or {}).items() if k not in hidden},
            outputs=encode_outputs(result.outputs),
            variant=variant,
            at=now,
        )
        kept, dropped = trim([*(base or {}).get("turns", []), appended], *self._caps)
        if dropped:
            logger.info("history trimmed session_id=%s dropped=%d", turn.session_id, dropped)
        pinned = dict((base or {}).get("pinned", {}))
        if turn.pin is not None and variant:
            pinned.setdefault(turn.pin, str(variant))
        ttl = timedelta(seconds=self._settings.ttl_s)
        return records.session_state(
            session_id=turn.session_id,
            version=base["version"] + 1 if base else 1,
            created_at=base["created_at"] if base else now,
            updated_at=now,
            ttl_ms=int(ttl.total_seconds() * 1000),
            expires_at=now + ttl,
            turns=kept,
            variables=(base or {}).get("variables", {}),
            pinned=pinned,
            counters=_counted((base or {}).get("counters"), result, dropped),
            restarted=base["restarted"] if base else turn.expired,
            writer=self._worker_id,
        )

    @property
    def _caps(self) -> tuple[int, int]:
        return self._settings.max_turns, self._settings.max_history_bytes


def _counted(counters: Mapping[str, Any] | None, result: ExecutionResult, dropped: int) -> Record:
    before = counters or records.session_counters()
    run_ms = times.millis_between(result.started_at, result.finished_at)
    return records.session_counters(
        turns=before["turns"] + 1,
        dropped_turns=before["dropped_turns"] + dropped,
        prompt_tokens=before["prompt_tokens"] + result.usage.prompt_tokens,
        completion_tokens=before["completion_tokens"] + result.usage.completion_tokens,
        cost_usd=before["cost_usd"],
        latency_ms=before["latency_ms"] + run_ms,
    )
