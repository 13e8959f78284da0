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
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from dspex.agents.plumbing.publisher import Publisher
from dspex.agents.plumbing.records import ExecutionResult, encode_outputs
from dspex.agents.plumbing.sessionstate import (
    OrderedLocks,
    is_expired,
    message,
    next_state,
    pipeline_stage,
)
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
    stage: bool = False
    """A pipeline's stage: it reads the session, the pipeline agent records the run's turn."""

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
        self._locks = OrderedLocks()

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
        stage = pipeline_stage(request)
        if stage is not None:  # reads only: no lock, so a run's stages stay parallel
            yield await self._stage_turn(request, *stage)
            return
        async with self._locks.ordered(session_id):
            yield self._begin(request, await self._state(session_id))

    async def _stage_turn(self, request: Mapping[str, Any], pipeline_id: str, run_id: str) -> Turn:
        """A pipeline stage's view: the session's earlier turns of that pipeline (before the
        run's own turn when it is already recorded), for a program with a History input."""
        session_id = str(request["session_id"])
        turn = Turn(session_id, 0, False, False, False, [], request, None, stage=True)
        if not _history_fields(request.get("signature")):
            return turn
        state = (await self._state(session_id)).state
        if state is None or is_expired(state, times.now()):
            return turn
        turns = list(state["turns"])
        index = next((i for i, t in enumerate(turns) if t["request_id"] == run_id), len(turns))
        turn.history = [message(t) for t in turns[:index] if t.get("pipeline_id") == pipeline_id]
        return turn

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
        if state is not None and is_expired(state, now):
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
        history = [message(t) for t in prior if program_key(t) == key]
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
        if result.status != "ok" or turn.redelivered or turn.stage:
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
        base, request = turn.base, turn.request
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
            at=times.now(),
        )
        pinned = dict((base or {}).get("pinned", {}))
        if turn.pin is not None and variant:
            pinned.setdefault(turn.pin, str(variant))
        usage = {
            "prompt_tokens": result.usage.prompt_tokens,
            "completion_tokens": result.usage.completion_tokens,
            "latency_ms": times.millis_between(result.started_at, result.finished_at),
        }
        return next_state(
            base,
            appended,
            session_id=turn.session_id,
            settings=self._settings,
            writer=self._worker_id,
            restarted=turn.expired,
            pinned=pinned,
            usage=usage,
        )
