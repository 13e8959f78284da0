"""The pool worker: one process is one member of a pool's consumer group.

It consumes ``pool.<pool>`` as group ``<prefix>pool.<pool>`` and runs up to
``pools.<pool>.in_flight`` requests at once on one asyncio loop. Delivery is
at-least-once with dedupe by request id: an offset counts as done only after
the broker acknowledged the request's Response, Execution and Telemetry, and
a partition is committed only up to its lowest unfinished offset.

Threads: librdkafka's ``consume()`` blocks, and it is where rebalance callbacks
run. It runs in a small dedicated thread pool so the loop never blocks and so
``on_revoke`` can *wait* for the revoked partitions' in-flight requests (it
hands a coroutine to the loop and blocks its own thread until the drain is
done); commits run there too. Producer delivery reports are served on the loop.

Back-pressure: at the in-flight limit the worker stops calling ``consume()``
and waits for a slot. Only when no slot frees up for ``keepalive_s`` (long
jobs) does it ``pause()`` its partitions and keep polling, so the group never
evicts it (``max.poll.interval.ms``). Pausing on every saturation was measured
to cap throughput at ~60 requests/s: each ``resume()`` costs librdkafka a fresh
fetch, about half a second here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from dspex.agents.plumbing import records
from dspex.agents.plumbing.messages import Consumed
from dspex.agents.plumbing.offsets import OffsetTracker
from dspex.agents.plumbing.offsets import TopicPartition as TP
from dspex.agents.plumbing.publisher import Publisher, serve_deliveries
from dspex.agents.plumbing.retry import RetryTopicPolicy
from dspex.agents.worker.execution import DSPyExecutor, Executor
from dspex.agents.worker.handler import Destinations, WorkerHandler
from dspex.streams import kafka
from dspex.streams.logs import configure_logging
from dspex.streams.serde import make_serde
from dspex.streams.settings import POOLS, PoolSettings, Settings
from dspex.streams.topics import Topics

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


def default_worker_id(pool: str) -> str:
    """``worker-<pool>-<host>-<random>:<pid>``: unique per worker, readable in the audit log."""
    return f"worker-{pool}-{socket.gethostname()}-{uuid.uuid4().hex[:4]}:{os.getpid()}"


class PoolWorker:
    """One member of a pool's consumer group: fetch, run concurrently, answer, commit.

    ``executor`` defaults to :class:`~dspex.agents.worker.execution.DSPyExecutor`. ``group_id``
    defaults to ``<prefix>pool.<pool>``; ``drain_timeout_s`` bounds how long a
    revoke or a shutdown waits for running requests; ``keepalive_s`` is how long
    the worker may sit at its in-flight limit before it pauses and polls.
    """

    def __init__(
        self,
        settings: Settings,
        pool: str,
        *,
        worker_id: str | None = None,
        executor: Executor | None = None,
        group_id: str | None = None,
        commit_interval_s: float = 0.2,
        drain_timeout_s: float = 30.0,
        poll_timeout_s: float = 0.1,
        keepalive_s: float = 5.0,
    ) -> None:
        self.pool = pool
        self.worker_id = worker_id or default_worker_id(pool)
        self.group_id = group_id or f"{settings.topics.prefix}pool.{pool}"
        self.topic = Topics(settings.topics).name(f"pool.{pool}")
        self.limit = _pool_settings(settings, pool).in_flight
        self._settings = settings
        self._executor = executor
        self._commit_interval_s = commit_interval_s
        self._drain_timeout_s = drain_timeout_s
        self._poll_timeout_s = poll_timeout_s
        self._keepalive_s = keepalive_s
        self._tracker = OffsetTracker()
        self._tasks: dict[asyncio.Task[None], tuple[TP, int]] = {}
        self._generation: dict[TP, int] = {}
        self._paused = False
        self._fatal: BaseException | None = None
        self._commit_lock = asyncio.Lock()

    def in_flight(self) -> int:
        """Messages received and not yet finished (answered and acknowledged)."""
        return self._tracker.in_flight()

    def running(self) -> int:
        """Messages running or waiting to run: at most ``limit`` (see :meth:`_free_slots`)."""
        return self._tracker.in_flight() - self._handler.delivering

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set, then drain, flush, commit and close.

        Raises :class:`~dspex.agents.plumbing.publisher.DeliveryFailed` (after the graceful
        shutdown) when the broker stopped acknowledging the worker's records.
        """
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._threads = ThreadPoolExecutor(3, thread_name_prefix=f"dspex-{self.pool}-kafka")
        self._consumer = self._subscribe()
        self._publisher = self._make_publisher()
        self._audit_publisher = self._make_publisher(
            "audit", linger_ms=self._settings.kafka.audit_linger_ms
        )
        self._handler = self._make_handler()
        background = [
            asyncio.create_task(self._commit_periodically()),
            asyncio.create_task(serve_deliveries(self._publisher, self._audit_publisher)),
            asyncio.create_task(self._report_health_periodically()),
        ]
        logger.info(
            "worker started worker_id=%s topic=%s group=%s",
            self.worker_id,
            self.topic,
            self.group_id,
        )
        try:
            await self._fetch_until(stop)
        finally:
            await self._shutdown(background)
        if self._fatal is not None:
            raise self._fatal

    # -- wiring ---------------------------------------------------------------------------

    def _subscribe(self) -> Consumer:
        session_ms = int(self._settings.reliability.session_timeout_s * 1000)
        conf = {
            "client.id": self.worker_id,
            "session.timeout.ms": session_ms,
            "heartbeat.interval.ms": max(500, session_ms // 5),
        }
        consumer = kafka.consumer(self._settings, self.group_id, **conf)
        consumer.subscribe(
            [self.topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        return consumer

    def _make_publisher(self, role: str = "", linger_ms: float | None = None) -> Publisher:
        conf: dict[str, Any] = {"client.id": f"{self.worker_id}-{role}" if role else self.worker_id}
        if linger_ms is not None:
            conf["linger.ms"] = linger_ms
        producer = kafka.producer(self._settings, **conf)
        return Publisher(producer, make_serde(self._settings), self._loop)

    def _make_handler(self) -> WorkerHandler:
        topics = Topics(self._settings.topics)
        destinations = Destinations(
            responses=topics.name("responses"),
            executions=topics.name("executions"),
            telemetry=topics.name("telemetry"),
            dlq=topics.name("dlq"),
            retry=topics.name("retry"),
            cache=topics.name("cache"),
        )
        return WorkerHandler(
            executor=self._executor or DSPyExecutor(self._settings),
            publisher=self._publisher,
            serde=make_serde(self._settings),
            destinations=destinations,
            pool=self.pool,
            worker_id=self.worker_id,
            in_flight=self.limit,
            retry_topic=RetryTopicPolicy.from_settings(self._settings.reliability),
            audit_publisher=self._audit_publisher,
        )

    # -- fetching -------------------------------------------------------------------------

    async def _fetch_until(self, stop: asyncio.Event) -> None:
        busy_since: float | None = None
        while not stop.is_set() and self._fatal is None:
            free = self._free_slots()
            if free > 0:
                busy_since = None
                self._set_paused(False)
                await self._fetch(free)
                continue
            busy_since = busy_since or time.monotonic()
            if time.monotonic() - busy_since < self._keepalive_s:
                await self._wait_for_a_slot()
            else:  # long jobs: keep calling consume() so the group keeps us, but take nothing
                self._set_paused(True)
                await self._fetch(1)

    def _free_slots(self) -> int:
        """How many more messages to take: up to ``limit`` running (or waiting to run).

        Requests only waiting for acknowledgements do not hold a slot, but at
        most ``2 * limit`` messages are held in all, which bounds memory.
        """
        pending = self._tracker.in_flight()
        return min(self.limit - self.running(), 2 * self.limit - pending)

    async def _fetch(self, wanted: int) -> None:
        # consume(n, t) returns only when n messages arrived or t passed: wait for one,
        # then take what else is already fetched without waiting (else a lone request
        # sits in the client for the whole poll timeout).
        for message in await self._in_kafka_thread(partial(self._take, wanted)):
            self._dispatch(message)

    def _take(self, wanted: int) -> list[Message]:
        first: list[Message] = self._consumer.consume(1, self._poll_timeout_s)
        if not first or wanted <= 1:
            return first
        rest: list[Message] = self._consumer.consume(wanted - 1, 0)
        return [*first, *rest]

    async def _wait_for_a_slot(self) -> None:
        if not self._tasks:
            await asyncio.sleep(self._poll_timeout_s)
            return
        await asyncio.wait(
            list(self._tasks), timeout=self._poll_timeout_s, return_when=asyncio.FIRST_COMPLETED
        )

    def _set_paused(self, paused: bool) -> None:
        if paused == self._paused:
            return
        assigned = self._consumer.assignment()
        if paused:
            self._consumer.pause(assigned)
        else:
            self._consumer.resume(assigned)
        self._paused = paused
        logger.info(
            "partitions %s worker_id=%s in_flight=%d",
            "paused" if paused else "resumed",
            self.worker_id,
            self.in_flight(),
        )

    def _dispatch(self, message: Message) -> None:
        error = message.error()
        if error is not None:
            if error.code() != KafkaError._PARTITION_EOF:
                logger.warning("consumer error topic=%s error=%s", self.topic, error.str())
            return
        origin = Consumed.from_message(message)
        tp = (origin.topic, origin.partition)
        self._tracker.started(tp, origin.offset)
        generation = self._generation.get(tp, 0)
        task = asyncio.create_task(self._handle(origin, tp, generation), name=origin.where())
        self._tasks[task] = (tp, origin.offset)
        task.add_done_callback(self._on_task_done)

    async def _handle(self, origin: Consumed, tp: TP, generation: int) -> None:
        await self._handler.handle(origin)
        # in the same step as the handler's last bookkeeping (no await since its records
        # were delivered), so running() never counts a finished request for a loop turn
        if self._generation.get(tp, 0) == generation:  # not revoked since it started
            self._tracker.finished(tp, origin.offset)

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        tp, offset = self._tasks.pop(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            logger.error(
                "cannot deliver answers topic=%s partition=%d offset=%d: %s", *tp, offset, exc
            )
            self._fatal = self._fatal or exc  # stop consuming: the broker will not take our records

    # -- committing -----------------------------------------------------------------------

    async def _commit_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._commit_interval_s)
            await self._commit()

    async def _commit(self, only: Iterable[TP] | None = None) -> None:
        async with self._commit_lock:
            offsets = self._tracker.uncommitted()
            if only is not None:
                chosen = set(only)
                offsets = {tp: o for tp, o in offsets.items() if tp in chosen}
            if not offsets:
                return
            tps = [TopicPartition(topic, part, off) for (topic, part), off in offsets.items()]
            commit = partial(self._consumer.commit, offsets=tps, asynchronous=False)
            try:
                await self._in_kafka_thread(commit)
            except KafkaException as exc:  # e.g. mid-rebalance: the next commit catches up
                logger.warning("commit failed group=%s offsets=%s: %s", self.group_id, offsets, exc)
                return
            self._tracker.committed(offsets)

    async def _report_health_periodically(self) -> None:
        """A ``health`` Telemetry record now and every ``metrics.worker_health_interval_s``."""
        topic = Topics(self._settings.topics).name("telemetry")
        while True:
            faults = getattr(self._handler.executor, "faults", None)
            breakers = faults.breakers.worst_state() if faults is not None else "closed"
            sample = records.health(self.worker_id, self.pool, self.running(), breakers)
            try:
                await (await self._audit_publisher.send(topic, self.worker_id, "Telemetry", sample))
            except Exception:  # health is best effort: never let it stop the worker
                logger.warning("health sample not sent worker_id=%s", self.worker_id, exc_info=True)
            await asyncio.sleep(self._settings.metrics.worker_health_interval_s)

    # -- rebalancing (callbacks run in the consume() thread) ------------------------------

    def _on_assign(self, _: Consumer, partitions: list[TopicPartition]) -> None:
        logger.info("assigned worker_id=%s partitions=%s", self.worker_id, _names(partitions))
        # a fresh assignment is not paused: let the fetch loop decide again
        self._loop.call_soon_threadsafe(setattr, self, "_paused", False)

    def _on_revoke(self, _: Consumer, partitions: list[TopicPartition]) -> None:
        logger.info("revoked worker_id=%s partitions=%s", self.worker_id, _names(partitions))
        self._release_from_thread(partitions, drain=True)

    def _on_lost(self, _: Consumer, partitions: list[TopicPartition]) -> None:
        logger.warning("lost worker_id=%s partitions=%s", self.worker_id, _names(partitions))
        self._release_from_thread(partitions, drain=False)

    def _release_from_thread(self, partitions: list[TopicPartition], *, drain: bool) -> None:
        tps = [(p.topic, p.partition) for p in partitions]
        if threading.get_ident() == self._loop_thread:  # not expected: never block the loop
            self._forget(tps)
            return
        future = asyncio.run_coroutine_threadsafe(self._release(tps, drain=drain), self._loop)
        try:
            future.result(timeout=self._drain_timeout_s + 10)
        except Exception:
            logger.exception("releasing partitions failed worker_id=%s", self.worker_id)

    async def _release(self, tps: list[TP], *, drain: bool) -> None:
        """Finish (bounded) what runs on ``tps``, commit it, then forget the partitions."""
        if drain:
            chosen = set(tps)
            running = [task for task, (tp, _) in self._tasks.items() if tp in chosen]
            if running:
                _, late = await asyncio.wait(running, timeout=self._drain_timeout_s)
                if late:
                    logger.warning("revoke: %d request(s) still running, not committed", len(late))
            await self._commit(tps)
        self._forget(tps)

    def _forget(self, tps: list[TP]) -> None:
        self._tracker.forget(tps)
        for tp in tps:
            self._generation[tp] = self._generation.get(tp, 0) + 1

    # -- shutdown -------------------------------------------------------------------------

    async def _shutdown(self, background: list[asyncio.Task[None]]) -> None:
        """Stop fetching (already done), drain, flush, commit, close."""
        await self._drain()
        left = sum(
            await asyncio.gather(
                self._publisher.flush(self._drain_timeout_s),
                self._audit_publisher.flush(self._drain_timeout_s),
            )
        )
        if left:
            logger.warning(
                "shutdown: %d record(s) not delivered worker_id=%s", left, self.worker_id
            )
        await asyncio.sleep(0)  # let the last delivery reports settle their futures
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await self._commit()
        await self._in_kafka_thread(self._consumer.close)
        self._threads.shutdown(wait=False)
        logger.info("worker stopped worker_id=%s", self.worker_id)

    async def _drain(self) -> None:
        if not self._tasks:
            return
        _, late = await asyncio.wait(list(self._tasks), timeout=self._drain_timeout_s)
        if late:
            logger.warning("shutdown: cancelling %d request(s) still running", len(late))
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    async def _in_kafka_thread(self, call: Callable[[], _T]) -> _T:
        return await self._loop.run_in_executor(self._threads, call)


def _pool_settings(settings: Settings, pool: str) -> PoolSettings:
    found: Any = getattr(settings.pools, pool, None)
    if not isinstance(found, PoolSettings):
        known = ", ".join(POOLS)
        raise ValueError(f"unknown pool {pool!r}; pools: {known}")
    return found


def _names(partitions: list[TopicPartition]) -> str:
    return ",".join(f"{p.topic}[{p.partition}]" for p in partitions)


def main(settings: Settings, pool: str) -> int:
    """Process entry point: run one worker of ``pool`` until SIGTERM/SIGINT, then drain.

    Returns the exit code: 0 after a graceful stop, 1 when the worker failed.
    """
    configure_logging(settings.log_level)
    try:
        asyncio.run(_serve(settings, pool))
    except Exception:
        logger.exception("worker failed pool=%s", pool)
        return 1
    return 0


async def _serve(settings: Settings, pool: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await PoolWorker(settings, pool).run(stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
