"""Optimizer jobs from the client: submit, follow, cancel (behind ``AsyncClient``'s methods).

A job is an ``io.dspex.OptimizationJob`` produced to ``<prefix>jobs`` keyed by its
job id; cancelling produces an ``io.dspex.JobControl`` to ``<prefix>jobs.control``.
The job runner streams progress as Response chunks whose ``request_id`` is the
job id, on the client's reply topic (or the shared responses topic), then one
final Response: ``ok`` with the scores and what was published, ``cancelled`` or
``error``. A job restarted on another runner numbers its chunks from 0 again, so
job chunks are delivered in arrival order (not by ``seq``) up to the first final one.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypedDict

from dspex.schemas import records, times
from dspex.schemas.records import Record
from dspex.streams.client._replies import Chunk, Inbox
from dspex.streams.client.programs import latest_version
from dspex.streams.errors import InvalidRequest
from dspex.streams.optimizers import PIPELINE_PREFIX, check_job, pipeline_target
from dspex.streams.reader import latest_by_key, read_to_end
from dspex.streams.serde import Serde
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics

logger = logging.getLogger(__name__)

DEFAULT_JOB_TIMEOUT_S = 7 * 24 * 3600.0


class JobOptions(TypedDict, total=False):
    """What an optimizer job may say besides its program (see ``schemas/OptimizationJob.avsc``).

    ``optimizer``: "BootstrapFewShot", "MIPROv2", "SIMBA", "GEPA" or None (search only).
    ``dataset``: inline examples (dicts of input and label fields), or ``dataset_topic``.
    ``search``: ``{"temperature": {"min": 0, "max": 1, "steps": 3}, "model": {"choices": [...]}}``.
    ``job_id``: reuse one to resubmit a job idempotently (a finished job is not rerun).
    """

    optimizer: str | None
    optimizer_config: Mapping[str, Any]
    dataset: Sequence[Mapping[str, Any]] | None
    dataset_topic: str | None
    metric: str
    search: Mapping[str, Any]
    program_version: int | None
    val_fraction: float
    requested_by: str
    canary_weight: float | None
    job_id: str


def pipeline_job_target(pipeline_id: str) -> str:
    """The ``program_id`` of a job that optimizes the whole pipeline ``pipeline_id``."""
    return f"{PIPELINE_PREFIX}{pipeline_id}"


@dataclass(frozen=True)
class JobProgress:
    """One progress chunk of a job: phase, trial i of n, its score and the best so far."""

    job_id: str
    phase: str
    trial: int
    trials: int
    score: float | None
    best: float | None
    message: str
    worker: str | None
    text: str

    @classmethod
    def from_chunk(cls, chunk: Chunk) -> JobProgress:
        values = chunk.outputs or {}
        return cls(
            job_id=chunk.request_id,
            phase=str(values.get("phase", "")),
            trial=int(values.get("trial") or 0),
            trials=int(values.get("trials") or 0),
            score=values.get("score"),
            best=values.get("best"),
            message=str(values.get("message") or ""),
            worker=values.get("worker"),
            text=chunk.delta,
        )


@dataclass(frozen=True)
class JobResult:
    """How a job ended: ``status`` "ok", "cancelled" or "error", with its scores or error."""

    job_id: str
    status: str
    score_before: float | None
    score_after: float | None
    program_version: int | None
    variables: dict[str, Any]
    outputs: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def from_chunk(cls, chunk: Chunk) -> JobResult:
        outputs = dict(chunk.outputs or {})
        return cls(
            job_id=chunk.request_id,
            status=chunk.status,
            score_before=outputs.get("score_before"),
            score_after=outputs.get("score_after"),
            program_version=outputs.get("program_version"),
            variables=dict(outputs.get("variables") or {}),
            outputs=outputs,
            error=chunk.error,
        )


def job_record(
    program_id: str, options: JobOptions, *, reply_topic: str | None, now: datetime | None = None
) -> dict[str, Any]:
    """An OptimizationJob record ready for the serde (the runner checks it in depth)."""
    unknown = set(options) - set(JobOptions.__annotations__)
    if unknown:
        raise TypeError(f"unknown job option(s): {sorted(unknown)}")
    if not program_id:
        raise InvalidRequest("program_id", "name the registered program to optimize")
    if "metric" not in options:
        raise InvalidRequest("metric", "name a registered metric, e.g. exact_match")
    dataset, topic = options.get("dataset"), options.get("dataset_topic")
    if (dataset is None) == (topic is None):
        raise InvalidRequest("dataset", "give inline examples or a dataset topic (exactly one)")
    return records.optimization_job(
        job_id=options.get("job_id") or str(uuid.uuid4()),
        created_at=now or times.now(),
        program_id=program_id,
        program_version=options.get("program_version"),
        optimizer=options.get("optimizer"),
        optimizer_config_json=_json("optimizer_config", options.get("optimizer_config") or {}),
        dataset_json=None if dataset is None else _json("dataset", list(dataset)),
        dataset_topic=topic,
        val_fraction=float(options.get("val_fraction", 0.5)),
        metric=options["metric"],
        search_json=_json("search", options.get("search") or {}),
        reply_topic=reply_topic,
        requested_by=options.get("requested_by", ""),
        canary_weight=options.get("canary_weight"),
    )


def control_record(job_id: str, action: str, requested_by: str, reason: str) -> dict[str, Any]:
    """A JobControl record (``action`` "cancel")."""
    return records.job_control(
        job_id=job_id,
        action=action,
        requested_at=times.now(),
        requested_by=requested_by,
        reason=reason,
    )


class JobInbox(Inbox):
    """A job's chunks in arrival order up to the first final one (see the module doc)."""

    _final_seen = False

    def put(self, chunk: Chunk) -> None:
        if self._final_seen:
            return
        self._final_seen = chunk.final
        self._queue.put_nowait(chunk)


