"""The pipeline agent: runs pipelines as stage requests through the router, answers each run once.

It consumes ``pipeline.runs`` (runs the router validated) as consumer group
``<prefix>pipeline`` on the shared :class:`~dspex.agents.plumbing.loop.ConsumerLoop`:
one task per run, up to :data:`IN_FLIGHT_RUNS` at once, whose offset is done once the
run's final answer is on the broker. Each run is a :class:`~dspex.agents.pipeline.run.Run`:
its stages go to ``requests`` as ordinary Requests (validation, cache, routing,
retries, DLQ, telemetry) with ``reply_topic = pipeline.replies``, which a
:class:`~dspex.agents.plumbing.catalog.CompactedReader` follows on every partition and
hands to the waiting runs by request id.

State. Every change of a run is written to the compacted ``pipeline.state`` topic
(a ``PipelineRun`` keyed by run id) *before* the progress chunk, stage request or
final answer it causes is sent, and once more when the final answer is acknowledged.
After a crash the next agent reads that topic, then ``pipeline.replies`` from just
before the oldest stage still running, so answers that came while it was down are
used, not run again; uncommitted runs are redelivered and resume from their state
(a finished one is answered again only if its final answer was not acknowledged; the
client drops a chunk whose seq it has). Not faust: stage answers are keyed by stage
request id, not run id, so a run-keyed table would need a repartition hop per stage,
and faust's restart took 12-16 s on the router against 2.8 s on this loop
(``docs/pipelines.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any

from dspex.agents.pipeline.answers import (
    final_response,
    progress_chunk,
    stage_telemetry,
    state_record,
)
from dspex.agents.pipeline.run import Issue, Run
from dspex.agents.pipeline.sessions import RunSessions
from dspex.agents.pipeline.views import RunStates, StageAnswers
from dspex.agents.plumbing.catalog import CompactedReader, PipelineCatalog
from dspex.agents.plumbing.loop import LoopApp, LoopConfig
from dspex.agents.plumbing.messages import Consumed, ErrorInfo
from dspex.agents.plumbing.records import dead_letter, error_response
from dspex.schemas.records import Record
from dspex.streams import kafka, tracing
from dspex.streams.errors import ConfigError, DSPexError, InvalidRequest, SerdeError
from dspex.streams.ops.admin import require_topics
from dspex.streams.pipelines.plan import Plan
from dspex.streams.serde import Serde, make_serde
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics

logger = logging.getLogger(__name__)

COMPONENT = "pipeline"
IN_FLIGHT_RUNS = 1000
READY_TIMEOUT_S = 60.0
DEADLINE_GRACE_S = 1.0  # after the run's deadline, stages have this long to say "timeout"
PLAN_WAIT_S = 10.0  # a run may arrive before this agent has read its (just published) pipeline
SEND_ATTEMPTS = 8
NEEDED = (
    "pipeline.runs",
    "pipeline.replies",
    "pipeline.state",
    "pipelines",
    "sessions",
    "requests",
    "telemetry",
    "dlq",
)


class PipelineApp(LoopApp):
    """The pipeline agent process: the runs loop, the state and replies readers, a producer."""

    def __init__(self, settings: Settings, *, app_id: str, instance_id: str | None = None) -> None:
        self._topics = topics = Topics(settings.topics)
        serde: Serde = make_serde(settings)
        self.pipelines = PipelineCatalog()
        self.states = RunStates()
        self.answers = StageAnswers()
        self._plans: dict[tuple[str, int | None], Plan] = {}
        self.sessions = RunSessions(settings, serde, app_id)
        self._active: dict[str, asyncio.Future[None]] = {}  # run id -> set when it is done
        self.reader = CompactedReader(
            settings,
            serde,
            {
                topics.name("pipelines"): ("PipelineVersion", self.pipelines.apply),
                topics.name("pipeline.state"): ("PipelineRun", self.states.apply),
            },
        )
        self.replies: CompactedReader | None = None
        config = LoopConfig(
            topics=(topics.name("pipeline.runs"),),
            group_id=app_id,
            client_id=app_id,
            limit=IN_FLIGHT_RUNS,
            instance_id=f"{app_id}-{instance_id}" if instance_id else None,
            drain_timeout_s=2.0,  # a run's state is on the topic: the next agent resumes it
        )
        super().__init__(settings, serde, config)
        self._app_id = app_id

    # -- one run -------------------------------------------------------------------------

    async def handle(self, consumed: Consumed) -> None:
        """Run (or resume, or answer again) one run; returns once its answer is on the broker."""
        try:
            if consumed.value is None:
                raise SerdeError("tombstone where a Request was expected", topic=consumed.topic)
            request = self._serde.decode(consumed.value, topic=consumed.topic, expect="Request")
        except SerdeError as exc:
            logger.warning("undecodable run %s error=%s", consumed.where(), exc)
            await self._dead_letter(consumed, ErrorInfo.from_exception(exc, "decode"), None)
            return
        record = request.record
        # a session's runs one at a time, in consumed order (docs/sessions.md)
        async with self.sessions.ordered(record.get("session_id")):
            await self._handle(consumed, record)

    async def _handle(self, consumed: Consumed, record: Record) -> None:
        try:
            plan = await self._plan(record)
        except InvalidRequest as exc:
            await self._reject(consumed, record, ErrorInfo.from_exception(exc, "validate"))
            return
        run_id = str(record["request_id"])
        active = self._active.get(run_id)
        if active is not None:  # the same run delivered twice (at-least-once): one runs it
            logger.info("run already running run_id=%s %s", run_id, consumed.where())
            await asyncio.shield(active)
            return
        self._active[run_id] = done = asyncio.get_running_loop().create_future()
        run = Run.resume(
            plan, record, self._topics.name("pipeline.replies"), self.states.get(run_id)
        )
        try:
            await self._serve(run)
        except (DSPexError, KeyError, TypeError, ValueError) as exc:  # a bug: answer, go on
            logger.exception("run failed %s run_id=%s", consumed.where(), run.run_id)
            await self._reject(consumed, record, ErrorInfo.from_exception(exc, "execute"))
        finally:
            del self._active[run_id]
            done.set_result(None)

    async def _plan(self, request: Mapping[str, Any]) -> Plan:
        ident = (str(request["pipeline_id"]), request.get("pipeline_version"))
        if ident not in self._plans:
            give_up = time.monotonic() + PLAN_WAIT_S
            while True:
                try:
                    version = self.pipelines.resolve(*ident)
                    break
                except InvalidRequest:
                    if time.monotonic() > give_up:
                        raise
                    await asyncio.sleep(0.2)
            self._plans[ident] = Plan.from_record(version)
        return self._plans[ident]

    async def _serve(self, run: Run) -> None:
        queue: asyncio.Queue[tuple[str, Record]] = asyncio.Queue()
        registered: set[str] = set()
        saved = _snapshot(run) if run.done or run.events else None
        measured = len(run.events)
        try:
            issues = self._resume(run)
            while True:
                for key in run.running():
                    request_id = run.request_id(key)
                    if request_id not in registered:
                        self.answers.wait(request_id, key, queue)
                        registered.add(request_id)
                saved = await self._save(run, saved)
                await self._progress(run)
                measured = await self._measure(run, measured)
                if run.done:
                    await self._answer(run)
                    return
                if issues:
                    await self._issue(run, issues)
                    saved = await self._save(run, saved)  # a resumed run will not send them again
                await self._next(run, queue)
                issues = [] if run.done else run.advance(_now_ms())
        finally:
            self.answers.forget(registered)

    def _resume(self, run: Run) -> list[Issue]:
        """New stages to start, plus running ones whose request may never have been sent."""
        now = _now_ms()
        issues = [] if run.done else run.advance(now)
        new = {issue.key for issue in issues}
        lost = [
            key
            for key in run.running()
            if key not in run.issued
            and key not in new
            and not self.answers.arrived(run.request_id(key))
        ]
        if lost:
            logger.info("resuming run_id=%s re-sending %s", run.run_id, ",".join(lost))
        return issues + [run.issue(key, now) for key in lost]

    async def _next(self, run: Run, queue: asyncio.Queue[tuple[str, Record]]) -> None:
        """Wait for stage answers (taking every one already there), or expire the run."""
        deadline = run.deadline_ms
        timeout = None if deadline is None else deadline / 1000 + DEADLINE_GRACE_S - time.time()
        try:
            async with asyncio.timeout(timeout):
                key, response = await queue.get()
        except TimeoutError:
            run.expire(_now_ms())
            return
        run.answer(key, response, _now_ms())
        while not queue.empty():
            key, response = queue.get_nowait()
            run.answer(key, response, _now_ms())

    # -- producing -----------------------------------------------------------------------

    async def _save(self, run: Run, saved: _Snapshot | None = None) -> _Snapshot:
        """Write the run's state unless it is ``saved`` already; what was written."""
        now = _snapshot(run)
        if now != saved:
            topic = self._topics.name("pipeline.state")
            await self._deliver([(topic, run.run_id, "PipelineRun", state_record(run, _now_ms()))])
        return now

    async def _progress(self, run: Run) -> None:
        """Send the progress chunks not acknowledged yet (none unless the run streams)."""
        if run.request.get("stream"):
            topic = self._reply_topic(run.request)
            now = _now_ms()
            chunks = [
                (topic, run.run_id, "Response", progress_chunk(run, seq, now))
                for seq in range(min(run.delivered, len(run.events)), len(run.events))
            ]
            await self._deliver(chunks)
        run.delivered = max(run.delivered, len(run.events))

    async def _measure(self, run: Run, since: int) -> int:
        """One Telemetry (kind ``stage``) per stage that ended since event ``since``.

        Not awaited: a lost measurement is a gap in a dashboard, not a lost answer.
        """
        if self._publisher is None:
            return since
        topic = self._topics.name("telemetry")
        for event in run.events[since:]:
            record = stage_telemetry(run, event, self._app_id)
            if record is not None:
                await self._publisher.send(topic, record["program_id"], "Telemetry", record)
        return len(run.events)

    async def _answer(self, run: Run) -> None:
        """The final answer, unless an earlier agent's was acknowledged already."""
        if run.delivered > len(run.events):
            return
        if self._publisher is None:
            raise RuntimeError("the pipeline agent answers only between start() and stop()")
        session = await self.sessions.record(run, self._publisher)  # its turn, then the answer
        final = final_response(run, _now_ms(), session)
        await self._deliver([(self._reply_topic(run.request), run.run_id, "Response", final)])
        run.delivered = len(run.events) + 1
        await self._save(run)
        logger.info(
            "run answered run_id=%s pipeline=%s status=%s partial=%s",
            run.run_id,
            run.plan.pipeline_id,
            run.status,
            run.partial,
        )

    async def _issue(self, run: Run, issues: list[Issue]) -> None:
        if not issues:
            return
        topic = self._topics.name("requests")
        records = [(topic, i.request_id, "Request", i.request) for i in issues]
        # each stage request in a span of its own under the run's: the stage's router and
        # worker spans hang below it (docs/tracing.md)
        await self._deliver(records, spans=[f"stage {issue.key}" for issue in issues])
        run.issued |= {issue.key for issue in issues}

    async def _deliver(
        self, records: list[tuple[str, str, str, Record]], *, spans: list[str] | None = None
    ) -> None:
        """Produce every record and return once the broker has them all; resend what failed.

        ``spans`` names a tracing span per record, current while it is produced.
        """
        if self._publisher is None:
            raise RuntimeError("the pipeline agent sends only between start() and stop()")
        named = dict(zip(map(id, records), spans or [], strict=False))
        for attempt in range(1, SEND_ATTEMPTS + 1):
            sent = []
            for record in records:
                topic, key, schema, value = record
                name = named.get(id(record))
                with tracing.span(name) if name else contextlib.nullcontext():
                    sent.append(await self._publisher.send(topic, key.encode(), schema, value))
            outcomes = await asyncio.gather(*sent, return_exceptions=True)
            failed = [r for r, o in zip(records, outcomes, strict=True) if o is not None]
            if not failed:
                return
            logger.warning("sending failed attempt=%d records=%d; resending", attempt, len(failed))
            records = failed
            await asyncio.sleep(min(0.1 * 2**attempt, 5.0))
        raise DSPexError(f"pipeline agent: {len(records)} record(s) not acknowledged")

    def _reply_topic(self, request: Mapping[str, Any]) -> str:
        return str(request.get("reply_topic") or self._topics.name("responses"))

    async def _reject(self, consumed: Consumed, request: Record, failure: ErrorInfo) -> None:
        run_id = str(request.get("request_id") or "")
        logger.info("run refused run_id=%s field=%s error=%s", run_id, failure.field, failure)
        response = error_response(run_id, failure, produced_at_ms=_now_ms())
        await self._deliver([(self._reply_topic(request), run_id, "Response", response)])
        await self._dead_letter(consumed, failure, run_id)

    async def _dead_letter(
        self, consumed: Consumed, failure: ErrorInfo, run_id: str | None
    ) -> None:
        record = dead_letter(consumed, failure, component=COMPONENT, request_id=run_id)
        key = (consumed.key or b"").decode("utf-8", "replace")
        await self._deliver([(self._topics.name("dlq"), key, "DeadLetter", record)])

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Read pipelines and run states, then stage answers since the oldest running stage."""
        partitions = await asyncio.to_thread(self._check_topics)
        await self._ready(self.reader, partitions, "pipelines/pipeline.state")
        replies = self._topics.name("pipeline.replies")
        since = self.states.replay_from(_now_ms())
        self.replies = CompactedReader(
            self.settings,
            self._serde,
            {replies: ("Response", self.answers.apply)},
            since={replies: since},
        )
        await self._ready(self.replies, partitions, "pipeline.replies")
        logger.info(
            "pipeline agent ready running_runs=%d replies_since_ms=%d",
            len(self.states.running),
            since,
        )
        await super().start()

    async def _ready(self, reader: CompactedReader, partitions: dict[str, int], what: str) -> None:
        await reader.start(partitions)
        try:
            await asyncio.wait_for(reader.ready.wait(), READY_TIMEOUT_S)
        except TimeoutError as exc:
            await reader.stop()
            raise ConfigError(f"pipeline agent: {what} not read within {READY_TIMEOUT_S}s") from exc

    async def close(self) -> None:
        """Stop the readers (running runs stay on the state topic for the next agent)."""
        for reader in (self.reader, self.replies):
            if reader is not None:
                await reader.stop()

    def _check_topics(self) -> dict[str, int]:
        names = [self._topics.name(short) for short in NEEDED]
        return require_topics(kafka.admin_client(self.settings), names, "pipeline agent")


_Snapshot = tuple[int, str, int]


def _snapshot(run: Run) -> _Snapshot:
    """What a state write must capture (chunks acknowledged are written with the next one)."""
    return len(run.events), run.status, len(run.issued)


def _now_ms() -> int:
    return int(time.time() * 1000)


def make_pipeline_agent(settings: Settings, *, instance_id: str | None = None) -> PipelineApp:
    """The pipeline agent for ``settings``: consumer group ``<prefix>pipeline``."""
    return PipelineApp(
        settings, app_id=f"{settings.topics.prefix}pipeline", instance_id=instance_id
    )
