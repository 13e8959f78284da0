"""The receiving half of the client, without Kafka: chunks, their order, who waits for them.

* :class:`Chunk` and :class:`Result`: a response chunk and a whole answer, as callers see them.
* :class:`ChunkAssembler` (pure): puts one request's chunks in ``seq`` order and drops
  duplicates, so each chunk is handed to the caller exactly once.
* :class:`Dispatcher` (asyncio): one :class:`Inbox` per request in flight, keyed by
  request id; chunks for unknown ids (other clients' replies, late duplicates) are ignored.

The consumer that feeds the dispatcher is :mod:`dspex.streams.client._listener`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from dspex.streams.errors import DSPexError, RetryableError

logger = logging.getLogger(__name__)


class RequestTimeout(RetryableError):
    """No final chunk arrived by the request's deadline (plus the client's grace period)."""

    def __init__(self, request_id: str, deadline_at: datetime, grace_s: float, chunks: int) -> None:
        self.request_id = request_id
        self.deadline_at = deadline_at
        super().__init__(
            f"request_id={request_id}: no final response by deadline "
            f"{deadline_at.isoformat()} (+{grace_s:g}s grace); {chunks} chunk(s) received"
        )


class ClientClosed(DSPexError):
    """The client was closed while a request was still waiting for its answer."""


@dataclass(frozen=True)
class Chunk:
    """One response chunk as the caller sees it: outputs JSON-decoded, error as a dict."""

    request_id: str
    seq: int
    final: bool
    status: str
    delta: str
    outputs: dict[str, Any] | None
    error: dict[str, Any] | None
    cached: bool
    pool: str | None
    program_version: int | None = None
    program_id: str | None = None
    stage: dict[str, Any] | None = None
    """A pipeline run's progress chunk: the stage (or map item) that changed (StageStatus)."""
    partial: bool = False
    """A pipeline run's final chunk: an optional stage failed and its defaults were used."""
    stages: tuple[dict[str, Any], ...] = ()
    """A pipeline run's final chunk: one StageStatus per stage."""
    session: dict[str, Any] | None = None
    """The final chunk of a session's turn: ``session_id``, ``turn``, ``fresh``, ``expired``."""

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Chunk:
        """Build a chunk from a decoded Response record."""
        outputs = record.get("outputs")
        return cls(
            request_id=record["request_id"],
            seq=record["seq"],
            final=record["final"],
            status=record["status"],
            delta=record["delta"],
            outputs=None if outputs is None else decode_outputs(record["request_id"], outputs),
            error=record.get("error"),
            cached=record["cached"],
            pool=record.get("pool"),
            program_version=record.get("program_version"),
            program_id=record.get("program_id"),
            stage=record.get("stage"),
            partial=bool(record.get("partial", False)),
            stages=tuple(record.get("stages") or ()),
            session=record.get("session"),
        )


@dataclass(frozen=True)
class Result:
    """The whole answer to one request, assembled from its chunks."""

    request_id: str
    status: str
    outputs: dict[str, Any]
    text: str
    cached: bool
    pool: str | None
    program_version: int | None
    chunks: int
    elapsed_s: float
    program_id: str | None = None
    partial: bool = False
    """A pipeline run: an optional stage failed and its defaults were used."""
    stages: tuple[dict[str, Any], ...] = ()
    """A pipeline run: one StageStatus per stage (state, pool, started_at, finished_at, error)."""
    session: dict[str, Any] | None = None
    """A session's turn: ``session_id``, ``turn``, ``fresh`` and ``expired`` (docs/sessions.md)."""

    @classmethod
    def from_chunks(cls, chunks: list[Chunk], elapsed_s: float) -> Result:
        """Assemble a result from a request's chunks in order, the final one last."""
        final = chunks[-1]
        return cls(
            request_id=final.request_id,
            status=final.status,
            outputs=dict(final.outputs or {}),
            text="".join(chunk.delta for chunk in chunks),
            cached=final.cached,
            pool=final.pool,
            program_version=final.program_version,
            chunks=len(chunks),
            elapsed_s=elapsed_s,
            program_id=final.program_id,
            partial=final.partial,
            stages=final.stages,
            session=final.session,
        )


class RequestFailed(DSPexError):
    """The request was answered with a final status other than ``ok``.

    ``result`` is the assembled answer; ``error`` the Response's ErrorInfo as a dict
    (``error_class``, ``message``, ``field``, ``stage``, ``retryable``) or None.
    """

    def __init__(self, result: Result, error: Mapping[str, Any] | None) -> None:
        self.result = result
        self.error = dict(error) if error else None
        info = self.error or {}
        self.request_id = result.request_id
        self.status = result.status
        self.error_class: str | None = info.get("error_class")
        self.field: str | None = info.get("field")
        self.stage: str | None = info.get("stage")
        self.retryable = bool(info.get("retryable", False))
        super().__init__(
            f"request_id={result.request_id} status={result.status} "
            f"error_class={self.error_class} field={self.field} stage={self.stage}: "
            f"{info.get('message', 'no error details')}"
        )