def job_inbox(job_id: str, timeout_s: float | None, now_loop: float) -> JobInbox:
    """A job's inbox, waiting up to ``timeout_s`` (default 7 days) from loop time ``now_loop``."""
    wait_s = DEFAULT_JOB_TIMEOUT_S if timeout_s is None else timeout_s
    deadline = datetime.now(UTC) + timedelta(seconds=wait_s)
    return JobInbox(job_id, deadline, now_loop + wait_s, 0.0)


async def wait_for_result(
    inbox: JobInbox, on_progress: Callable[[JobProgress], object] | None
) -> JobResult:
    """Progress to ``on_progress`` until the final chunk; RequestTimeout past the timeout."""
    while True:
        chunk = await inbox.next()
        if chunk.final:
            return JobResult.from_chunk(chunk)
        if on_progress is not None:
            on_progress(JobProgress.from_chunk(chunk))


def _json(name: str, value: Any) -> str:
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(name, f"not JSON-serializable: {exc}") from exc


def check_job_record(settings: Settings, serde: Serde, record: Mapping[str, Any]) -> None:
    """Refuse, before producing, a job the runner would refuse; ``InvalidRequest`` names the field.

    The runner's own checks (:func:`dspex.streams.optimizers.check_job`) plus the
    program: it must be registered, and a pinned version must exist.
    """
    check_job(record, backends=settings.lm.backends, max_trials=settings.jobs.max_trials)
    pipeline_id = pipeline_target(record["program_id"])
    if pipeline_id is not None:
        _check_pipeline(settings, serde, pipeline_id, record.get("program_version"))
        return
    topic = Topics(settings.topics).name("programs")
    program_id = str(record["program_id"])
    latest = latest_version(settings, serde, topic, program_id)
    if latest == 0:
        raise InvalidRequest("program_id", f"no program {program_id!r} is registered on {topic}")
    pinned = record.get("program_version")
    if pinned is not None and not 1 <= pinned <= latest:
        raise InvalidRequest(
            "program_version", f"{program_id} has versions 1..{latest}, not {pinned}"
        )


def _check_pipeline(settings: Settings, serde: Serde, pipeline_id: str, pinned: Any) -> None:
    topic = Topics(settings.topics).name("pipelines")
    found = read_to_end(settings, serde, topic, "PipelineVersion", key=pipeline_id)
    versions = {int(r["version"]) for _, r in found if r is not None}
    if not versions:
        raise InvalidRequest("program_id", f"no pipeline {pipeline_id!r} is registered on {topic}")
    if pinned is not None and pinned not in versions:
        known = sorted(versions)
        raise InvalidRequest("program_version", f"pipeline {pipeline_id} has {known}, not {pinned}")


def check_cancellable(settings: Settings, serde: Serde, job_id: str) -> None:
    """Refuse to cancel a job that was never submitted or has already finished."""
    final = job_status(settings, serde, job_id)
    if final is not None:
        raise InvalidRequest("job_id", f"job {job_id} already finished ({final['status']})")
    if not job_submitted(settings, serde, job_id):
        topic = Topics(settings.topics).name("jobs")
        raise InvalidRequest("job_id", f"no job {job_id} on {topic}")


def job_submitted(settings: Settings, serde: Serde, job_id: str) -> bool:
    """Whether an OptimizationJob with this id is still on the jobs topic."""
    topic = Topics(settings.topics).name("jobs")
    return bool(read_to_end(settings, serde, topic, "OptimizationJob", key=job_id))


def job_status(settings: Settings, serde: Serde, job_id: str) -> Record | None:
    """A finished job's final Response from ``jobs.status``; None while it has not finished."""
    topic = Topics(settings.topics).name("jobs.status")
    found = read_to_end(settings, serde, topic, "Response", key=job_id)
    return latest_by_key(found).get(job_id)
