"""One optimizer job in its own thread: everything between taking it and publishing its result.

:class:`JobExecution` turns one decoded OptimizationJob into a :class:`JobOutcome`
— the encoded records to publish atomically with the job's offset — and never
publishes them itself: the runner (:mod:`dspex.agents.jobs.jobs`) does that in one Kafka
transaction, so a job whose partition was revoked meanwhile cannot complete.

Order: check the record (:mod:`dspex.agents.jobs.jobspec`); skip a job ``jobs.status``
already shows finished; honour a cancel requested before it started; resolve the
program version and the variables in force for it; load and split the examples;
run :class:`~dspex.agents.jobs.optimize.Optimization` (evaluations through the general pool);
build the ProgramVersion, VariableUpdates, final Response and Telemetry.
Progress chunks and Telemetry go out while it runs through a plain idempotent
producer (:class:`Emitter`): they are informational, not part of the result.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import dspy

from dspex.agents.jobs import jobrecords as jr
from dspex.agents.jobs.checkpoints import Checkpoint, fingerprint
from dspex.agents.jobs.datasets import examples_from_json, examples_from_topic, split
from dspex.agents.jobs.jobspec import SEARCHABLE, JobSpec, parse_job
from dspex.agents.jobs.optimize import (
    JobCancelled,
    Optimization,
    OptimizationResult,
    PipelineEvaluator,
    Progress,
)
from dspex.agents.jobs.pipeline_opt import (
    PipelineJob,
    PipelineResult,
    encode_records,
    is_pipeline_job,
)
from dspex.agents.jobs.versions import Built, Versioned
from dspex.agents.plumbing.messages import Consumed, ErrorInfo, Outgoing
from dspex.agents.plumbing.publisher import Producer
from dspex.agents.plumbing.records import dead_letter
from dspex.agents.runtime.lms import build_lm
from dspex.agents.runtime.programs import ProgramSpec, parse_signature, spec_from_version
from dspex.schemas.records import Record
from dspex.streams.client.client import AsyncClient
from dspex.streams.client.jobs import job_status
from dspex.streams.client.programs import read_versions
from dspex.streams.client.variables import read_current
from dspex.streams.errors import InvalidRequest, RetryableError
from dspex.streams.reader import latest_by_key, read_to_end
from dspex.streams.serde import Serde, make_serde
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics
from dspex.streams.variables import VariableStore, constraints_of, parse_value, variable_key

logger = logging.getLogger(__name__)

COMPONENT = "jobs"


@dataclass(frozen=True)
class JobOutcome:
    """How a job ended: ``completed``, ``failed``, ``cancelled``, ``skipped`` or ``retry``."""

    status: str
    records: list[Outgoing] = field(default_factory=list)
    summary: str = ""
    versioned: Versioned | None = None
    """Set when the result is a new program version: its records depend on the number."""


class Emitter:
    """Progress chunks (and Telemetry) of one job, numbered in order; thread-safe."""

    def __init__(
        self, producer: Producer, serde: Serde, topics: Topics, reply_topic: str | None
    ) -> None:
        self._producer = producer
        self._serde = serde
        self.reply_topic = reply_topic or topics.name("responses")
        self._telemetry = topics.name("telemetry")
        self._lock = threading.Lock()
        self._seq = 0
        self._started = time.monotonic()
        self.head: jr.JobHead | None = None
        self.best: float | None = None

    def progress(self, event: Progress) -> None:
        """Produce one progress chunk; a scored event also produces Telemetry."""
        head = self.head
        if head is None:
            return
        with self._lock:
            record = jr.progress_response(head, self.next_seq(), event)
            self._send(self.reply_topic, head.job_id, "Response", record)
            if event.best is not None:
                self.best = event.best
                measured = jr.telemetry(head, self.elapsed_s(), event.best)
                self._send(self._telemetry, head.program_id or head.job_id, "Telemetry", measured)
        logger.info("job progress job_id=%s %s", head.job_id, jr.describe(event))

    def next_seq(self) -> int:
        seq = self._seq
        self._seq += 1
        return seq

    def elapsed_s(self) -> float:
        return time.monotonic() - self._started

    def _send(self, topic: str, key: str, schema: str, record: Record) -> None:
        value = self._serde.encode(schema, record, topic=topic)
        try:
            self._producer.produce(topic, value, key.encode())
        except BufferError:  # progress is informational: drop rather than block the job
            logger.warning("progress dropped (producer queue full) topic=%s", topic)


class JobExecution:
    """Runs one job (``run`` blocks; call it in a thread). See the module doc."""

    def __init__(
        self,
        settings: Settings,
        origin: Consumed,
        record: Mapping[str, Any],
        *,
        worker_id: str,
        producer: Producer,
        attempt: int = 1,
        max_attempts: int = 3,
        lms: Mapping[str, dspy.BaseLM] | None = None,
    ) -> None:
        self._settings = settings
        self._origin = origin
        self._record = dict(record)
        self._worker_id = worker_id
        self._producer = producer
        self._attempt = attempt
        self._max_attempts = max_attempts
        self._lms = dict(lms or {})
        self._serde = make_serde(settings)
        self._topics = Topics(settings.topics)
        self.job_id = str(record.get("job_id") or "")
        self.cancel = threading.Event()
        self.cancelled_by = ""
        self.emitter = Emitter(producer, self._serde, self._topics, record.get("reply_topic"))
        self.emitter.head = self._head(record.get("program_version"))

    def request_cancel(self, requested_by: str, reason: str) -> None:
        """Stop at the next check; the job ends ``cancelled`` (thread-safe)."""
        self.cancelled_by = f"{requested_by or 'someone'}" + (f": {reason}" if reason else "")
        self.cancel.set()

    def run(self) -> JobOutcome:
        """The job's outcome; never raises."""
        try:
            return asyncio.run(self._run())
        except JobCancelled:
            return self._cancelled()
        except RetryableError as exc:
            if self._attempt < self._max_attempts:
                logger.warning("job will be retried job_id=%s error=%s", self.job_id, exc)
                return JobOutcome("retry", summary=str(exc))
            return self._failed(exc, "optimize")
        except InvalidRequest as exc:
            return self._failed(exc, "validate")
        except Exception as exc:  # a bug or a DSPy failure: fail this job, keep the runner
            logger.exception("job failed job_id=%s", self.job_id)
            return self._failed(exc, "optimize")

    async def _run(self) -> JobOutcome:
        spec = parse_job(
            self._record,
            backends=self._settings.lm.backends,
            max_trials=self._settings.jobs.max_trials,
        )
        if await asyncio.to_thread(self._already_finished):
            return JobOutcome("skipped", summary="already finished (jobs.status)")
        await asyncio.to_thread(self._check_cancel_requested)
        if is_pipeline_job(spec):  # a whole pipeline: agents/jobs/pipeline_opt.py
            return await self._pipeline(spec)
        base = await asyncio.to_thread(self._program, spec)
        self.emitter.head = self._head(base.version)
        store = await asyncio.to_thread(self._variables, spec)
        current = {k: json.loads(v) for k, v in store.resolve(spec.program_id).items()}
        train, val = split(
            await asyncio.to_thread(self._examples, spec, base), spec.val_fraction, spec.job_id
        )
        self.emitter.progress(Progress("baseline", message=f"{len(train)} train / {len(val)} val"))
        async with AsyncClient(self._settings) as client:
            evaluator = PipelineEvaluator(
                client,
                spec.metric,
                pool=self._settings.jobs.eval_pool,
                deadline_s=self._settings.jobs.eval_deadline_s,
                job_id=spec.job_id,
            )
            optimization = Optimization(
                spec,
                base,
                evaluator,
                compile_lm=self._compile_lm(),
                current=current,
                cancel=self.cancel,
                progress=self.emitter.progress,
                checkpoint=self._checkpoint(base, train, val),
            )
            result = await optimization.run(train, val)
        self._check_cancel()
        return await asyncio.to_thread(self._completed, spec, result, store)

    async def _pipeline(self, spec: JobSpec) -> JobOutcome:
        """A pipeline job: its stage programs' versions and the pinned pipeline, one outcome."""
        job = PipelineJob(
            self._settings,
            self._serde,
            spec,
            compile_lm=self._compile_lm(),
            cancel=self.cancel,
            progress=self.emitter.progress,
        )
        done = await job.run()
        self._check_cancel()
        head, seq = self._head_or_job(), self._seq()

        def built(result: PipelineResult) -> Built:
            outputs = result.outputs(spec)
            final = jr.final_response(head, seq, "ok", outputs=outputs)
            published = encode_records(self._serde, result.records)
            records = [*published, *self._final(final, result.score_after, True)]
            return Built(records, result.pipeline_version or 0, result.summary(spec))

        republish = done.republish
        if republish is None:  # nothing improved: nothing to number
            nothing = built(done)
            return JobOutcome("completed", nothing.records, nothing.summary)
        # the pipeline version is numbered when the result is committed, inside a
        # transaction fenced per pipeline (versions.py): a racing put or job takes the next
        return JobOutcome(
            "completed",
            versioned=Versioned(
                spec.program_id, lambda latest: built(republish(latest)), job.pipeline_id
            ),
        )

    # -- the steps ------------------------------------------------------------------------

    def _checkpoint(
        self, base: ProgramSpec, train: list[dspy.Example], val: list[dspy.Example]
    ) -> Checkpoint:
        return Checkpoint(
            self._settings,
            self._serde,
            self._producer,
            job_id=self.job_id,
            fingerprint=fingerprint(self._record, base, train, val),
            worker_id=self._worker_id,
        )

    def _already_finished(self) -> bool:
        return job_status(self._settings, self._serde, self.job_id) is not None

    def _check_cancel_requested(self) -> None:
        found = read_to_end(
            self._settings,
            self._serde,
            self._topics.name("jobs.control"),
            "JobControl",
            key=self.job_id,
        )
        control = latest_by_key(found).get(self.job_id)
        if control is not None and control.get("action") == "cancel":
            self.request_cancel(control.get("requested_by", ""), control.get("reason", ""))
        self._check_cancel()

    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise JobCancelled

    def _program(self, spec: JobSpec) -> ProgramSpec:
        topic = self._topics.name("programs")
        versions = read_versions(self._settings, self._serde, topic, program_id=spec.program_id)
        known = {int(r["version"]): r for r in versions.get(spec.program_id, [])}
        if not known:
            raise InvalidRequest("program_id", f"no program {spec.program_id!r} on {topic}")
        wanted = spec.program_version if spec.program_version is not None else max(known)
        if wanted not in known:
            raise InvalidRequest(
                "program_version", f"{spec.program_id} has no version {wanted} ({sorted(known)})"
            )
        return spec_from_version(known[wanted])

    def _variables(self, spec: JobSpec) -> VariableStore:
        store, _ = read_current(self._settings, self._serde)
        for variable in spec.search:  # a searched value must be one the variable may take
            held = store.get(variable_key(variable.name, "program", spec.program_id))
            if held is not None:
                _check_values(variable.name, variable.values, held)
        return store

    def _examples(self, spec: JobSpec, base: ProgramSpec) -> list[dspy.Example]:
        signature = parse_signature(base.signature)
        if spec.dataset_json is not None:
            examples = examples_from_json(spec.dataset_json, signature)
        else:
            examples = examples_from_topic(
                self._settings, self._serde, str(spec.dataset_topic), signature
            )
        limit = self._settings.jobs.max_examples
        if len(examples) > limit:
            raise InvalidRequest(
                "dataset_json", f"{len(examples)} examples, over jobs.max_examples={limit}"
            )
        return examples

    def _compile_lm(self) -> dspy.BaseLM:
        variant = self._settings.jobs.compile_variant or self._settings.lm.variant_for_pool(
            "optimizer"
        )
        if variant in self._lms:
            return self._lms[variant]
        backend = self._settings.lm.backends.get(variant)
        if backend is None:
            raise InvalidRequest("jobs.compile_variant", f"no LM backend named {variant!r}")
        return build_lm(backend)

    # -- outcomes -------------------------------------------------------------------------

    def _completed(
        self, spec: JobSpec, result: OptimizationResult, store: VariableStore
    ) -> JobOutcome:
        seq = self._seq()
        if result.improved and result.compiled:
            # the version number is picked when the result is published, inside a
            # transaction fenced per program (versions.py): a racing job takes the next one
            def build(latest: int) -> Built:
                return self._completed_records(spec, result, store, seq, latest)

            return JobOutcome("completed", versioned=Versioned(spec.program_id, build))
        built = self._completed_records(spec, result, store, seq, None)
        return JobOutcome("completed", built.records, built.summary)

    def _completed_records(
        self,
        spec: JobSpec,
        result: OptimizationResult,
        store: VariableStore,
        seq: int,
        latest: int | None,
    ) -> Built:
        """The job's records; with ``latest``, its compiled program becomes version latest+1."""
        out: list[Outgoing] = []
        version = None
        if latest is not None:
            topic = self._topics.name("programs")
            record = jr.result_version(
                result,
                job_id=spec.job_id,
                metric=spec.metric_name,
                optimizer=str(spec.optimizer),
                latest=latest,
            )
            version = int(record["version"])
            out.append(self._encode(topic, spec.program_id, "ProgramVersion", record))
            weight = spec.canary_weight
            if weight is not None and 0.0 < weight < 1.0 and record["parent_version"]:
                out.append(self._canary(spec, int(record["parent_version"]), version, weight))
        if result.improved:
            out += self._variable_records(spec, result, store)
        outputs = jr.result_outputs(
            result, optimizer=spec.optimizer, metric=spec.metric_name, version=version
        )
        outputs["canary_weight"] = spec.canary_weight
        final = jr.final_response(self._head_or_job(), seq, "ok", outputs=outputs, version=version)
        quality = result.score_after
        summary = f"{spec.metric_name} {result.score_before:.4f} -> {quality:.4f} version={version}"
        return Built([*out, *self._final(final, quality, True)], version or 0, summary)

    def _canary(self, spec: JobSpec, parent: int, version: int, weight: float) -> Outgoing:
        """The routing table that canaries ``version`` beside ``parent``."""
        topic = self._topics.name("routing")
        found = read_to_end(self._settings, self._serde, topic, "RoutingTable", key=spec.program_id)
        table = jr.canary_table(
            spec.program_id,
            parent=parent,
            version=version,
            weight=weight,
            previous=latest_by_key(found).get(spec.program_id),
            job_id=spec.job_id,
            now_ms=int(time.time() * 1000),
        )
        return self._encode(topic, spec.program_id, "RoutingTable", table)

    def _variable_records(
        self, spec: JobSpec, result: OptimizationResult, store: VariableStore
    ) -> list[Outgoing]:
        types = {name: SEARCHABLE[name] for name in result.best.variables}
        types |= {v.name: (v.var_type, v.constraints) for v in spec.search}
        records = []
        for update in jr.variable_updates(
            result, types=types, store=store, job_id=spec.job_id, metric=spec.metric_name
        ):
            key = variable_key(update["name"], "program", spec.program_id)
            for short in ("variables", "variables.history"):
                records.append(
                    self._encode(self._topics.name(short), key, "VariableUpdate", update)
                )
        return records

    def _cancelled(self) -> JobOutcome:
        who = self.cancelled_by or "a cancel request"
        # the Response's request_id (and a dead letter's) is the job id: not repeated here
        error = ErrorInfo("Cancelled", f"cancelled by {who}", None, "optimize")
        final = jr.final_response(self._head_or_job(), self._seq(), "cancelled", error=error)
        return JobOutcome("cancelled", self._final(final, self.emitter.best, False), who)

    def _failed(self, exc: BaseException, stage: str) -> JobOutcome:
        field_name = exc.field if isinstance(exc, InvalidRequest) else None
        retryable = isinstance(exc, RetryableError)
        error = ErrorInfo(type(exc).__name__, str(exc), field_name, stage, retryable)
        final = jr.final_response(self._head_or_job(), self._seq(), "error", error=error)
        dlq = self._topics.name("dlq")
        letter = dead_letter(
            self._origin, error, component=COMPONENT, request_id=self.job_id or None
        )
        records = [*self._final(final, self.emitter.best, False)]
        records.append(
            Outgoing(
                dlq, self._origin.key or b"", self._serde.encode("DeadLetter", letter, topic=dlq)
            )
        )
        return JobOutcome("failed", records, error.message)

    def _final(self, final: Record, quality: float | None, success: bool) -> list[Outgoing]:
        head = self._head_or_job()
        telemetry = jr.telemetry(head, self.emitter.elapsed_s(), quality, success)
        return [
            self._encode(self.emitter.reply_topic, self.job_id, "Response", final),
            self._encode(self._topics.name("jobs.status"), self.job_id, "Response", final),
            self._encode(
                self._topics.name("telemetry"),
                head.program_id or self.job_id,
                "Telemetry",
                telemetry,
            ),
        ]

    def _encode(self, topic: str, key: str, schema: str, record: Record) -> Outgoing:
        return Outgoing(topic, key.encode(), self._serde.encode(schema, record, topic=topic))

    def _head(self, version: Any) -> jr.JobHead:
        program_id = self._record.get("program_id")
        return jr.JobHead(
            self.job_id, program_id if isinstance(program_id, str) else "", version, self._worker_id
        )

    def _head_or_job(self) -> jr.JobHead:
        return self.emitter.head or self._head(None)

    def _seq(self) -> int:
        return self.emitter.next_seq()


def _check_values(name: str, values: tuple[Any, ...], held: Mapping[str, Any]) -> None:
    for value in values:
        try:
            parse_value(held["var_type"], json.dumps(value), constraints_of(held))
        except InvalidRequest as exc:
            raise InvalidRequest(f"search_json.{name}", exc.reason) from exc
