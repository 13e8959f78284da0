"""The one consumer loop of the request path: consume, handle concurrently, commit what is done.

Every process on the request path (the router and its retrier, the pool workers)
runs one :class:`ConsumerLoop`: a confluent-kafka (librdkafka) consumer in a
consumer group, whose messages are handled as asyncio tasks, up to a limit at
once. A handler returns when everything the message caused is on the broker;
only then does its offset count as done, and a partition is committed only up to
its lowest unfinished offset (:class:`~dspex.agents.plumbing.offsets.OffsetTracker`):
at-least-once, never skipping a message that is still running.

Threads. Every call on the consumer handle (``consume``, ``commit``, ``pause``,
``close``) runs on one dedicated thread, because librdkafka serialises calls on a
handle and runs rebalance callbacks *inside* ``consume()``. A callback that waited
for work needing the same handle would wait until its timeout: the 40 s stall of
round 2. So the callbacks never wait: on a revoke they commit, synchronously and
from inside the callback, the offsets already known to be done for the revoked
partitions, and forget them; requests still running there finish and answer (a
new owner may run them again: clients dedupe by request id).

Rebalances. ``cooperative-sticky`` assignment revokes only the partitions that
move, so the others keep answering through a rebalance. With an ``instance_id``
(static membership, ``group.instance.id``) a supervised process that restarts
within ``session.timeout.ms`` takes its partitions back without any rebalance.
A consumer that reports a fatal error (a static member fenced, e.g. after a broker
restart) never fetches again: the loop replaces it with a new member (``_renew``).

Back-pressure: at the limit the loop stops taking messages and waits for a slot;
only when no slot frees up for ``keepalive_s`` (long jobs) does it ``pause()`` its
partitions and keep polling, so the group never evicts it (``max.poll.interval.ms``).
The limit is strict: a message that polling returns anyway (fetched before the pause
took effect, or from a partition assigned meanwhile) is put back with ``seek``.

Committing goes through a :class:`Committer`: plain ``commit()`` by default; a
transactional user (the job runner) commits each message's records and its offset
in one Kafka transaction (``send_offsets_to_transaction``) instead. A handler that
raises :class:`Unfinished` leaves its message uncommitted (abandoned on a stop:
the partition's next owner runs it again).

:class:`LoopApp` is the lifecycle of an agent built on one loop (the router, the
pipeline agent): a publisher, the loop as a task, a stop that raises its failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol, TypeVar

from confluent_kafka import (
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from dspex.agents.plumbing.messages import Consumed
from dspex.agents.plumbing.offsets import OffsetTracker
from dspex.agents.plumbing.offsets import TopicPartition as TP
from dspex.agents.plumbing.publisher import Publisher, serve_deliveries
from dspex.streams import kafka, tracing
from dspex.streams.errors import BrokerUnavailable
from dspex.streams.serde import Serde
from dspex.streams.settings import Settings

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
Handle = Callable[[Consumed], Awaitable[None]]
HandleBatch = Callable[[list[Consumed]], Awaitable[None]]
"""Handles every message of one fetch at once (batch-aware processing, e.g. the router's)."""
Released = Callable[[set[TP]], None]
"""Told the partitions revoked or lost, from inside the rebalance callback: must not block."""


class Unfinished(Exception):
    """Raised by a handler: leave this message uncommitted (e.g. a job abandoned on a stop).

    The loop keeps running; the message keeps its slot, and commits of its partition
    stay below it, until the partition is revoked or the loop stops.
    """


class Committer(Protocol):
    """How a loop commits the offsets that are done (on its Kafka thread).

    ``commit`` may run inside a rebalance callback: it must not wait for the event
    loop. It raises ``KafkaException`` when the commit was refused (the loop tries
    again later); any other exception stops the loop. ``forget`` drops whatever it
    holds for partitions revoked or lost; ``discard`` for one message that finished
    after its partition moved.
    """

    def commit(self, consumer: Consumer, offsets: list[TopicPartition]) -> None: ...

    def forget(self, partitions: set[TP]) -> None: ...

    def discard(self, tp: TP, offset: int) -> None: ...


class PlainCommit:
    """The default :class:`Committer`: a synchronous ``commit()`` of the offsets."""

    def commit(self, consumer: Consumer, offsets: list[TopicPartition]) -> None:
        consumer.commit(offsets=offsets, asynchronous=False)

    def forget(self, partitions: set[TP]) -> None:
        return None

    def discard(self, tp: TP, offset: int) -> None:
        return None


MAX_RENEWALS = 10
"""Fatal consumer errors in a row a loop recovers from by a new consumer; then it ends
(and the agent exits for its supervisor). Errors RENEW_RESET_S apart are not in a row."""
RENEW_RESET_S = 60.0
RENEW_BACKOFF_MAX_S = 5.0


@dataclass(frozen=True)
class LoopConfig:
    """How one consumer loop consumes: its group, identity and limits."""

    topics: tuple[str, ...]
    group_id: str
    client_id: str
    limit: int
    instance_id: str | None = None
    """Static membership (``group.instance.id``); None: a dynamic member."""
    metadata_refresh_s: float | None = None
    """How often to refresh topic metadata: with a regex subscription (a topic starting
    with ``^``), how soon a newly created matching topic is consumed. None: librdkafka's
    default (5 minutes)."""
    commit_interval_s: float = 0.2
    drain_timeout_s: float = 30.0
    poll_timeout_s: float = 0.1
    keepalive_s: float = 5.0
    consumer_conf: Mapping[str, Any] = field(default_factory=dict)
    """More librdkafka settings (e.g. ``isolation.level``, ``max.poll.interval.ms``)."""


class ConsumerLoop:
    """A consumer-group member that runs ``handle`` for each message, concurrently.

    ``busy`` (default: the messages in flight) says how many messages hold a slot;
    a worker subtracts those only waiting for acknowledgements. ``committer``
    (default :class:`PlainCommit`) commits; ``on_released`` hears of revoked and lost
    partitions (e.g. to abandon work there). With ``handle_batch`` the messages of one
    fetch are handled by one call in one task instead of a task per message; each
    holds its slot until the whole batch is done.
    """

    def __init__(
        self,
        settings: Settings,
        config: LoopConfig,
        handle: Handle,
        *,
        busy: Callable[[], int] | None = None,
        committer: Committer | None = None,
        on_released: Released | None = None,
        handle_batch: HandleBatch | None = None,
    ) -> None:
        self.config = config
        self._settings = settings
        self._handle = handle
        self._busy = busy or self.in_flight
        self._committer = committer or PlainCommit()
        self._on_released = on_released
        self._handle_batch = handle_batch
        self._tracker = OffsetTracker()
        self._lock = threading.Lock()  # the tracker is shared with the rebalance callbacks
        self._tasks: dict[asyncio.Task[None], tuple[TP, int]] = {}
        self._generation: dict[TP, int] = {}
        # per assigned partition, its end offset when assigned: what lies below it may
        # have been processed by the partition's previous owner (Consumed.maybe_redone)
        self._redo_below: dict[TP, int] = {}
        self._paused = False
        self._fatal: BaseException | None = None
        self._broken: KafkaError | None = None
        self._patterns = any(
            topic.startswith("^") for topic in config.topics
        )  # a fatal consumer error: renew the consumer
        self.renewals = 0
        """Consumers replaced after a fatal consumer error (logs and tests)."""
        self._renewed_in_a_row = 0
        self._last_renewal = 0.0

    def in_flight(self) -> int:
        """Messages received and not yet finished."""
        with self._lock:
            return self._tracker.in_flight()

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set (or a handler fails), then drain, commit and close.

        Raises the first exception a handler raised, after the graceful stop.
        """
        self._loop = asyncio.get_running_loop()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"{self.config.client_id}-kafka")
        self._consumer = await self._in_kafka_thread(self._subscribe)
        committer = asyncio.create_task(self._commit_periodically(), name="commits")
        try:
            await self._fetch_until(stop)
        finally:
            await self._drain()
            committer.cancel()
            await asyncio.gather(committer, return_exceptions=True)
            await self._commit()
            await self._in_kafka_thread(self._consumer.close)
            self._thread.shutdown(wait=False)
        if self._fatal is not None:
            raise self._fatal

    # -- wiring ---------------------------------------------------------------------------

    def _subscribe(self) -> Consumer:
        session_ms = int(self._settings.reliability.session_timeout_s * 1000)
        conf: dict[str, Any] = {
            "client.id": self.config.client_id,
            "session.timeout.ms": session_ms,
            "heartbeat.interval.ms": max(500, session_ms // 5),
            # only partitions that move are revoked: the rest keep answering
            "partition.assignment.strategy": "cooperative-sticky",
            **self.config.consumer_conf,
        }
        if self.config.instance_id:
            conf["group.instance.id"] = self.config.instance_id
        if self.config.metadata_refresh_s is not None:
            conf["topic.metadata.refresh.interval.ms"] = int(self.config.metadata_refresh_s * 1000)
        consumer = kafka.consumer(self._settings, self.config.group_id, **conf)
        consumer.subscribe(
            list(self.config.topics),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        return consumer

    # -- fetching -------------------------------------------------------------------------

    async def _fetch_until(self, stop: asyncio.Event) -> None:
        busy_since: float | None = None
        while not stop.is_set() and self._fatal is None:
            if self._broken is not None:
                await self._renew(self._broken)
                continue
            free = self._free_slots()
            if free > 0:
                busy_since = None
                await self._set_paused(False)
                await self._fetch(free)
                continue
            busy_since = busy_since or time.monotonic()
            if time.monotonic() - busy_since < self.config.keepalive_s:
                await self._wait_for_a_slot()
            else:  # long jobs: keep calling consume() so the group keeps us, but take nothing
                await self._set_paused(True)
                await self._fetch(0)

    def _free_slots(self) -> int:
        """Up to ``limit`` messages holding a slot, and at most ``2 * limit`` held in all."""
        limit = self.config.limit
        return min(limit - self._busy(), 2 * limit - self.in_flight())

    async def _fetch(self, wanted: int) -> None:
        messages = await self._in_kafka_thread(partial(self._take, wanted))
        if self._handle_batch is not None and len(messages) > 1:
            self._dispatch_batch(self._handle_batch, messages)
            return
        for message in messages:
            self._dispatch(message)

    def _take(self, wanted: int) -> list[Message]:
        # consume(n, t) returns only when n messages arrived or t passed: wait for one,
        # then take what else is already fetched without waiting
        first: list[Message] = self._consumer.consume(1, self.config.poll_timeout_s)
        if wanted <= 0:
            return self._put_back(first)
        if not first or wanted == 1:
            return first
        rest: list[Message] = self._consumer.consume(wanted - 1, 0)
        return [*first, *rest]

    def _put_back(self, messages: list[Message]) -> list[Message]:
        """Polled at the limit: seek each message back and pause again; keep only errors.

        A message that cannot be put back (its partition just moved) is kept and run:
        one over the limit rather than one skipped.
        """
        kept = [m for m in messages if m.error() is not None]
        for message in (m for m in messages if m.error() is None):
            where = (message.topic() or "", message.partition() or 0, message.offset() or 0)
            tp = TopicPartition(*where)
            try:
                self._consumer.seek(tp)
            except KafkaException as exc:
                logger.info("cannot put back %s[%d]: %s", tp.topic, tp.partition, exc)
                kept.append(message)
        if len(kept) < len(messages):
            self._pause_assigned(True)  # e.g. a partition assigned since the pause
        return kept

    async def _wait_for_a_slot(self) -> None:
        if not self._tasks:
            await asyncio.sleep(self.config.poll_timeout_s)
            return
        await asyncio.wait(
            list(self._tasks),
            timeout=self.config.poll_timeout_s,
            return_when=asyncio.FIRST_COMPLETED,
        )

    async def _set_paused(self, paused: bool) -> None:
        if paused == self._paused:
            return
        self._paused = paused
        await self._in_kafka_thread(partial(self._pause_assigned, paused))
        logger.info(
            "partitions %s client_id=%s in_flight=%d",
            "paused" if paused else "resumed",
            self.config.client_id,
            self.in_flight(),
        )

    def _pause_assigned(self, paused: bool) -> None:
        assigned = self._consumer.assignment()
        if paused:
            self._consumer.pause(assigned)
        else:
            self._consumer.resume(assigned)

    def _dispatch(self, message: Message) -> None:
        consumed = self._consumed(message)
        if consumed is None:
            return
        tp = (consumed.topic, consumed.partition)
        with self._lock:
            self._tracker.started(tp, consumed.offset)
            generation = self._generation.get(tp, 0)
        task = asyncio.create_task(self._run(consumed, tp, generation), name=consumed.where())
        self._tasks[task] = (tp, consumed.offset)
        task.add_done_callback(self._on_task_done)

    def _dispatch_batch(self, handle: HandleBatch, messages: list[Message]) -> None:
        batch = [c for c in map(self._consumed, messages) if c is not None]
        if not batch:
            return
        with self._lock:
            started = []
            for c in batch:
                tp = (c.topic, c.partition)
                self._tracker.started(tp, c.offset)
                started.append((tp, c.offset, self._generation.get(tp, 0)))
        task = asyncio.create_task(self._run_batch(handle, batch, started), name="batch")
        self._tasks[task] = started[0][:2]
        task.add_done_callback(self._on_task_done)

    async def _run_batch(
        self, handle: HandleBatch, batch: list[Consumed], started: list[tuple[TP, int, int]]
    ) -> None:
        await handle(batch)  # traces each message itself
        with self._lock:
            for tp, offset, generation in started:
                if self._generation.get(tp, 0) == generation:
                    self._tracker.finished(tp, offset)
                else:
                    self._committer.discard(tp, offset)

    def _consumed(self, message: Message) -> Consumed | None:
        """The message as consumed; None for an error (logged, or fatal: the loop stops)."""
        error = message.error()
        if error is not None:
            # consume() hands a fatal error over as code _FATAL with fatal() unset
            if error.fatal() or error.code() == KafkaError._FATAL:
                self._broken = self._broken or error
            elif error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART and self._patterns:
                # a pattern (tenants' request topics) that matches no topic yet
                logger.debug("consumer group=%s: %s", self.config.group_id, error.str())
            elif error.code() != KafkaError._PARTITION_EOF:
                logger.warning("consumer error group=%s error=%s", self.config.group_id, error)
            return None
        tp = (message.topic() or "", message.partition() or 0)
        with self._lock:
            redo_below = self._redo_below.get(tp, 0)
        return Consumed.from_message(message, maybe_redone=(message.offset() or 0) < redo_below)

    async def _run(self, consumed: Consumed, tp: TP, generation: int) -> None:
        try:
            with tracing.processing(consumed, group=self.config.group_id):
                await self._handle(consumed)
        except Unfinished:
            logger.info("left unfinished %s", consumed.where())
            return
        # in the handler's last step (no await since its records were delivered), so
        # busy() never counts a finished message for a loop turn
        with self._lock:
            if self._generation.get(tp, 0) == generation:  # not revoked since it started
                self._tracker.finished(tp, consumed.offset)
            else:
                self._committer.discard(tp, consumed.offset)

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        tp, offset = self._tasks.pop(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            logger.error(
                "handler failed topic=%s partition=%d offset=%d: %s; stopping", *tp, offset, exc
            )
            self._fatal = self._fatal or exc

    async def _renew(self, error: KafkaError) -> None:
        """Replace a consumer that hit a fatal error with a new member of the same group.

        A fatal consumer never fetches again. Seen after a broker restart: a static
        member whose session timed out rejoins while an offset commit of its old
        member id is in flight; the broker fences that commit (FENCED_INSTANCE_ID) and
        librdkafka makes it fatal. Its partitions count as lost (what runs there still
        answers; its offsets are not committed and the next owner may redo them, which
        clients dedupe), the old handle is closed, and a new one joins the group under
        the same ``group.instance.id``.
        """
        now = time.monotonic()
        in_a_row = self._renewed_in_a_row + 1 if now - self._last_renewal < RENEW_RESET_S else 1
        if in_a_row > MAX_RENEWALS:
            self._fatal = BrokerUnavailable(
                f"group={self.config.group_id}: fatal consumer error again after "
                f"{MAX_RENEWALS} new consumers in a row: {error.str()}"
            )
            return
        self.renewals += 1
        self._renewed_in_a_row, self._last_renewal = in_a_row, now
        logger.error(
            "fatal consumer error group=%s: %s; joining again with a new consumer (%d so far)",
            self.config.group_id,
            error.str(),
            self.renewals,
        )
        with self._lock:
            known = {*self._tracker.partitions(), *self._generation}
        self._forget(known)
        old = self._consumer
        await self._in_kafka_thread(partial(_close_quietly, old, self.config.group_id))
        await asyncio.sleep(min(in_a_row - 1, RENEW_BACKOFF_MAX_S))  # the first at once
        self._paused = False
        self._consumer = await self._in_kafka_thread(self._subscribe)
        self._broken = None

    # -- committing -----------------------------------------------------------------------

    async def _commit_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.config.commit_interval_s)
            await self._commit()

    async def _commit(self) -> None:
        with self._lock:
            offsets = self._tracker.uncommitted()
        if offsets:
            await self._in_kafka_thread(partial(self._commit_now, offsets))

    def _commit_now(self, offsets: dict[TP, int]) -> None:
        """Commit ``offsets`` on the kafka thread (or inside a rebalance callback)."""
        tps = [TopicPartition(topic, part, off) for (topic, part), off in offsets.items()]
        try:
            self._committer.commit(self._consumer, tps)
        except KafkaException as exc:  # e.g. a partition just moved: its new owner redoes it
            logger.warning(
                "commit failed group=%s offsets=%s: %s", self.config.group_id, offsets, exc
            )
            return
        except Exception as exc:  # the committer is broken (e.g. a fenced producer): stop
            logger.error("committer failed group=%s: %s; stopping", self.config.group_id, exc)
            self._fatal = self._fatal or exc
            return
        with self._lock:
            self._tracker.committed(offsets)

    # -- rebalancing (callbacks run inside consume(), on the kafka thread) -----------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        logger.info("assigned group=%s partitions=%s", self.config.group_id, _names(partitions))
        ends = _end_offsets(consumer, partitions) if partitions else {}
        with self._lock:
            self._redo_below.update(ends)
        if self._paused:  # the loop decides again; new partitions start resumed
            self._loop.call_soon_threadsafe(setattr, self, "_paused", False)

    def _on_revoke(self, _: Consumer, partitions: list[TopicPartition]) -> None:
        """Commit what is done on ``partitions`` now, from this callback, and forget them.

        Never waits for running requests: that would need the loop, which may be
        waiting for this very thread.
        """
        tps = {(p.topic, p.partition) for p in partitions}
        if not tps:
            return
        with self._lock:
            done = {tp: o for tp, o in self._tracker.uncommitted().items() if tp in tps}
            running = self._tracker.in_flight(tps)
        if done:
            self._commit_now(done)
        self._forget(tps)
        logger.info(
            "revoked group=%s partitions=%s committed=%d still_running=%d",
            self.config.group_id,
            _names(partitions),
            len(done),
            running,
        )

    def _on_lost(self, _: Consumer, partitions: list[TopicPartition]) -> None:
        logger.warning("lost group=%s partitions=%s", self.config.group_id, _names(partitions))
        self._forget({(p.topic, p.partition) for p in partitions})

    def _forget(self, tps: set[TP]) -> None:
        with self._lock:
            self._tracker.forget(tps)
            self._committer.forget(tps)
            for tp in tps:
                self._generation[tp] = self._generation.get(tp, 0) + 1
                self._redo_below.pop(tp, None)
        if self._on_released is not None:
            self._on_released(tps)

    # -- stopping -------------------------------------------------------------------------

    async def _drain(self) -> None:
        if not self._tasks:
            return
        _, late = await asyncio.wait(list(self._tasks), timeout=self.config.drain_timeout_s)
        if late:
            logger.warning(
                "stopping: cancelling %d message(s) still running after %.0fs (not committed)",
                len(late),
                self.config.drain_timeout_s,
            )
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    async def _in_kafka_thread(self, call: Callable[[], _T]) -> _T:
        return await self._loop.run_in_executor(self._thread, call)


def _close_quietly(consumer: Consumer, group: str) -> None:
    try:
        consumer.close()
    except (KafkaException, RuntimeError) as exc:  # a fatal handle may refuse: it is gone anyway
        logger.info("closing a failed consumer group=%s error=%s", group, exc)


def _end_offsets(consumer: Consumer, partitions: list[TopicPartition]) -> dict[TP, int]:
    """Each partition's end offset now (one ListOffsets request); unknown: every offset.

    Called in the assign callback, before anything of these partitions is fetched.
    Should the broker not answer, every message counts as possibly redone, which
    costs a lookup per expired one and nothing else.
    """
    latest = [TopicPartition(p.topic, p.partition, OFFSET_END) for p in partitions]
    try:
        found = consumer.offsets_for_times(latest, timeout=5.0)
    except KafkaException as exc:
        logger.info("end offsets unknown at assignment error=%s", exc)
        return {(p.topic, p.partition): sys.maxsize for p in partitions}
    return {
        (tp.topic, tp.partition): tp.offset if tp.offset >= 0 and tp.error is None else sys.maxsize
        for tp in found
    }


class LoopApp:
    """An agent process around one :class:`ConsumerLoop`: its lifecycle, written once.

    ``start`` makes a producer (a :class:`~dspex.agents.plumbing.publisher.Publisher`
    whose delivery reports a task serves) and runs the loop as a task; ``stop``
    stops consuming (drain, commit), flushes, stops the helpers and raises what
    made consuming fail. A subclass defines ``handle``, readies its own readers in
    ``start`` before ``await super().start()``, and closes them in ``close``.
    """

    flush_timeout_s = 10.0

    def __init__(self, settings: Settings, serde: Serde, config: LoopConfig) -> None:
        self.settings = settings
        self.config = config
        self._serde = serde
        self._publisher: Publisher | None = None  # made in start(), on the running loop
        self._deliveries: asyncio.Task[None] | None = None
        self._consuming: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    async def handle(self, consumed: Consumed) -> None:
        """One consumed message; returns once everything it caused is on the broker."""
        raise NotImplementedError

    async def start(self) -> None:
        """Start producing and consuming."""
        producer = kafka.producer(self.settings, **{"client.id": self.config.client_id})
        self._publisher = Publisher(producer, self._serde, asyncio.get_running_loop())
        self._deliveries = asyncio.create_task(serve_deliveries(self._publisher), name="deliveries")
        consumer = ConsumerLoop(
            self.settings, self.config, self.handle, handle_batch=self.batch_handler()
        )
        self._consuming = asyncio.create_task(consumer.run(self._stopping), name="consume")

    def batch_handler(self) -> HandleBatch | None:
        """The batch-aware handler, when the subclass has one (None: a task per message)."""
        return None

    async def close(self) -> None:
        """After consuming stopped and the producer flushed: stop what the subclass runs."""

    async def serve(self, stop: asyncio.Event) -> None:
        """Start, consume until ``stop`` is set (or consuming fails), then stop."""
        await self.start()
        try:
            await until_stopped(stop, self._consuming)
        finally:
            await self.stop()

    async def stop(self) -> None:
        """Stop consuming (drain, commit), flush, close; raise what made consuming fail."""
        self._stopping.set()
        failure: BaseException | None = None
        if self._consuming is not None:
            try:
                await self._consuming
            except Exception as exc:  # reported after the rest is stopped
                failure = exc
        if self._publisher is not None:
            left = await self._publisher.flush(self.flush_timeout_s)
            if left:
                logger.warning(
                    "%s stopped with %d records not acknowledged", self.config.client_id, left
                )
        if self._deliveries is not None:
            self._deliveries.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._deliveries
        await self.close()
        if failure is not None:
            raise failure

    def run(self) -> None:
        """Serve until SIGINT/SIGTERM (an agent's entry point)."""
        asyncio.run(serve_until_signalled(self.serve))


async def until_stopped(stop: asyncio.Event, consuming: asyncio.Future[Any] | None) -> None:
    """Wait until ``stop`` is set, or until ``consuming`` (a loop's ``run``) ends early."""
    stopped = asyncio.create_task(stop.wait())
    waiting: list[asyncio.Future[Any]] = [stopped]
    if consuming is not None:
        waiting.append(consuming)
    try:
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()


async def serve_until_signalled(serve: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``serve(stop)`` with ``stop`` set by SIGINT or SIGTERM (an agent's entry point)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await serve(stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _names(partitions: list[TopicPartition]) -> str:
    return ",".join(f"{p.topic}[{p.partition}]" for p in partitions)
