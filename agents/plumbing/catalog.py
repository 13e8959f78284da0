"""In-memory views of the compacted ``programs`` and ``routing`` topics, and their reader.

Every router instance needs *all* programs and routing tables, and needs them
again after a restart, so these topics are not read through the faust consumer
group (which would split partitions between instances and resume from committed
offsets). :class:`CompactedReader` assigns every partition to a group-less
aiokafka consumer, reads from the beginning, reports ready once it has caught up
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
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition  # type: ignore[import-untyped]

from dspex.agents.plumbing.messages import Consumed
from dspex.streams.errors import DSPexError, InvalidRequest, PermanentError, SerdeError
from dspex.streams.kafka import aiokafka_options
from dspex.streams.serde import Serde
from dspex.streams.settings import KafkaSettings

logger = logging.getLogger(__name__)

Record = dict[str, Any]
Apply = Callable[[str, Record | None], object]
"""Takes one record (None: a tombstone); may return a PermanentError refusing it."""
Refused = Callable[[Consumed, DSPexError, bool], Awaitable[None]]
"""Told of a refused or undecodable record: (where it came from, why, reader is live)."""


class ProgramCatalog:
    """Registered program versions by id; a tombstone removes the program."""

    def __init__(self) -> None:
        self._versions: dict[str, dict[int, Record]] = {}

    def apply(self, key: str, record: Record | None) -> None:
        """Take one ``programs`` record (``None`` = tombstone for ``key``)."""
        if record is None:
            self._versions.pop(key, None)
            return
        self._versions.setdefault(record["program_id"], {})[record["version"]] = record

    def resolve(self, program_id: str, version: int | None) -> Record:
        """The requested (else latest) version, or :class:`InvalidRequest` naming the field."""
        versions = self._versions.get(program_id)
        if not versions:
            raise InvalidRequest("program_id", f"no program {program_id!r} is registered")
        if version is None:
            return versions[max(versions)]
        if version not in versions:
            known = ", ".join(str(v) for v in sorted(versions))
            raise InvalidRequest(
                "program_version", f"{program_id} has no version {version} (known: {known})"
            )
        return versions[version]

    def __len__(self) -> int:
        return len(self._versions)


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
    """Follows whole compacted topics from offset 0 and feeds each record to a view."""

    def __init__(
        self,
        bootstrap: str,
        kafka: KafkaSettings,
        serde: Serde,
        views: Mapping[str, tuple[str, Apply]],
        *,
        on_refused: Refused | None = None,
        recent: Mapping[str, int] | None = None,
    ) -> None:
        """``views`` maps a physical topic name to (schema name, apply function).

        ``on_refused`` hears of every record a view refused or the serde could not
        decode, with ``live`` false while the topics are still being replayed.
        ``recent`` maps some of those topics to a record budget: each is replayed
        from its newest ``budget / partitions`` records per partition only, and
        :attr:`ready` does not wait for it (:attr:`warm` does).
        """
        unknown = set(recent or {}) - set(views)
        if unknown:
            raise ValueError(f"recent topics without a view: {sorted(unknown)}")
        self._bootstrap = bootstrap
        self._kafka = kafka
        self._serde = serde
        self._views = dict(views)
        self._recent = dict(recent or {})
        self._on_refused = on_refused
        self._consumer: Any = None
        self._task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()
        """Set once every topic but the recent ones is read up to its end offset at start."""
        self.warm = asyncio.Event()
        """Set once every topic, the recent ones too, is read up to its end offset at start."""

    async def start(self, partitions: Mapping[str, int]) -> None:
        """Assign every partition (``partitions``: count per topic) from the beginning."""
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # optimizer jobs publish programs and variables in transactions: a fenced
            # job runner's aborted records must never be served
            isolation_level="read_committed",
            **aiokafka_options(self._kafka),
        )
        await self._consumer.start()
        tps = [TopicPartition(t, p) for t in self._views for p in range(partitions[t])]
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        ends = await self._consumer.end_offsets(tps)
        await self._seek_recent(tps, partitions, ends)
        self._task = asyncio.create_task(self._follow(tps, ends), name="compacted-reader")

    async def _seek_recent(
        self, tps: list[Any], partitions: Mapping[str, int], ends: Mapping[Any, int]
    ) -> None:
        """Start each recent topic's partitions ``budget / partitions`` records before the end."""
        recent = [tp for tp in tps if tp.topic in self._recent]
        if not recent:
            return
        beginnings = await self._consumer.beginning_offsets(recent)
        for tp in recent:
            per_partition = -(-self._recent[tp.topic] // max(partitions[tp.topic], 1))
            self._consumer.seek(tp, max(beginnings[tp], ends[tp] - per_partition))

    async def stop(self) -> None:
        """Stop following and close the consumer."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()

    async def _follow(self, tps: list[Any], ends: Mapping[Any, int]) -> None:
        required = [tp for tp in tps if tp.topic not in self._recent]
        recent = [tp for tp in tps if tp.topic in self._recent]
        while True:
            try:
                batches = await self._consumer.getmany(timeout_ms=200)
                for messages in batches.values():
                    for message in messages:
                        refused = self._apply(message)
                        if refused is not None:
                            await self._report(message, refused)
                # positions only grow: once ready, warm waits on the recent topics alone
                if not self.ready.is_set():
                    if await self._caught_up(required, ends):
                        self.ready.set()
                elif not self.warm.is_set() and await self._caught_up(recent, ends):
                    self.warm.set()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("compacted reader failed; retrying in 1s")
                await asyncio.sleep(1.0)

    async def _caught_up(self, tps: list[Any], ends: Mapping[Any, int]) -> bool:
        for tp in tps:
            if await self._consumer.position(tp) < ends[tp]:
                return False
        return True

    def _apply(self, message: Any) -> DSPexError | None:
        schema, apply = self._views[message.topic]
        key = (message.key or b"").decode("utf-8", "replace")
        try:
            record = None
            if message.value is not None:
                record = self._serde.decode(message.value, topic=message.topic, expect=schema)
            refused = apply(key, record.record if record is not None else None)
        except (SerdeError, KeyError, TypeError) as exc:
            logger.warning(
                "skipping unreadable record topic=%s partition=%s offset=%s error=%s",
                message.topic,
                message.partition,
                message.offset,
                exc,
            )
            return exc if isinstance(exc, SerdeError) else None
        if isinstance(refused, PermanentError):
            logger.warning(
                "refused record topic=%s partition=%s offset=%s key=%s error=%s",
                message.topic,
                message.partition,
                message.offset,
                key,
                refused,
            )
            return refused
        return None

    async def _report(self, message: Any, error: DSPexError) -> None:
        if self._on_refused is None:
            return
        original = Consumed(
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            key=message.key,
            value=message.value,
            headers=tuple(message.headers or ()),
            timestamp_ms=message.timestamp,
        )
        try:
            await self._on_refused(original, error, self.ready.is_set())
        except Exception:  # reporting must not stop the views from following
            logger.exception("could not report refused record %s", original.where())
