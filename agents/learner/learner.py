"""The learning agent: turns execution Telemetry into RoutingTables on the ``routing`` topic.

:class:`Learner` is the whole logic, free of faust: it decodes one telemetry
record, updates that program's decayed statistics (:mod:`dspex.agents.learner.bandit`) in a
string-valued mapping, and says which tables to publish. :class:`LearnerApp`
wires it into a faust app: one agent on ``telemetry`` (concurrency 1, the only
writer of the ``stats`` table), a timer that publishes what became due, and a
:class:`~dspex.agents.plumbing.catalog.CompactedReader` on ``routing`` so every table continues
the previous version, including after a restart.

Statistics live in a changelog-backed faust Table keyed by program id (the
telemetry key), so they move with their partition on a rebalance and are
recovered from the changelog after a restart; ``docs/learning.md`` says why
this beats re-reading telemetry. Start it with ``make_learner(settings).run()``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from dspex.agents.learner.bandit import (
    Decision,
    changed,
    decide,
    pool_hints,
)
from dspex.agents.learner.stats import Observation, ProgramStats
from dspex.agents.plumbing.catalog import CompactedReader, RoutingCatalog
from dspex.agents.plumbing.faustapp import (
    create_changelogs,
    faust_app,
    send,
    serve_until_signalled,
)
from dspex.agents.plumbing.messages import Consumed, ErrorInfo, Outgoing
from dspex.agents.plumbing.records import dead_letter
from dspex.schemas import records
from dspex.schemas.records import Record
from dspex.schemas.times import to_ms
from dspex.streams import kafka
from dspex.streams.errors import ConfigError, SerdeError
from dspex.streams.ops.admin import require_topics
from dspex.streams.serde import Serde, make_serde
from dspex.streams.settings import LearnerSettings, Settings
from dspex.streams.topics import Topics

logger = logging.getLogger(__name__)

COMPONENT = "learner"
READY_TIMEOUT_S = 60.0
NEEDED_TOPICS = ("telemetry", "routing", "dlq")


class RecentVariants:
    """The variant that ran each recently answered request, oldest forgotten first."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._variants: OrderedDict[str, str] = OrderedDict()

    def remember(self, request_id: str, variant: str) -> None:
        self._variants[request_id] = variant
        self._variants.move_to_end(request_id)
        while len(self._variants) > self._capacity:
            self._variants.popitem(last=False)

    def get(self, request_id: str) -> str | None:
        return self._variants.get(request_id)


@dataclass
class _Published:
    """What this learner last decided and published for one program."""

    version: int = 0
    weights: dict[str, float] | None = None
    demoted: frozenset[str] = frozenset()
    cooling: dict[str, str] = field(default_factory=dict)
    """Variants cooling down in the last table, and why (a new why is a new table)."""
    published_at: float = 0.0
    decided_at: float = 0.0
    wake_at: float | None = None
    """When a cooldown in the last decision ends: decide again then, telemetry or not."""


