"""In-memory views of the compacted programs, pipelines and routing topics, and their reader.

Every router instance needs *all* programs and routing tables, and needs them
again after a restart, so these topics are not read through a consumer
group (which would split partitions between instances and resume from committed
offsets). :class:`CompactedReader` assigns every partition to a group-less
librdkafka consumer, reads from the beginning, reports ready once it has caught up
with the end offsets it saw at start, then keeps following: a new program
version, routing table or variable (:mod:`dspex.agents.router.variables`) takes effect
without a restart. A *recent* topic (the result cache) is read from near its
end instead — only its newest records, up to a budget — and readiness does not
wait for it: a large cache topic must not hold up, or time out, a router's start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from confluent_kafka import TopicPartition

from dspex.agents.plumbing.messages import Consumed
from dspex.schemas.records import Record
from dspex.streams import kafka
from dspex.streams.errors import DSPexError, InvalidRequest, PermanentError, SerdeError
from dspex.streams.reader import StallGuard, watermarks
from dspex.streams.serde import Serde
from dspex.streams.settings import Settings

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
READ_TIMEOUT_S = 30.0

Apply = Callable[[str, Record | None], object]
"""Takes one record (None: a tombstone); may return a PermanentError refusing it."""
Refused = Callable[[Consumed, DSPexError, bool], Awaitable[None]]
"""Told of a refused or undecodable record: (where it came from, why, reader is live)."""


class VersionCatalog:
    """Registered versions of something (programs, pipelines) by id; a tombstone removes it.

    ``kind`` names the thing in errors and its record's ``<kind>_id`` field; a request's
    ``<kind>_id`` / ``<kind>_version`` fields are the ones errors name.
    """

    kind = "program"

    def __init__(self) -> None:
        self._versions: dict[str, dict[int, Record]] = {}
        self.changes = 0
        """Records taken so far: what was derived from the catalog is stale once it moves."""

    def apply(self, key: str, record: Record | None) -> None:
        """Take one record (``None`` = tombstone for ``key``)."""
        self.changes += 1
        if record is None:
            self._versions.pop(key, None)
            return
        self._versions.setdefault(record[f"{self.kind}_id"], {})[record["version"]] = record

    def resolve(self, ident: str, version: int | None) -> Record:
        """The requested (else latest) version, or :class:`InvalidRequest` naming the field."""
        versions = self._versions.get(ident)
        if not versions:
            raise InvalidRequest(f"{self.kind}_id", f"no {self.kind} {ident!r} is registered")
        if version is None:
            return versions[max(versions)]
        if version not in versions:
            known = ", ".join(str(v) for v in sorted(versions))
            raise InvalidRequest(
                f"{self.kind}_version", f"{ident} has no version {version} (known: {known})"
            )
        return versions[version]

    def __len__(self) -> int:
        return len(self._versions)


class ProgramCatalog(VersionCatalog):
    """Registered program versions by id (the ``programs`` topic)."""

    kind = "program"


class PipelineCatalog(VersionCatalog):
    """Registered pipeline versions by id (the ``pipelines`` topic)."""

    kind = "pipeline"


class RoutingCatalog:
    """The latest RoutingTable per program id; ``*`` is the default for the rest."""

    def __init__(self) -> None:
        self._tables: dict[str, Record] = {}

    def apply(self, key: str, record: Record | None) -> None:
        """Take one ``routing`` record (``None`` = tombstone for ``key``)."""
        if record is None:
            self._tables.pop(key, None)
            return
        held = self._tables.get(record["program_id"])
        if held is not None and int(record.get("version") or 0) < int(held.get("version") or 0):
            return  # an older table read after a newer one (another partition): keep the newer
        self._tables[record["program_id"]] = record

    def table_for(self, program_id: str | None) -> Record | None:
        """The program's own table, else the default ``*`` table, else ``None``."""
        if program_id is not None and program_id in self._tables:
            return self._tables[program_id]
        return self._tables.get("*")


