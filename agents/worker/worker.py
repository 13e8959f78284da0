"""The pool worker: one process is one member of a pool's consumer group.

It consumes ``pool.<pool>`` as group ``<prefix>pool.<pool>`` on the shared
:class:`~dspex.agents.plumbing.loop.ConsumerLoop` and runs up to
``pools.<pool>.in_flight`` requests at once on one asyncio loop. Delivery is
at-least-once with dedupe by request id: an offset counts as done only after
the broker acknowledged the request's Response, Execution and Telemetry, and
a partition is committed only up to its lowest unfinished offset. Rebalances
never wait for running requests (see the loop's module doc); with
``--instance-id`` a restarted worker takes its partitions back without one.

Requests only waiting for acknowledgements do not hold a slot (``busy``), so a
slow broker acknowledgement does not idle the LM calls.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import uuid
from typing import Any, TypeVar

from dspex.agents.plumbing import records
from dspex.agents.plumbing.answers import AnswerFinder
from dspex.agents.plumbing.loop import ConsumerLoop, LoopConfig
from dspex.agents.plumbing.publisher import Publisher, serve_deliveries
from dspex.agents.plumbing.retry import RetryTopicPolicy
from dspex.agents.worker.execution import DSPyExecutor, Executor
from dspex.agents.worker.handler import Destinations, WorkerHandler
from dspex.agents.worker.sessions import Sessions
from dspex.streams import kafka
from dspex.streams.errors import ConfigError
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
    shutdown waits for running requests; ``keepalive_s`` is how long the worker may
    sit at its in-flight limit before it pauses and polls; ``instance_id`` makes it a
    static group member.
    """

    def __init__(
        self,
        settings: Settings,
        pool: str,
        *,
        worker_id: str | None = None,
        executor: Executor | None = None,
        group_id: str | None = None,
        instance_id: str | None = None,
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
        self._drain_timeout_s = drain_timeout_s
        self._config = LoopConfig(
            topics=(self.topic,),
            group_id=self.group_id,
            client_id=self.worker_id,
            limit=self.limit,
            instance_id=f"{self.group_id}-{instance_id}" if instance_id else None,
            commit_interval_s=commit_interval_s,
            drain_timeout_s=drain_timeout_s,
            poll_timeout_s=poll_timeout_s,
            keepalive_s=keepalive_s,
        )

    def in_flight(self) -> int:
        """Messages received and not yet finished (answered and acknowledged)."""
        return self._consumer_loop.in_flight()

    def running(self) -> int:
        """Messages running or waiting to run: at most ``limit``."""
        return self._consumer_loop.in_flight() - self._handler.delivering

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set, then drain, commit, close and flush.

        Raises :class:`~dspex.agents.plumbing.publisher.DeliveryFailed` (after the graceful
        shutdown) when the broker stopped acknowledging the worker's records.
        """
        self._loop = asyncio.get_running_loop()
        # first: a deployed module that does not import stops the worker before it connects
        self._executor = self._executor or DSPyExecutor(self._settings)
        self._publisher = self._make_publisher()
        self._audit_publisher = self._make_publisher(
            "audit", linger_ms=self._settings.kafka.audit_linger_ms
        )
        self._sessions = Sessions(
            self._settings, make_serde(self._settings), self._publisher, self.worker_id
        )
        await self._sessions.start()
        self._handler = self._make_handler()
        self._consumer_loop = ConsumerLoop(
            self._settings, self._config, self._handler.handle, busy=self.running
        )
        background = [
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
            await self._consumer_loop.run(stop)
        finally:
            await self._flush(background)

    # -- wiring ---------------------------------------------------------------------------

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
        serde = make_serde(self._settings)
        return WorkerHandler(
            executor=self._executor or DSPyExecutor(self._settings),
            publisher=self._publisher,
            serde=serde,
            destinations=destinations,
            pool=self.pool,
            worker_id=self.worker_id,
            in_flight=self.limit,
            retry_topic=RetryTopicPolicy.from_settings(self._settings.reliability),
            audit_publisher=self._audit_publisher,
            answers=AnswerFinder(self._settings, serde).final_status,
            sessions=self._sessions,
        )

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

    async def _flush(self, background: list[asyncio.Task[None]]) -> None:
        """After the loop stopped: deliver what is still queued, then stop the helpers."""
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
        await self._sessions.stop()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        logger.info("worker stopped worker_id=%s", self.worker_id)


def _pool_settings(settings: Settings, pool: str) -> PoolSettings:
    found: Any = getattr(settings.pools, pool, None)
    if not isinstance(found, PoolSettings):
        known = ", ".join(POOLS)
        raise ValueError(f"unknown pool {pool!r}; pools: {known}")
    return found


def main(settings: Settings, pool: str, instance_id: str | None = None) -> int:
    """Process entry point: run one worker of ``pool`` until SIGTERM/SIGINT, then drain.

    Returns the exit code: 0 after a graceful stop, 1 when the worker failed.
    """
    configure_logging(settings.log_level)
    try:
        asyncio.run(_serve(settings, pool, instance_id))
    except ConfigError as exc:  # e.g. an allowlisted module that does not import: one line
        logger.error("worker cannot start pool=%s: %s", pool, exc)
        return 1
    except Exception:
        logger.exception("worker failed pool=%s", pool)
        return 1
    return 0


async def _serve(settings: Settings, pool: str, instance_id: str | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await PoolWorker(settings, pool, instance_id=instance_id).run(stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