@dataclass
class Learner:
    """Telemetry in, statistics updated, tables out; no faust, so unit-testable."""

    settings: Settings
    config: LearnerSettings
    serde: Serde
    stats: MutableMapping[str, str]
    routing: RoutingCatalog
    clock: Callable[[], float] = time.time
    rng: random.Random = field(default_factory=random.Random)
    dirty: set[str] = field(default_factory=set)
    urgent: set[str] = field(default_factory=set)
    """Programs where a variant just started cooling down or was demoted: published without
    waiting for ``publish_interval_s`` (a cooldown lasts longer, so this cannot flap)."""
    stale: set[str] = field(default_factory=set)
    """Programs whose newest evidence is not in a published table: no material move yet.
    They get a table once ``refresh_interval_s`` has passed since their last one."""
    state: dict[str, _Published] = field(default_factory=dict)
    loads: dict[str, ProgramStats] = field(default_factory=dict)
    answered: RecentVariants = field(default_factory=lambda: RecentVariants(100_000))

    def __post_init__(self) -> None:
        topics = Topics(self.settings.topics)
        self.routing_topic = topics.name("routing")
        self.dlq_topic = topics.name("dlq")
        self.candidates = dict(self.config.candidates)

    def learn(self, original: Consumed) -> list[Outgoing]:
        """Take one telemetry record; an undecodable one becomes a DeadLetter."""
        try:
            if original.value is None:
                raise SerdeError("tombstone where Telemetry was expected", topic=original.topic)
            record = self.serde.decode(original.value, topic=original.topic, expect="Telemetry")
        except SerdeError as exc:
            logger.warning("undecodable telemetry %s error=%s", original.where(), exc)
            return [self._dead_letter(original, exc)]
        self.observe(
            record.record, source=f"{original.topic}:{original.partition}", offset=original.offset
        )
        return []

    def observe(self, record: Record, *, source: str = "", offset: int = -1) -> None:
        """Learn from one decoded Telemetry record (kinds other than execution are ignored).

        ``source`` and ``offset`` (the record's partition and offset) make a redelivered
        record count once: see :attr:`ProgramStats.seen`.
        """
        program_id = record.get("program_id")
        if not program_id or record.get("cache_hit"):
            return
        if record.get("kind") == "feedback":
            self._feedback(program_id, record, source, offset)
            return
        kind = record.get("kind")
        if kind not in ("execution", "attempt") or record.get("error_class") == "Overloaded":
            return  # an overloaded request never ran: it says nothing about its variant
        emitted = to_ms(record.get("emitted_at"))
        # an attempt's latency is the whole request's (fallback included), not its variant's
        timed = kind == "execution"
        obs = Observation.of(
            record.get("variant"),
            record.get("pool"),
            None if emitted is None else emitted / 1000.0,
            record.get("success"),
            record.get("latency_ms") if timed else None,
            record.get("queue_wait_ms") if timed else None,
            record.get("quality"),
            record.get("cost_usd"),
            record.get("error_class"),
        )
        if obs is None:
            return
        stats = ProgramStats.from_json(self.stats.get(program_id))
        if source and stats.counted(source, offset):
            logger.debug("telemetry counted already %s@%d", source, offset)
            return
        now = self.clock()
        before = stats.arms.get(obs.variant)
        was = (before.cooling(now), before.demoted) if before else ("", "")
        stats.observe(obs, now, self.config.bandit)
        arm = stats.arms[obs.variant]
        if (arm.cooling(now) and arm.cooling(now) != was[0]) or (arm.demoted and not was[1]):
            self.urgent.add(program_id)
        self.stats[program_id] = stats.to_json()
        self.dirty.add(program_id)
        if record.get("request_id") and kind == "execution":  # who answered, for feedback
            self.answered.remember(str(record["request_id"]), obs.variant)

    def _feedback(self, program_id: str, record: Record, source: str, offset: int) -> None:
        """A client's quality score for an answered request, credited to its variant.

        The variant is the record's own, else the one this learner saw run the
        request (feedback travels keyed by program id, so it meets the execution's
        telemetry in the same partition, after it).
        """
        request_id = str(record.get("request_id") or "")
        variant = record.get("variant") or self.answered.get(request_id)
        emitted = to_ms(record.get("emitted_at"))
        stats = ProgramStats.from_json(self.stats.get(program_id))
        if source and stats.counted(source, offset):
            return
        applied = isinstance(variant, str) and stats.feedback(
            variant,
            record.get("quality"),
            None if emitted is None else emitted / 1000.0,
            self.clock(),
            self.config.bandit,
        )
        if not applied:
            logger.info(
                "ignoring feedback program_id=%s request_id=%s variant=%s quality=%s",
                program_id,
                request_id,
                variant,
                record.get("quality"),
            )
            return
        self.stats[program_id] = stats.to_json()
        self.dirty.add(program_id)

    def due_tables(self) -> list[tuple[str, Record]]:
        """RoutingTables to publish now: changed materially, rate limited per program.

        Evidence that moved nothing materially is published with the next refresh
        (``refresh_interval_s`` after the last table), so a table's ``learned_from``
        catches up with every observation even after the traffic stops.
        """
        now = self.clock()
        refresh = self.config.refresh_interval_s
        due = {p for p in self.stale if now - self._state(p).published_at >= refresh}
        due |= {p for p, s in self.state.items() if s.wake_at is not None and now >= s.wake_at}
        tables = []
        for program_id in sorted(self.dirty | due):
            state = self._state(program_id)
            since = now - max(state.decided_at, state.published_at)
            if since < self.config.publish_interval_s and program_id not in self.urgent:
                continue
            self.urgent.discard(program_id)
            self.dirty.discard(program_id)
            self.stale.discard(program_id)
            table = self._decide(program_id, state, now)
            if table is not None:
                tables.append((program_id, table))
            else:
                self.stale.add(program_id)
        return tables

    def _decide(self, program_id: str, state: _Published, now: float) -> Record | None:
        stats = ProgramStats.from_json(self.stats.get(program_id))
        self.loads[program_id] = stats.at(now, self.config.bandit)
        previous = self._table(program_id)
        candidates = {v["name"]: v["pool"] for v in (previous or {}).get("variants", [])}
        candidates.update(self.candidates)
        decision = decide(
            stats,
            candidates,
            self.config.objective_for(program_id),
            self.config.bandit,
            self.rng,
            now,
            state.weights,
            state.demoted,
            state.cooling,
            state.published_at,
        )
        state.decided_at = now
        state.wake_at = decision.wake_at
        threshold = self.config.material_change
        moved = changed(state.weights, decision.weights, threshold)
        moved |= now - state.published_at >= self.config.refresh_interval_s
        moved |= decision.cooling != state.cooling
        if not moved and frozenset(decision.demoted) == state.demoted:
            return None
        state.version = max(state.version, int((previous or {}).get("version") or 0)) + 1
        state.weights, state.demoted = decision.weights, frozenset(decision.demoted)
        state.cooling = dict(decision.cooling)
        state.published_at = now
        return self._record(program_id, state.version, decision, previous, now)

    def _record(
        self,
        program_id: str,
        version: int,
        decision: Decision,
        previous: Record | None,
        now: float,
    ) -> Record:
        earlier = {v["name"]: v for v in (previous or {}).get("variants", [])}
        return records.routing_table(
            program_id=program_id,
            version=version,
            created_at=int(now * 1000),
            objective=self.config.objective_for(program_id).label(),
            reason=decision.reason,
            variants=[
                _variant(name, weight, decision.pools[name], earlier.get(name))
                for name, weight in sorted(decision.weights.items())
            ],
            fallback=decision.fallback,
            learned_from=decision.learned_from,
            pool_hints=self.pool_hints(),
        )

    def pool_hints(self) -> dict[str, int]:
        """Consumers per pool for all the load this learner has seen, across programs."""
        arms = [arm for stats in self.loads.values() for arm in stats.arms.values()]
        in_flight = {name: pool.in_flight for name, pool in self.settings.pools.items()}
        return pool_hints(arms, in_flight, self.config.bandit)

    def _state(self, program_id: str) -> _Published:
        if program_id not in self.state:
            table = self._table(program_id) or {}
            weights = {v["name"]: v["weight"] for v in table.get("variants", [])} or None
            created = (to_ms(table.get("created_at")) or 0) / 1000.0
            version = int(table.get("version") or 0)
            self.state[program_id] = _Published(version, weights, published_at=created)
        return self.state[program_id]

    def _table(self, program_id: str) -> Record | None:
        table = self.routing.table_for(program_id)
        return table if table is not None and table.get("program_id") == program_id else None

    def encode(self, program_id: str, table: Record) -> Outgoing:
        value = self.serde.encode("RoutingTable", table, topic=self.routing_topic)
        return Outgoing(self.routing_topic, program_id.encode("utf-8"), value)

    def _dead_letter(self, original: Consumed, exc: Exception) -> Outgoing:
        now_ms = int(self.clock() * 1000)
        failure = ErrorInfo.from_exception(exc, "decode")
        record = dead_letter(original, failure, component=COMPONENT, failed_at_ms=now_ms)
        value = self.serde.encode("DeadLetter", record, topic=self.dlq_topic)
        return Outgoing(self.dlq_topic, original.key, value)


