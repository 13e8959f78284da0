"""The sessions agent: follows the ``sessions`` topic, tombstones expired sessions, and
publishes each session's counters to ``metrics``.

Workers already treat a session past its ``expires_at`` as expired when its next
turn comes (the turn starts afresh and says so), so expiry does not depend on
this agent's timing; the tombstone is what removes the state from the topic
(compaction then drops it). It keeps only ``session id -> expires_at`` in memory.
One instance is enough; two would only tombstone the same sessions twice.

Each tombstone carries ``dspex-session-ended: expired`` and goes to the
session's own partition (:func:`~dspex.streams.sessions.session_partition`).
Every sweep also publishes one ``session`` MetricSnapshot per session written
since the last sweep (labels ``session_id``; ``count`` turns, ``tokens``,
``cost_usd``, ``value`` the mean run time per turn in ms, the window from the
session's creation to its last turn) — at start, one for every live session.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable

from dspex.agents.plumbing.catalog import CompactedReader
from dspex.agents.plumbing.publisher import Publisher, serve_deliveries
from dspex.schemas import records, times
from dspex.schemas.records import Record
from dspex.streams import kafka
from dspex.streams.ops.admin import require_topics
from dspex.streams.serde import make_serde
from dspex.streams.sessions import ENDED_HEADER, WRITER_HEADER, session_partition
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics

logger = logging.getLogger(__name__)

WRITER = "sweeper"
METRIC = "session"


class Expiries:
    """``session id -> expires_at`` (epoch ms) of every live session on the topic, and the
    states written since :meth:`take_changed` was last called."""

    def __init__(self) -> None:
        self.due: dict[str, int] = {}
        self._changed: dict[str, Record] = {}

    def apply(self, key: str, record: Record | None) -> None:
        expires = times.to_ms(record["expires_at"]) if record is not None else None
        if record is None or expires is None:
            self.due.pop(key, None)
            self._changed.pop(key, None)
        else:
            self.due[key] = expires
            self._changed[key] = record

    def expired(self, now_ms: int) -> list[str]:
        return [key for key, at in self.due.items() if at <= now_ms]

    def take_changed(self) -> dict[str, Record]:
        changed, self._changed = self._changed, {}
        return changed


def session_snapshot(state: Record) -> Record:
    """The ``session`` MetricSnapshot of one session's counters."""
    counters = state["counters"]
    turns = int(counters["turns"])
    return records.metric_snapshot(
        name=METRIC,
        window_start=state["created_at"],
        window_end=state["updated_at"],
        labels={"session_id": state["session_id"]},
        count=turns,
        tokens=int(counters["prompt_tokens"]) + int(counters["completion_tokens"]),
        cost_usd=float(counters["cost_usd"]),
        value=float(counters["latency_ms"]) / turns if turns else None,
    )


class SessionVariables:
    """The ``variables`` keys of each session's own variables (scope ``session``)."""

    def __init__(self) -> None:
        self.keys: dict[str, set[str]] = {}
        self._owner: dict[str, str] = {}

    def apply(self, key: str, record: Record | None) -> None:
        owner = self._owner.pop(key, None)
        if owner is not None:
            self.keys.get(owner, set()).discard(key)
        if record is not None and record.get("scope") == "session" and record.get("scope_ref"):
            session_id = str(record["scope_ref"])
            self._owner[key] = session_id
            self.keys.setdefault(session_id, set()).add(key)


class SessionSweeper:
    """Tombstones each session once its ``expires_at`` has passed, every ``sweep_interval_s``."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        topics = Topics(settings.topics)
        self.topic = topics.name("sessions")
        self._partitions = topics.spec("sessions").partitions
        self._clock = clock
        self.expiries = Expiries()
        self.variables = SessionVariables()
        self._variables_topic = topics.name("variables")
        self._metrics_topic = topics.name("metrics")
        self.swept = 0
        self._reader = CompactedReader(
            settings,
            make_serde(settings),
            {
                self.topic: ("SessionState", self.expiries.apply),
                self._variables_topic: ("VariableUpdate", self.variables.apply),
            },
        )

    async def serve(self, stop: asyncio.Event) -> None:
        """Follow and sweep until ``stop`` is set."""
        partitions = await asyncio.to_thread(
            require_topics,
            kafka.admin_client(self.settings),
            [self.topic, self._variables_topic, self._metrics_topic],
            "sessions",
        )
        await self._reader.start(partitions)
        producer = kafka.producer(self.settings, **{"client.id": f"{self.topic}-sweeper"})
        publisher = Publisher(producer, make_serde(self.settings), asyncio.get_running_loop())
        deliveries = asyncio.create_task(serve_deliveries(publisher))
        try:
            await self._reader.ready.wait()
            while not stop.is_set():
                await self.sweep(publisher)
                try:
                    await asyncio.wait_for(stop.wait(), self.settings.sessions.sweep_interval_s)
                except TimeoutError:
                    pass
        finally:
            await publisher.flush(10)
            deliveries.cancel()
            await asyncio.gather(deliveries, return_exceptions=True)
            await self._reader.stop()

    async def sweep(self, publisher: Publisher) -> int:
        """Tombstone every expired session and its session variables; returns how many
        sessions (once the broker has every tombstone)."""
        doomed = self.expiries.expired(int(self._clock() * 1000))
        headers: list[tuple[str, bytes | None]] = [
            (ENDED_HEADER, b"expired"),
            (WRITER_HEADER, WRITER.encode()),
        ]
        sent = []
        for session_id in doomed:
            partition = session_partition(session_id, self._partitions)
            sent.append(
                await publisher.send_bytes(self.topic, session_id, None, headers, partition)
            )
            self.expiries.due.pop(session_id, None)
            for key in sorted(self.variables.keys.pop(session_id, set())):
                sent.append(await publisher.send_bytes(self._variables_topic, key, None, headers))
        for state in self.expiries.take_changed().values():
            sent.append(
                await publisher.send(
                    self._metrics_topic, METRIC, "MetricSnapshot", session_snapshot(state)
                )
            )
        await asyncio.gather(*sent)
        if doomed:
            logger.info("tombstoned %d expired session(s) topic=%s", len(doomed), self.topic)
        self.swept += len(doomed)
        return len(doomed)

    def run(self) -> None:
        """Serve until SIGINT/SIGTERM (``python -m dspex.agents sessions``)."""
        asyncio.run(_until_signalled(self))


async def _until_signalled(sweeper: SessionSweeper) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await sweeper.serve(stop)
