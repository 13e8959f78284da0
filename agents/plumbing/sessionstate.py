"""A session's next ``SessionState``, built the same way by whoever records a turn.

Two processes record turns: a pool worker (one program's turn,
:mod:`dspex.agents.worker.sessions`) and the pipeline agent (one pipeline run's turn,
:mod:`dspex.agents.pipeline.agent`). Both append a ``HistoryTurn`` with
:func:`next_state`: the history trimmed to its caps (oldest first out), the counters
added up, the TTL counted from now. A pipeline's stage requests carry the run's
``session_id`` and the :data:`STAGE_RUN` / :data:`STAGE_PIPELINE` metadata the pipeline
agent sets (:func:`pipeline_stage` reads them): a worker gives such a stage the
session's earlier turns of that pipeline and records nothing. docs/sessions.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any

from dspex.schemas import records, times
from dspex.schemas.records import Record
from dspex.streams.settings import SessionSettings

logger = logging.getLogger(__name__)

PIPELINE_META = "dspex.pipeline."
"""Prefix of the metadata keys the pipeline agent sets on stage requests."""
STAGE_RUN = f"{PIPELINE_META}run"
STAGE_PIPELINE = f"{PIPELINE_META}id"


def pipeline_stage(request: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(pipeline_id, run_id)`` of a pipeline's stage request, else None."""
    metadata = request.get("metadata") or {}
    pipeline_id, run_id = metadata.get(STAGE_PIPELINE), metadata.get(STAGE_RUN)
    return (str(pipeline_id), str(run_id)) if pipeline_id and run_id else None


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


def message(turn: Mapping[str, Any]) -> dict[str, Any]:
    """A turn as a History message: its input and output values by field name."""
    values = {**turn.get("inputs", {}), **turn.get("outputs", {})}
    return {name: json.loads(value) for name, value in values.items()}


def is_expired(state: Mapping[str, Any], now: datetime) -> bool:
    """Whether the session state's TTL has passed at ``now``."""
    return bool(times.to_ms(state["expires_at"]) <= times.to_ms(now))  # type: ignore[operator]


def next_state(
    base: Record | None,
    appended: Record,
    *,
    session_id: str,
    settings: SessionSettings,
    writer: str,
    restarted: bool,
    pinned: Mapping[str, str] | None = None,
    usage: Mapping[str, float] | None = None,
) -> Record:
    """``base`` (None: a new session) with the turn ``appended``, trimmed to the caps.

    ``usage`` adds to the counters (``prompt_tokens``, ``completion_tokens``,
    ``latency_ms``); ``restarted`` is kept from ``base`` when there is one.
    """
    now = times.now()
    kept, dropped = trim(
        [*(base or {}).get("turns", []), appended],
        settings.max_turns,
        settings.max_history_bytes,
    )
    if dropped:
        logger.info("history trimmed session_id=%s dropped=%d", session_id, dropped)
    ttl = timedelta(seconds=settings.ttl_s)
    return records.session_state(
        session_id=session_id,
        version=base["version"] + 1 if base else 1,
        created_at=base["created_at"] if base else now,
        updated_at=now,
        ttl_ms=int(ttl.total_seconds() * 1000),
        expires_at=now + ttl,
        turns=kept,
        variables=(base or {}).get("variables", {}),
        pinned=dict(pinned if pinned is not None else (base or {}).get("pinned", {})),
        counters=_counted((base or {}).get("counters"), usage or {}, dropped),
        restarted=base["restarted"] if base else restarted,
        writer=writer,
    )


def _counted(
    counters: Mapping[str, Any] | None, usage: Mapping[str, float], dropped: int
) -> Record:
    before = counters or records.session_counters()
    return records.session_counters(
        turns=before["turns"] + 1,
        dropped_turns=before["dropped_turns"] + dropped,
        prompt_tokens=before["prompt_tokens"] + int(usage.get("prompt_tokens", 0)),
        completion_tokens=before["completion_tokens"] + int(usage.get("completion_tokens", 0)),
        cost_usd=before["cost_usd"],
        latency_ms=before["latency_ms"] + usage.get("latency_ms", 0),
    )


class OrderedLocks:
    """One asyncio lock per session id, dropped when nobody holds or waits for it.

    ``async with locks.ordered(session_id)`` takes the lock without yielding when it is
    free, and waiters get it first come first served: turns (or runs) of one session run
    one after another, in the order they were consumed.
    """

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def ordered(self, session_id: str) -> AsyncIterator[None]:
        """Hold ``session_id``'s lock for the block."""
        lock, users = self._locks.get(session_id) or (asyncio.Lock(), 0)
        self._locks[session_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[session_id]
            if users == 1:
                del self._locks[session_id]
            else:
                self._locks[session_id] = (lock, users - 1)