def _variant(name: str, weight: float, pool: str, earlier: Record | None) -> Record:
    """One table variant; model, module type, variables and program version carry over."""
    earlier = earlier or {}
    return records.variant(
        name=name,
        model=earlier.get("model"),
        module_type=earlier.get("module_type"),
        pool=pool,
        weight=weight,
        variables=earlier.get("variables") or {},
        program_version=earlier.get("program_version"),
    )


class LearnerApp:
    """The learner as a faust app plus the routing reader; start/stop or ``run()``."""

    def __init__(
        self, settings: Settings, *, app_id: str, learner_settings: LearnerSettings
    ) -> None:
        self.settings = settings
        self._topics = Topics(settings.topics)
        serde = make_serde(settings)
        bootstrap = kafka.bootstrap_servers(settings)
        self.app: Any = faust_app(settings, app_id, bootstrap)
        self.routing = RoutingCatalog()
        routing_topic = self._topics.name("routing")
        views = {routing_topic: ("RoutingTable", self.routing.apply)}
        self.reader = CompactedReader(settings, serde, views)
        # Written only by the telemetry agent (concurrency 1): its changelog partition is
        # the telemetry partition of the program, so the partition counts must match.
        partitions = self._topics.spec("telemetry").partitions
        self.stats: Any = self.app.Table(
            "stats", key_type=str, value_type=str, partitions=partitions
        )
        seed = learner_settings.seed
        self.learner = Learner(
            settings,
            learner_settings,
            serde,
            self.stats,
            self.routing,
            rng=random.Random(seed),  # noqa: S311 - traffic splitting
        )
        self._lock = asyncio.Lock()
        self._add_agents(learner_settings.publish_interval_s)

    def _add_agents(self, interval_s: float) -> None:
        telemetry = self.app.topic(
            self._topics.name("telemetry"), key_serializer="raw", value_serializer="raw"
        )
        self.app.agent(telemetry, name="learn", concurrency=1)(self._learn_agent)
        self.app.timer(max(interval_s / 2, 0.1), name="publish-due")(self._tick)

    async def _learn_agent(self, stream: Any) -> None:
        async for event in stream.events():
            original = Consumed.from_faust(event.message)
            try:
                for out in self.learner.learn(original):
                    await self._send(out)
                await self._publish_due()
            except Exception:  # one bad record must not stop learning
                logger.exception("learning failed %s", original.where())

    async def _tick(self, _app: Any) -> None:
        try:
            await self._publish_due()
        except Exception:
            logger.exception("publishing routing tables failed")

    async def _publish_due(self) -> None:
        async with self._lock:
            for program_id, table in self.learner.due_tables():
                logger.info(
                    "routing table program_id=%s version=%s reason=%s",
                    program_id,
                    table["version"],
                    table["reason"],
                )
                await self._send(self.learner.encode(program_id, table))

    async def _send(self, out: Outgoing) -> None:
        await send(self.app, out)

    async def start(self) -> None:
        """Check the topics, read the routing tables, then start learning."""
        partitions = await asyncio.to_thread(self._check_topics)
        routing = self._topics.name("routing")
        await self.reader.start({routing: partitions[routing]})
        try:
            await asyncio.wait_for(self.reader.ready.wait(), READY_TIMEOUT_S)
        except TimeoutError as exc:
            await self.reader.stop()
            raise ConfigError(f"learner: routing topic not read within {READY_TIMEOUT_S}s") from exc
        await self.app.start()

    async def stop(self) -> None:
        """Stop learning (committing what was processed) and stop the reader."""
        await self.app.stop()
        await self.reader.stop()

    def run(self) -> None:
        """Serve until SIGINT/SIGTERM (the ``python -m dspex.agents learner`` entry point)."""
        serve_until_signalled(self)

    def _check_topics(self) -> dict[str, int]:
        names = [self._topics.name(short) for short in NEEDED_TOPICS]
        partitions = require_topics(kafka.admin_client(self.settings), names, "learner")
        create_changelogs(self.settings, self.app)
        return partitions


def make_learner(
    settings: Settings,
    *,
    app_id: str | None = None,
    learner_settings: LearnerSettings | None = None,
) -> LearnerApp:
    """The learner for ``settings``; ``app_id`` (faust id and consumer group) defaults to
    ``<prefix>learner``; ``learner_settings`` defaults to ``settings.learner``."""
    return LearnerApp(
        settings,
        app_id=app_id or f"{settings.topics.prefix}learner",
        learner_settings=learner_settings or settings.learner,
    )
