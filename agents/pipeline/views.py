"""What the pipeline agent follows: run states (``pipeline.state``) and stage answers.

:class:`RunStates` keeps the latest ``PipelineRun`` of every running run (and of the
recently finished ones) and says where to replay stage answers from after a restart;
:class:`StageAnswers` hands each final stage Response from ``pipeline.replies`` to the
run waiting for it, or keeps it until that run resumes.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from dspex.schemas.records import Record
from dspex.schemas.times import to_ms

REPLAY_MARGIN_MS = 10_000  # replies are read from this long before the oldest running stage
FINISHED_KEPT = 10_000
EARLY_KEPT = 50_000


class RunStates:
    """The latest ``PipelineRun`` per run id: every running run, the recent finished ones."""

    def __init__(self) -> None:
        self.running: dict[str, Record] = {}
        self._finished: OrderedDict[str, Record] = OrderedDict()

    def apply(self, key: str, record: Record | None) -> None:
        """Take one ``pipeline.state`` record (``None``: a tombstone)."""
        self.running.pop(key, None)
        self._finished.pop(key, None)
        if record is None:
            return
        if record["status"] == "running":
            self.running[key] = record
            return
        self._finished[key] = record
        while len(self._finished) > FINISHED_KEPT:
            self._finished.popitem(last=False)

    def get(self, run_id: str) -> Record | None:
        return self.running.get(run_id) or self._finished.get(run_id)

    def replay_from(self, now_ms: int) -> int:
        """When to read stage answers from: just before the oldest stage still running."""
        starts = [
            to_ms(event.get("started_at")) or now_ms
            for state in self.running.values()
            for event in state["events"]
            if event["state"] == "started"
        ]
        return min([now_ms, *starts]) - REPLAY_MARGIN_MS


class StageAnswers:
    """Final stage Responses from ``pipeline.replies``, handed to the run waiting for each."""

    def __init__(self) -> None:
        self._waiting: dict[str, tuple[asyncio.Queue[tuple[str, Record]], str]] = {}
        self._early: OrderedDict[str, Record] = OrderedDict()

    def apply(self, _key: str, record: Record | None) -> None:
        """Take one reply; a final one goes to its run, or is kept until the run asks."""
        if record is None or not record.get("final"):
            return
        request_id = str(record["request_id"])
        waiter = self._waiting.get(request_id)
        if waiter is not None:
            waiter[0].put_nowait((waiter[1], record))
            return
        self._early[request_id] = record
        while len(self._early) > EARLY_KEPT:
            self._early.popitem(last=False)

    def wait(self, request_id: str, key: str, queue: asyncio.Queue[tuple[str, Record]]) -> None:
        """Send ``request_id``'s answer to ``queue`` as ``(key, response)`` (now, if it came)."""
        self._waiting[request_id] = (queue, key)
        early = self._early.pop(request_id, None)
        if early is not None:
            queue.put_nowait((key, early))

    def arrived(self, request_id: str) -> bool:
        """Whether ``request_id``'s answer came before anyone waited for it."""
        return request_id in self._early

    def forget(self, request_ids: set[str]) -> None:
        for request_id in request_ids:
            self._waiting.pop(request_id, None)