def decode_outputs(request_id: str, outputs: dict[str, str]) -> dict[str, Any]:
    """JSON-decode each output value; a value that is not JSON is kept as the raw string."""
    decoded: dict[str, Any] = {}
    for name, raw in outputs.items():
        try:
            decoded[name] = json.loads(raw)
        except ValueError:
            logger.warning("output is not JSON request_id=%s field=%s", request_id, name)
            decoded[name] = raw
    return decoded


class ChunkAssembler:
    """Orders one request's chunks by ``seq`` and drops duplicates; pure, no I/O.

    :meth:`push` returns the chunks that became deliverable, in order. Once the
    final chunk is delivered, everything else is ignored. :meth:`flush` gives up
    on missing chunks and returns what is buffered (used at the deadline when the
    final chunk arrived but an earlier one never did).
    """

    def __init__(self) -> None:
        self._next = 0
        self._buffer: dict[int, Chunk] = {}
        self.done = False

    @property
    def has_final(self) -> bool:
        """True when the final chunk is buffered behind a gap."""
        return any(chunk.final for chunk in self._buffer.values())

    def push(self, chunk: Chunk) -> list[Chunk]:
        """Accept one chunk; return those now deliverable in ``seq`` order."""
        if self.done or chunk.seq < self._next or chunk.seq in self._buffer:
            return []
        self._buffer[chunk.seq] = chunk
        ready: list[Chunk] = []
        while self._next in self._buffer and not self.done:
            ready.append(self._take(self._next))
        return ready

    def flush(self) -> list[Chunk]:
        """Deliver everything buffered in ``seq`` order, skipping gaps, up to the final chunk."""
        ready: list[Chunk] = []
        for seq in sorted(self._buffer):
            if not self.done:
                ready.append(self._take(seq))
        self._buffer.clear()
        return ready

    def _take(self, seq: int) -> Chunk:
        chunk = self._buffer.pop(seq)
        self._next = seq + 1
        self.done = chunk.final
        return chunk


class Inbox:
    """The chunks of one request in flight, delivered in order to one waiting coroutine."""

    def __init__(
        self, request_id: str, deadline_at: datetime, wait_until: float, grace_s: float
    ) -> None:
        self.request_id = request_id
        self.deadline_at = deadline_at
        self.wait_until = wait_until  # event-loop time: deadline + grace
        self.grace_s = grace_s
        self.received = 0
        self.answered_at: float | None = None  # time.monotonic() when the final chunk came
        self._assembler = ChunkAssembler()
        self._queue: asyncio.Queue[Chunk | DSPexError] = asyncio.Queue()

    def put(self, chunk: Chunk) -> None:
        """Called on the event loop for every chunk with this request id."""
        for ready in self._assembler.push(chunk):
            if ready.final:
                self.answered_at = time.monotonic()
            self._queue.put_nowait(ready)

    def fail(self, error: DSPexError) -> None:
        """Wake the waiter with ``error`` (produce failed, client closed)."""
        self._queue.put_nowait(error)

    async def next(self) -> Chunk:
        """The next chunk in order; RequestTimeout when the deadline (+ grace) passes."""
        item = await self._get()
        if isinstance(item, DSPexError):
            raise item
        self.received += 1
        return item

    async def _get(self) -> Chunk | DSPexError:
        if not self._queue.empty():  # an expired timeout would not look
            return self._queue.get_nowait()
        try:
            # timeout_at, not wait_for: no extra task per request
            async with asyncio.timeout_at(self.wait_until):
                return await self._queue.get()
        except TimeoutError:
            return self._late()

    def _late(self) -> Chunk | DSPexError:
        late = self._assembler.flush() if self._assembler.has_final else []
        if not late:
            return RequestTimeout(self.request_id, self.deadline_at, self.grace_s, self.received)
        logger.warning("chunks missing at deadline request_id=%s: delivering", self.request_id)
        for chunk in late[1:]:
            self._queue.put_nowait(chunk)
        return late[0]


class Dispatcher:
    """Routes chunks to inboxes by request id; lives on the client's event loop."""

    def __init__(self) -> None:
        self._inboxes: dict[str, Inbox] = {}
        self._closed: DSPexError | None = None

    def __len__(self) -> int:
        return len(self._inboxes)

    def open(self, inbox: Inbox) -> Inbox:
        """Register ``inbox`` before its request is produced, so no reply can be missed."""
        if self._closed is not None:
            raise self._closed
        self._inboxes[inbox.request_id] = inbox
        return inbox

    def discard(self, request_id: str) -> None:
        """Forget a request: later chunks for it are ignored as unknown."""
        self._inboxes.pop(request_id, None)

    def deliver(self, chunk: Chunk) -> None:
        """Hand ``chunk`` to its inbox; chunks for unknown request ids are ignored."""
        inbox = self._inboxes.get(chunk.request_id)
        if inbox is None:
            logger.debug("ignoring chunk request_id=%s seq=%s", chunk.request_id, chunk.seq)
            return
        inbox.put(chunk)

    def fail(self, request_id: str, error: DSPexError) -> None:
        """Fail one waiting request (e.g. its request could not be produced)."""
        inbox = self._inboxes.get(request_id)
        if inbox is not None:
            inbox.fail(error)

    def close(self, error: DSPexError) -> None:
        """Fail every waiting request with ``error`` and refuse new ones."""
        self._closed = error
        for inbox in self._inboxes.values():
            inbox.fail(error)
        self._inboxes.clear()
