"""The optimizer pool's job runner: one member of the ``<prefix>jobs`` consumer group.

``python -m dspex.agents jobs`` consumes the ``jobs`` topic on the request path's
shared :class:`~dspex.agents.plumbing.loop.ConsumerLoop` with an in-flight limit
of one: one job at a time (scale with processes and partitions). Why it never
trips a rebalance, however long a job takes: the job runs in its own thread while
the loop, at its limit, pauses every assigned partition and keeps calling
``consume()``, so the consumer stays well inside ``max.poll.interval.ms``
(``jobs.max_poll_interval_s``) and its heartbeats continue; a message polled
anyway is put back with ``seek``. A helper task follows ``jobs.control`` for
cancel requests.

Completion is atomic and fenced. A job's result — ProgramVersion, VariableUpdates
(``variables`` and ``variables.history``), the final Response (reply topic and
``jobs.status``), Telemetry — is staged with the job's offset, and the loop
commits that offset through :class:`~dspex.agents.jobs.txn.Completion`: the records
and the offset in **one Kafka transaction** (``send_offsets_to_transaction`` with
the consumer's group metadata). A runner that lost the partition (a zombie from
an older group generation) has its offset commit refused, so its transaction
aborts and read-committed consumers never see its records. A runner killed
mid-job leaves the offset uncommitted: after the session timeout the partition's
next owner restarts the job from the beginning. A re-delivered job that
``jobs.status`` already shows finished is skipped. So a job is never lost and
completes once.

Assignment is ``cooperative-sticky``: another member joining or leaving does not
revoke a partition that stays with this runner, so a running job is not
disturbed by unrelated rebalances. A revoked or lost partition abandons its
running job (it is restarted by the new owner) without publishing anything; so
does a stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import dspy
from confluent_kafka import Consumer, Message

from dspex.agents.jobs.jobrun import JobExecution, JobOutcome
from dspex.agents.jobs.txn import Completion
from dspex.agents.plumbing.loop import (
    ConsumerLoop,
    LoopConfig,
    Unfinished,
    serve_until_signalled,
)
from dspex.agents.plumbing.messages import Consumed, ErrorInfo, Outgoing
from dspex.agents.plumbing.records import dead_letter
from dspex.streams import kafka
from dspex.streams.errors import ConfigError, SerdeError
from dspex.streams.logs import configure_logging
from dspex.streams.reader import end_offsets
from dspex.streams.serde import make_serde
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
RETRY_BACKOFF_S = 5.0
_T = TypeVar("_T")


def default_runner_id() -> str:
    """``jobs-<host>-<random>:<pid>``: unique per runner, readable in progress and logs."""
    return f"jobs-{socket.gethostname()}-{uuid.uuid4().hex[:4]}:{os.getpid()}"


class _Job:
    """The job message in progress: its current attempt, and whether it was abandoned."""

    def __init__(self, origin: Consumed) -> None:
        self.origin = origin
        self.execution: JobExecution | None = None
        self.abandoned = False

    async def run(self, execution: JobExecution) -> JobOutcome:
        """One attempt, in a daemon thread: a process told to stop must not wait for an
        LM call of an abandoned job."""
        self.execution = execution
        if self.abandoned:
            execution.cancel.set()
        return await _in_daemon_thread(execution.run, f"dspex-job-{execution.job_id}")

    def abandon(self) -> None:
        """The partition is gone, or the runner stops: stop, publish nothing (thread-safe)."""
        self.abandoned = True
        if self.execution is not None:
            self.execution.cancel.set()


class JobRunner:
    """One job runner (see the module doc). ``run(stop)`` returns once ``stop`` is set.

    ``lms`` pre-builds compile LMs by variant.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        worker_id: str | None = None,
        group_id: str | None = None,
        poll_timeout_s: float = 0.2,
        lms: Mapping[str, dspy.BaseLM] | None = None,
    ) -> None:
        _check_settings(settings)
        self.worker_id = worker_id or default_runner_id()
        self.group_id = group_id or f"{settings.topics.prefix}jobs"
        topics = Topics(settings.topics)
        self.topic = topics.name("jobs")
        self._control_topic = topics.name("jobs.control")
        self._dlq = topics.name("dlq")
        self._settings = settings
        self._serde = make_serde(settings)
        self._lms = dict(lms or {})
        self._current: _Job | None = None
        self._stop = asyncio.Event()
        self._closing = threading.Event()
        self.config = LoopConfig(
            topics=(self.topic,),
            group_id=self.group_id,
            client_id=self.worker_id,
            limit=1,
            commit_interval_s=0.5,
            poll_timeout_s=poll_timeout_s,
            keepalive_s=1.0,
            consumer_conf={
                "max.poll.interval.ms": int(settings.jobs.max_poll_interval_s * 1000),
                "isolation.level": "read_committed",
            },
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Consume jobs until ``stop``; a running job is then abandoned (restarted elsewhere)."""
        self._stop = stop
        self._progress = kafka.producer(self._settings, **{"client.id": self.worker_id})
        self._completion = await asyncio.to_thread(
            Completion, self._settings, worker_id=self.worker_id, group_id=self.group_id
        )
        self._control = await asyncio.to_thread(self._follow_control)
        consumer = ConsumerLoop(
            self._settings,
            self.config,
            self.handle,
            committer=self._completion,
            on_released=self._released,
        )
        helpers = [
            asyncio.create_task(self._follow_cancels(), name="jobs.control"),
            asyncio.create_task(self._abandon_on(stop), name="abandon-on-stop"),
        ]
        logger.info("job runner started worker_id=%s group=%s", self.worker_id, self.group_id)
        try:
            await consumer.run(stop)
        finally:
            await self._shutdown(helpers)

    def _follow_control(self) -> Consumer:
        consumer = kafka.consumer(self._settings, f"dspex-jobs-control-{uuid.uuid4().hex}")
        consumer.assign(end_offsets(consumer, self._control_topic, 30.0))
        return consumer

    # -- one job --------------------------------------------------------------------------

    async def handle(self, origin: Consumed) -> None:
        """Run the job of ``origin`` and stage its records with its offset (see ``txn``).

        Raises :class:`~dspex.agents.plumbing.loop.Unfinished` when the job was
        abandoned: its offset stays uncommitted and the group runs it again.
        """
        if self._stop.is_set():
            raise Unfinished
        try:
            record = self._serde.decode(
                origin.value or b"", topic=origin.topic, expect="OptimizationJob"
            ).record
        except SerdeError as exc:
            logger.warning("undecodable job %s error=%s", origin.where(), exc)
            self._completion.stage(origin, [self._dead_letter(origin, exc)])
            return
        job = self._current = _Job(origin)
        try:
            outcome = await self._attempts(job, record)
        finally:
            self._current = None
        if job.abandoned:
            logger.warning("job abandoned job_id=%s %s", record.get("job_id"), origin.where())
            raise Unfinished
        await asyncio.to_thread(self._progress.flush, 5.0)  # progress before the final chunk
        note = f"job {outcome.status} job_id={record.get('job_id')} worker_id={self.worker_id}"
        self._completion.stage(
            origin, outcome.records, f"{note} {outcome.summary}", versioned=outcome.versioned
        )

    async def _attempts(self, job: _Job, record: dict[str, Any]) -> JobOutcome:
        """The job's outcome, trying again (after a backoff) while it says ``retry``."""
        job_id = str(record.get("job_id"))
        for attempt in range(1, MAX_ATTEMPTS + 1):
            logger.info(
                "job started job_id=%s worker_id=%s %s attempt=%d",
                job_id,
                self.worker_id,
                job.origin.where(),
                attempt,
            )
            execution = JobExecution(
                self._settings,
                job.origin,
                record,
                worker_id=self.worker_id,
                producer=self._progress,
                attempt=attempt,
                max_attempts=MAX_ATTEMPTS,
                lms=self._lms,
            )
            outcome = await job.run(execution)
            if job.abandoned or outcome.status != "retry":
                break
            await asyncio.sleep(RETRY_BACKOFF_S)
        return outcome

    def _dead_letter(self, origin: Consumed, exc: Exception) -> Outgoing:
        error = ErrorInfo(type(exc).__name__, str(exc), None, "decode")
        record = dead_letter(origin, error, component="jobs")
        value = self._serde.encode("DeadLetter", record, topic=self._dlq)
        return Outgoing(self._dlq, origin.key or b"", value)

    # -- cancels, revokes, stopping --------------------------------------------------------

    async def _follow_cancels(self) -> None:
        """Hand cancel requests to the running job; serve the progress producer's reports."""
        while not self._closing.is_set():
            for control in await asyncio.to_thread(self._control.consume, 100, 0.2):
                self._on_control(control)
            self._progress.poll(0)

    def _on_control(self, message: Message) -> None:
        job = self._current
        running = job.execution if job is not None else None
        if message.error() is not None or running is None or not message.value():
            return
        if (message.key() or b"").decode("utf-8", "replace") != running.job_id:
            return
        try:
            control = self._serde.decode(
                message.value() or b"", topic=self._control_topic, expect="JobControl"
            ).record
        except SerdeError as exc:
            logger.warning("undecodable job control record: %s", exc)
            return
        if control["action"] == "cancel":
            logger.info(
                "cancel requested job_id=%s by=%s", control["job_id"], control["requested_by"]
            )
            running.request_cancel(control["requested_by"], control["reason"])

    def _released(self, partitions: set[tuple[str, int]]) -> None:
        """In the rebalance callback: abandon the running job if its partition is gone."""
        job = self._current
        if job is not None and (job.origin.topic, job.origin.partition) in partitions:
            logger.warning("partition of the running job moved worker_id=%s", self.worker_id)
            job.abandon()

    async def _abandon_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        job = self._current
        if job is not None:
            logger.warning("stopping: abandoning %s (restarted by the group)", job.origin.where())
            job.abandon()

    async def _shutdown(self, helpers: list[asyncio.Task[None]]) -> None:
        self._closing.set()
        helpers[1].cancel()
        await asyncio.gather(*helpers, return_exceptions=True)  # the control poll ends itself
        await asyncio.to_thread(self._progress.flush, 5.0)
        self._control.close()
        logger.info("job runner stopped worker_id=%s", self.worker_id)


def _check_settings(settings: Settings) -> None:
    if settings.jobs.max_poll_interval_s < settings.reliability.session_timeout_s:
        raise ConfigError(
            f"jobs.max_poll_interval_s={settings.jobs.max_poll_interval_s:g} must be at least "
            f"reliability.session_timeout_s={settings.reliability.session_timeout_s:g}"
        )


async def _in_daemon_thread(call: Callable[[], _T], name: str) -> _T:
    """``call()`` in a new daemon thread, awaited on the running loop."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[_T] = loop.create_future()

    def settle(result: _T | None, error: BaseException | None) -> None:
        if done.done():  # the awaiting task was cancelled meanwhile
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        try:
            result, error = call(), None
        except BaseException as exc:
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=target, name=name, daemon=True).start()
    return await done


def main(settings: Settings) -> int:
    """Process entry point: run until SIGTERM/SIGINT; 0 after a clean stop, 1 on failure."""
    configure_logging(settings.log_level)
    try:
        asyncio.run(serve_until_signalled(JobRunner(settings).run))
    except Exception:
        logger.exception("job runner failed")
        return 1
    return 0