class CompactedReader:
    """Follows whole compacted topics from offset 0 and feeds each record to a view.

    A group-less librdkafka consumer (a throwaway group id, nothing committed) reads
    every partition on one thread of its own; records are decoded and applied on
    the event loop, so views need no locks.
    """

    def __init__(
        self,
        settings: Settings,
        serde: Serde,
        views: Mapping[str, tuple[str, Apply]],
        *,
        on_refused: Refused | None = None,
        recent: Mapping[str, int] | None = None,
        since: Mapping[str, int] | None = None,
    ) -> None:
        """``views`` maps a physical topic name to (schema name, apply function).

        ``on_refused`` hears of every record a view refused or the serde could not
        decode, with ``live`` false while the topics are still being replayed.
        ``recent`` maps some of those topics to a record budget: each is replayed
        from its newest ``budget / partitions`` records per partition only, and
        :attr:`ready` does not wait for it (:attr:`warm` does). ``since`` maps some
        topics to a time (UTC epoch ms): each is read from its first record at or after
        that time (a delete topic followed like a log, e.g. the pipeline agent's replies).
        """
        unknown = (set(recent or {}) | set(since or {})) - set(views)
        if unknown:
            raise ValueError(f"recent topics without a view: {sorted(unknown)}")
        self._settings = settings
        self._serde = serde
        self._views = dict(views)
        self._recent = dict(recent or {})
        self._since = dict(since or {})
        self._on_refused = on_refused
        self._consumer: Any = None
        self._stalls: StallGuard | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="dspex-compacted")
        self._task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()
        """Set once every topic but the recent ones is read up to its end offset at start."""
        self.warm = asyncio.Event()
        """Set once every topic, the recent ones too, is read up to its end offset at start."""

    async def start(self, partitions: Mapping[str, int]) -> None:
        """Assign every partition (``partitions``: count per topic); recent ones near the end."""
        self._consumer = await self._call(self._make_consumer)
        self._stalls = StallGuard(self._consumer)
        tps = [TopicPartition(t, p) for t in self._views for p in range(partitions[t])]
        ranges = await self._call(partial(self._assign, tps))
        self._task = asyncio.create_task(self._follow(ranges), name="compacted-reader")

    def _make_consumer(self) -> Any:
        return kafka.consumer(
            self._settings,
            f"dspex-compacted-{uuid.uuid4().hex}",
            # optimizer jobs publish programs and variables in transactions: a fenced
            # job runner's aborted records must never be served
            **{"isolation.level": "read_committed", "enable.partition.eof": False},
        )

    def _assign(self, tps: list[TopicPartition]) -> dict[tuple[str, int], tuple[int, int]]:
        """Assign each partition at its start; ``(start, end)`` offsets per partition.

        :func:`~dspex.streams.reader.watermarks` retries the leaderless moments of a
        topic created just before.
        """
        counts: dict[str, int] = {}
        for tp in tps:
            counts[tp.topic] = counts.get(tp.topic, 0) + 1
        ranges: dict[tuple[str, int], tuple[int, int]] = {}
        for topic in counts:
            marks = watermarks(self._consumer, topic, READ_TIMEOUT_S)
            times = self._offsets_since(topic, list(marks)) if topic in self._since else {}
            for tp in (tp for tp in tps if tp.topic == topic):
                low, high = marks[tp.partition]
                start = low
                if topic in self._recent:
                    start = max(low, high - -(-self._recent[topic] // counts[topic]))
                if topic in self._since:
                    found = times.get(tp.partition, -1)
                    start = high if found < 0 else max(low, found)
                ranges[(topic, tp.partition)] = (start, high)
        assigned = [TopicPartition(t, p, start) for (t, p), (start, _) in ranges.items()]
        self._consumer.assign(assigned)
        if self._stalls is not None:
            self._stalls.assigned(assigned)
        return ranges

    def _offsets_since(self, topic: str, partitions: list[int]) -> dict[int, int]:
        """Per partition, the first offset at or after ``since[topic]`` (-1: none yet)."""
        wanted = [TopicPartition(topic, p, self._since[topic]) for p in partitions]
        found = self._consumer.offsets_for_times(wanted, timeout=READ_TIMEOUT_S)
        return {tp.partition: tp.offset for tp in found}

    async def stop(self) -> None:
        """Stop following and close the consumer."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._stalls is not None:
            await self._call(self._stalls.close)
        if self._consumer is not None:
            await self._call(self._consumer.close)
        self._thread.shutdown(wait=False)

    async def _follow(self, ranges: Mapping[tuple[str, int], tuple[int, int]]) -> None:
        # a partition with nothing to read at start is caught up already
        behind = {tp: end for tp, (start, end) in ranges.items() if end > start}
        required = {tp for tp in behind if tp[0] not in self._recent}
        recent = {tp for tp in behind if tp[0] in self._recent}
        while True:
            try:
                for message in await self._call(self._take_ready):
                    if message.error() is None:
                        await self._take(message)
                await self._update_readiness(behind, required, recent)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("compacted reader failed; retrying in 1s")
                await asyncio.sleep(1.0)

    def _take_ready(self) -> list[Any]:
        # consume(n, t) returns only when n records arrived or t passed: wait for the
        # first, then take what else is fetched already, so a new record is applied at
        # once (a program version a job just published must route the next request)
        first: list[Any] = self._consumer.consume(1, 0.2)
        if self._stalls is not None:  # librdkafka may stop fetching after a broker restart
            self._stalls.check()
        return [*first, *self._consumer.consume(499, 0)] if first else first

    async def _take(self, message: Any) -> None:
        refused = self._apply(message)
        if refused is not None:
            await self._report(message, refused)

    async def _update_readiness(
        self, behind: dict[tuple[str, int], int], required: set[Any], recent: set[Any]
    ) -> None:
        if behind and not self.warm.is_set():
            # positions, not offsets: compacted partitions and transaction markers leave holes
            tps = [TopicPartition(t, p) for t, p in behind]
            for tp in await self._call(partial(self._consumer.position, tps)):
                if tp.offset >= behind[(tp.topic, tp.partition)]:
                    del behind[(tp.topic, tp.partition)]
        if not self.ready.is_set() and not required & behind.keys():
            self.ready.set()
        if self.ready.is_set() and not recent & behind.keys():
            self.warm.set()

    def _apply(self, message: Any) -> DSPexError | None:
        topic = str(message.topic())
        schema, apply = self._views[topic]
        key = (message.key() or b"").decode("utf-8", "replace")
        value = message.value()
        try:
            record = None
            if value is not None:
                record = self._serde.decode(value, topic=topic, expect=schema)
            refused = apply(key, record.record if record is not None else None)
        except (SerdeError, KeyError, TypeError) as exc:
            logger.warning("skipping unreadable record %s error=%s", _where(message), exc)
            return exc if isinstance(exc, SerdeError) else None
        if isinstance(refused, PermanentError):
            logger.warning("refused record %s key=%s error=%s", _where(message), key, refused)
            return refused
        return None

    async def _report(self, message: Any, error: DSPexError) -> None:
        if self._on_refused is None:
            return
        original = Consumed.from_message(message)
        try:
            await self._on_refused(original, error, self.ready.is_set())
        except Exception:  # reporting must not stop the views from following
            logger.exception("could not report refused record %s", original.where())

    async def _call(self, call: Callable[[], _T]) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, call)


def _where(message: Any) -> str:
    return f"topic={message.topic()} partition={message.partition()} offset={message.offset()}"
