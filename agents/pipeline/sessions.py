"""Pipeline runs in a session: one run of a session at a time, and one turn per answered run.

A run submitted with a ``session_id`` is a turn of that session (docs/sessions.md,
*Pipelines in a session*):

- its stage requests carry the ``session_id`` (:meth:`~dspex.agents.pipeline.run.Run.issue`),
  so a stage whose program has a ``History`` input gets, from its worker, the session's
  earlier turns **of this pipeline** — each turn's run inputs and final outputs by field
  name — and the worker records nothing for a stage;
- :meth:`RunSessions.ordered` runs the runs of one session one after another, in the
  order they were consumed (one key, one partition), so each sees the turns before it;
- :meth:`RunSessions.record` appends the run's turn (run inputs, final outputs,
  ``pipeline_id``) to the session's state on ``sessions`` once the run ended ``ok``, and
  the final answer is sent only after the broker has that write. A run answered again
  after a crash finds its turn (by run id) already there and is not recorded twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from dspex.agents.pipeline.run import Run
from dspex.agents.plumbing.publisher import Publisher
from dspex.agents.plumbing.sessionstate import OrderedLocks, is_expired, next_state
from dspex.schemas import records, times
from dspex.schemas.records import Record
from dspex.streams.errors import DSPexError
from dspex.streams.serde import Serde
from dspex.streams.sessions import WRITER_HEADER, find_session, session_partition
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics

logger = logging.getLogger(__name__)

SEND_ATTEMPTS = 5


class RunSessions:
    """The pipeline agent's session hook (see the module doc)."""

    def __init__(self, settings: Settings, serde: Serde, writer: str) -> None:
        topics = Topics(settings.topics)
        self.topic = topics.name("sessions")
        self._partitions = topics.spec("sessions").partitions
        self._settings = settings
        self._serde = serde
        self._writer = writer
        self._locks = OrderedLocks()

    @asynccontextmanager
    async def ordered(self, session_id: str | None) -> AsyncIterator[None]:
        """Hold the session's lock (taken without yielding when free); no-op without one."""
        if not session_id:
            yield
            return
        async with self._locks.ordered(session_id):
            yield

    async def record(self, run: Run, publisher: Publisher) -> Record | None:
        """Append an ``ok`` run's turn and wait for the broker; the Response's ``session``."""
        session_id = run.request.get("session_id")
        if not session_id:
            return None
        found = await asyncio.to_thread(find_session, self._settings, self._serde, session_id)
        now = times.now()
        state, expired = found.state, found.ended is not None
        if state is not None and is_expired(state, now):
            state, expired = None, True
        turns = list(state["turns"]) if state else []
        held = next((t for t in turns if t["request_id"] == run.run_id), None)
        number = state["counters"]["turns"] + 1 if state else 1
        if held is not None:  # answered again after a crash: recorded already
            turn = held["turn"]
            return records.session_turn(session_id=session_id, turn=turn, fresh=turn == 1)
        if run.status != "ok":  # a failed run is not recorded: the number the next one gets
            return records.session_turn(
                session_id=session_id, turn=number, fresh=state is None, expired=expired
            )
        appended = records.history_turn(
            request_id=run.run_id,
            turn=number,
            pipeline_id=run.plan.pipeline_id,
            inputs=run.request.get("inputs") or {},
            outputs=run.outputs or {},
            at=now,
        )
        now_ms = times.to_ms(now) or 0
        took_ms = max(0, now_ms - (times.to_ms(run.request.get("created_at")) or now_ms))
        new = next_state(
            state,
            appended,
            session_id=session_id,
            settings=self._settings.sessions,
            writer=self._writer,
            restarted=expired,
            usage={"latency_ms": took_ms},
        )
        await self._write(publisher, session_id, new)
        return records.session_turn(
            session_id=session_id, turn=number, fresh=state is None, expired=expired
        )

    async def _write(self, publisher: Publisher, session_id: str, state: Record) -> None:
        value = self._serde.encode("SessionState", state, topic=self.topic)
        headers = [(WRITER_HEADER, self._writer.encode())]
        partition = session_partition(session_id, self._partitions)
        for attempt in range(1, SEND_ATTEMPTS + 1):
            sent = await publisher.send_bytes(self.topic, session_id, value, headers, partition)
            try:
                await sent
                return
            except DSPexError as exc:
                logger.warning(
                    "session write failed session_id=%s attempt=%d: %s", session_id, attempt, exc
                )
                await asyncio.sleep(min(0.1 * 2**attempt, 5.0))
        raise DSPexError(f"pipeline agent: session {session_id} state not acknowledged")
