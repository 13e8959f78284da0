"""The optimizer pool's job runner: one member of the ``<prefix>jobs`` consumer group.

``python -m dspex.agents jobs`` consumes the ``jobs`` topic and runs one job at a time
(scale with processes and partitions). Why it never trips a rebalance, however
long a job takes: the job runs in its own thread while the main thread pauses
every assigned partition and keeps calling ``poll()``, so the consumer stays
well inside ``max.poll.interval.ms`` (``jobs.max_poll_interval_s``) and its
heartbeats continue; a message fetched before the pause took effect is put back
with ``seek``. The main thread also follows ``jobs.control`` for cancel requests.

Completion is atomic and fenced. A job's result — ProgramVersion, VariableUpdates
(``variables`` and ``variables.history``), the final Response (reply topic and
``jobs.status``), Telemetry — and the job's consumer offset are produced in **one
Kafka transaction** (``send_offsets_to_transaction`` with the consumer's group
metadata). A runner that lost the partition (a zombie from an older group
generation) has its offset commit refused, so its transaction aborts and
read-committed consumers never see its records. A runner killed mid-job leaves
the offset uncommitted: after the session timeout the partition's next owner
restarts the job from the beginning. A re-delivered job that ``jobs.status``
already shows finished is skipped. So a job is never lost and completes once.

Assignment is ``cooperative-sticky``: another member joining or leaving does not
revoke a partition that stays with this runner, so a running job is not
disturbed by unrelated rebalances. A revoked or lost partition abandons its
running job (it is restarted by the new owner) without publishing anything.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

import dspy
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from dspex.agents.jobs.jobrun import JobExecution, JobOutcome
from dspex.agents.jobs.txn import Completion
from dspex.agents.jobs.versions import VersionedCompletion
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


def default_runner_id() -> str:
    """``jobs-<host>-<random>:<pid>``: unique per runner, readable in progress and logs."""
    return f"jobs-{socket.gethostname()}-{uuid.uuid4().hex[:4]}:{os.getpid()}"


class _Running:
    """The job in progress: its message, its execution and the thread running it."""

    def __init__(self, origin: Consumed, execution: JobExecution) -> None:
        self.origin = origin
        self.execution = execution
        self.abandoned = False
        self.outcome: JobOutcome | None = None
        # a daemon: a process told to stop must not wait for an LM call of an abandoned job
        self.thread = threading.Thread(
            target=self._run, name=f"dspex-job-{execution.job_id}", daemon=True
        )

    def _run(self) -> None:
        self.outcome = self.execution.run()

    def done(self) -> bool:
        return not self.thread.is_alive()

    def abandon(self) -> None:
        """The partition is gone: stop, publish nothing."""
        self.abandoned = True
        self.execution.cancel.set()


class JobRunner:
    """One job runner (see the module doc). ``run(stop)`` blocks until ``stop`` is set.

    Counters for tests and logs: ``assigned``, ``revoked`` (revoke + lost callbacks),
    ``completed`` (transactions committed). ``lms`` pre-builds compile LMs by variant.
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
        self.worker_id = worker_id or default_runner_id()
        self.group_id = group_id or f"{settings.topics.prefix}jobs"
        topics = Topics(settings.topics)
        self.topic = topics.name("jobs")
        self._control_topic = topics.name("jobs.control")
        self._dlq = topics.name("dlq")
        self._settings = settings
        self._serde = make_serde(settings)
        self._poll_timeout_s = poll_timeout_s
        self._lms = dict(lms or {})
        self._current: _Running | None = None
        self._attempts: dict[str, int] = {}
        self._hold_until = 0.0
        self._paused: set[tuple[str, int]] = set()
        self.assigned = 0
        self.revoked = 0
        self.completed = 0
        _check_settings(settings)

    def run(self, stop: threading.Event) -> None:
        """Consume jobs until ``stop``; a running job is then abandoned (restarted elsewhere)."""
        self._consumer = self._subscribe()
        self._control = self._follow_control()
        self._progress = kafka.producer(self._settings, **{"client.id": self.worker_id})
        self._completion = Completion(
            self._settings, worker_id=self.worker_id, group_id=self.group_id
        )
        self._versions = VersionedCompletion(
            self._settings, worker_id=self.worker_id, group_id=self.group_id
        )
        logger.info("job runner started worker_id=%s group=%s", self.worker_id, self.group_id)
        try:
            while not stop.is_set():
                self._step()
        finally:
            self._shutdown()

    # -- wiring ---------------------------------------------------------------------------

    def _subscribe(self) -> Consumer:
        session_ms = int(self._settings.reliability.session_timeout_s * 1000)
        consumer = kafka.consumer(
            self._settings,
            self.group_id,
            **{
                "client.id": self.worker_id,
                "session.timeout.ms": session_ms,
                "heartbeat.interval.ms": max(500, session_ms // 5),
                "max.poll.interval.ms": int(self._settings.jobs.max_poll_interval_s * 1000),
                "partition.assignment.strategy": "cooperative-sticky",
                "isolation.level": "read_committed",
            },
        )
        consumer.subscribe(
            [self.topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        return consumer

    def _follow_control(self) -> Consumer:
        consumer = kafka.consumer(self._settings, f"dspex-jobs-control-{uuid.uuid4().hex}")
        consumer.assign(end_offsets(consumer, self._control_topic, 30.0))
        return consumer

    # -- the loop -------------------------------------------------------------------------

    def _step(self) -> None:
        message = self._consumer.poll(self._poll_timeout_s)
        if message is not None:
            self._on_message(message)
        for control in self._control.consume(100, 0):
            self._on_control(control)
        self._progress.poll(0)
        running = self._current
        if running is not None:
            self._pause_all()
            if running.done():
                self._finish(running)
        elif time.monotonic() >= self._hold_until:
            self._resume_all()

    def _on_message(self, message: Message) -> None:
        error = message.error()
        if error is not None:
            if error.code() != KafkaError._PARTITION_EOF:
                logger.warning("consumer error topic=%s error=%s", self.topic, error.str())
            return
        origin = Consumed.from_message(message)
        if self._current is not None or time.monotonic() < self._hold_until:
            # fetched before the pause took effect: put it back for later
            self._seek(origin)
            self._pause_all()
            return
        try:
            record = self._serde.decode(
                origin.value or b"", topic=origin.topic, expect="OptimizationJob"
            )
        except SerdeError as exc:
            logger.warning("undecodable job %s error=%s", origin.where(), exc)
            if not self._commit(origin, [self._dead_letter(origin, exc)]) and self._owns(origin):
                self._put_back(origin, RETRY_BACKOFF_S)
            return
        self._start(origin, record.record)

    def _start(self, origin: Consumed, record: dict[str, Any]) -> None:
        job_id = str(record.get("job_id"))
        attempt = self._attempts.get(job_id, 0) + 1
        self._attempts[job_id] = attempt
        execution = JobExecution(
            self._settings,
            origin,
            record,
            worker_id=self.worker_id,
            producer=self._progress,
            attempt=attempt,
            max_attempts=MAX_ATTEMPTS,
            lms=self._lms,
        )
        self._current = _Running(origin, execution)
        self._pause_all()
        self._current.thread.start()
        logger.info(
            "job started job_id=%s worker_id=%s %s attempt=%d",
            job_id,
            self.worker_id,
            origin.where(),
            attempt,
        )

    def _finish(self, running: _Running) -> None:
        self._current = None
        outcome = running.outcome
        job_id = running.execution.job_id
        if running.abandoned:
            logger.warning("job abandoned (partition revoked) job_id=%s", job_id)
            return
        if outcome is None or outcome.status == "retry":  # None: its thread died of a bug
            self._put_back(running.origin, RETRY_BACKOFF_S)
            return
        self._progress.flush(5.0)  # progress first, so the final chunk comes last
        summary = self._complete(running.origin, outcome)
        if summary is not None:
            self._attempts.pop(job_id, None)
            self.completed += 1
            logger.info(
                "job %s job_id=%s worker_id=%s %s", outcome.status, job_id, self.worker_id, summary
            )
        elif self._owns(running.origin):
            self._put_back(running.origin, RETRY_BACKOFF_S)

    def _put_back(self, origin: Consumed, backoff_s: float) -> None:
        self._seek(origin)
        self._hold_until = time.monotonic() + backoff_s
        self._pause_all()

    def _seek(self, origin: Consumed) -> None:
        try:
            self._consumer.seek(TopicPartition(origin.topic, origin.partition, origin.offset))
        except KafkaException as exc:  # not assigned any more: its next owner reads it
            logger.info("cannot put back %s: %s", origin.where(), exc)

    def _on_control(self, message: Message) -> None:
        running = self._current
        if message.error() is not None or running is None or not message.value():
            return
        if (message.key() or b"").decode("utf-8", "replace") != running.execution.job_id:
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
            running.execution.request_cancel(control["requested_by"], control["reason"])

    # -- pausing --------------------------------------------------------------------------

    def _pause_all(self) -> None:
        fresh = [tp for tp in self._consumer.assignment() if _tp(tp) not in self._paused]
        if fresh:
            self._consumer.pause(fresh)
            self._paused |= {_tp(tp) for tp in fresh}

    def _resume_all(self) -> None:
        # resume() restarts fetching (costly), so only partitions actually paused
        paused = [tp for tp in self._consumer.assignment() if _tp(tp) in self._paused]
        if paused:
            self._consumer.resume(paused)
        self._paused.clear()

    def _owns(self, origin: Consumed) -> bool:
        return any(
            tp.topic == origin.topic and tp.partition == origin.partition
            for tp in self._consumer.assignment()
        )

    # -- completing ---------------------------------------------------------------------

    def _complete(self, origin: Consumed, outcome: JobOutcome) -> str | None:
        """Publish a finished job's result; its summary, or None when that was refused."""
        if outcome.versioned is None:
            return outcome.summary if self._commit(origin, outcome.records) else None
        built = self._versions.commit(
            self._consumer, origin, outcome.versioned, lambda: self._owns(origin)
        )
        return built.summary if built is not None else None

    def _commit(self, origin: Consumed, records: list[Outgoing]) -> bool:
        """Publish ``records`` with the job's offset in one transaction (see ``txn``)."""
        return self._completion.commit(self._consumer, origin, records, lambda: self._owns(origin))

    def _dead_letter(self, origin: Consumed, exc: Exception) -> Outgoing:
        error = ErrorInfo(type(exc).__name__, str(exc), None, "decode")
        record = dead_letter(origin, error, component="jobs")
        value = self._serde.encode("DeadLetter", record, topic=self._dlq)
        return Outgoing(self._dlq, origin.key or b"", value)

    # -- rebalancing (callbacks run inside poll(), on this thread) -------------------------

    def _on_assign(self, _: Consumer, partitions: list[TopicPartition]) -> None:
        self.assigned += 1
        logger.info("assigned worker_id=%s partitions=%s", self.worker_id, _names(partitions))

    def _on_revoke(self, _: Consumer, partitions: list[TopicPartition]) -> None:
        self._release(partitions, "revoked")

    def _on_lost(self, _: Consumer, partitions: list[TopicPartition]) -> None:
        self._release(partitions, "lost")

    def _release(self, partitions: list[TopicPartition], how: str) -> None:
        if not partitions:
            return
        self.revoked += 1
        running = self._current
        gone = {_tp(p) for p in partitions}
        self._paused -= gone
        hit = running is not None and (running.origin.topic, running.origin.partition) in gone
        # a revoke is routine (a member joined, or this runner is stopping); losing a
        # partition, or a running job with it, is worth an operator's attention
        level = logging.WARNING if how == "lost" or hit else logging.INFO
        logger.log(level, "%s worker_id=%s partitions=%s", how, self.worker_id, _names(partitions))
        if running is not None and hit:
            running.abandon()

    # -- shutdown -------------------------------------------------------------------------

    def _shutdown(self) -> None:
        running = self._current
        if running is not None:
            logger.warning(
                "stopping: abandoning job_id=%s (restarted by the group)", running.execution.job_id
            )
            running.abandon()
            running.thread.join(30.0)
        self._progress.flush(5.0)
        self._control.close()
        self._consumer.close()
        logger.info(
            "job runner stopped worker_id=%s completed=%d revoked=%d",
            self.worker_id,
            self.completed,
            self.revoked,
        )


def _check_settings(settings: Settings) -> None:
    if settings.jobs.max_poll_interval_s < settings.reliability.session_timeout_s:
        raise ConfigError(
            f"jobs.max_poll_interval_s={settings.jobs.max_poll_interval_s:g} must be at least "
            f"reliability.session_timeout_s={settings.reliability.session_timeout_s:g}"
        )


def _tp(partition: TopicPartition) -> tuple[str, int]:
    return (partition.topic, partition.partition)


def _names(partitions: list[TopicPartition]) -> str:
    return ",".join(f"{p.topic}[{p.partition}]" for p in partitions)


def main(settings: Settings) -> int:
    """Process entry point: run until SIGTERM/SIGINT; 0 after a clean stop, 1 on failure."""
    configure_logging(settings.log_level)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        JobRunner(settings).run(stop)
    except Exception:
        logger.exception("job runner failed")
        return 1
    return 0
