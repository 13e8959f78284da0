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
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypedDict

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from dspex.streams import kafka
from dspex.streams.client._listener import watermarks
from dspex.streams.client._replies import Chunk, Inbox
from dspex.streams.errors import BrokerUnavailable, DSPexError, InvalidRequest
from dspex.streams.serde import Serde
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics

if TYPE_CHECKING:
    from dspex.streams.client._async import AsyncClient

logger = logging.getLogger(__name__)

Record = dict[str, Any]
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
    return {
        "job_id": options.get("job_id") or str(uuid.uuid4()),
        "created_at": _millis(now or datetime.now(UTC)),
        "program_id": program_id,
        "program_version": options.get("program_version"),
        "optimizer": options.get("optimizer"),
        "optimizer_config_json": _json("optimizer_config", options.get("optimizer_config") or {}),
        "dataset_json": None if dataset is None else _json("dataset", list(dataset)),
        "dataset_topic": topic,
        "val_fraction": float(options.get("val_fraction", 0.5)),
        "metric": options["metric"],
        "search_json": _json("search", options.get("search") or {}),
        "reply_topic": reply_topic,
        "requested_by": options.get("requested_by", ""),
        "canary_weight": options.get("canary_weight"),
    }


def control_record(job_id: str, action: str, requested_by: str, reason: str) -> dict[str, Any]:
    """A JobControl record (``action`` "cancel")."""
    return {
        "job_id": job_id,
        "action": action,
        "requested_at": _millis(datetime.now(UTC)),
        "requested_by": requested_by,
        "reason": reason,
    }


class JobInbox(Inbox):
    """A job's chunks in arrival order up to the first final one (see the module doc)."""

    _final_seen = False

    def put(self, chunk: Chunk) -> None:
        if self._final_seen:
            return
        self._final_seen = chunk.final
        self._queue.put_nowait(chunk)


def open_inbox(client: AsyncClient, job_id: str, timeout_s: float | None) -> JobInbox:
    """Register a job's inbox with the client's dispatcher (before anything is produced)."""
    import asyncio

    wait_s = DEFAULT_JOB_TIMEOUT_S if timeout_s is None else timeout_s
    deadline = datetime.now(UTC) + timedelta(seconds=wait_s)
    inbox = JobInbox(job_id, deadline, asyncio.get_running_loop().time() + wait_s, 0.0)
    client._dispatcher.open(inbox)
    return inbox


async def produce_job(client: AsyncClient, record: Mapping[str, Any]) -> None:
    """Produce the job to the jobs topic (key: job id) and wait for the broker's ack."""
    topic = Topics(client._settings.topics).name("jobs")
    value = client._require_serde().encode("OptimizationJob", record, topic=topic)
    headers: list[tuple[str, str | bytes | None]] = [("dspex-job-id", str(record["job_id"]))]
    await (await client._send(topic, str(record["job_id"]).encode(), value, headers))


async def produce_cancel(client: AsyncClient, job_id: str, requested_by: str, reason: str) -> None:
    """Produce a cancel request to jobs.control (key: job id) and wait for the ack."""
    topic = Topics(client._settings.topics).name("jobs.control")
    record = control_record(job_id, "cancel", requested_by, reason)
    value = client._require_serde().encode("JobControl", record, topic=topic)
    await (await client._send(topic, job_id.encode(), value, []))


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


def _millis(moment: datetime) -> datetime:
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


# -- reading compacted topics (jobs.status, jobs.control) --------------------------------


def read_compacted(
    settings: Settings,
    serde: Serde,
    topic: str,
    schema: str,
    *,
    key: str | None = None,
    timeout_s: float = 30.0,
) -> list[tuple[str, Record | None]]:
    """Every ``(key, record)`` of ``topic`` up to its current end (``None``: a tombstone).

    ``key`` keeps only that key's records. Undecodable records are logged and skipped.
    """
    consumer = kafka.consumer(settings, f"dspex-jobs-read-{uuid.uuid4().hex}")
    try:
        wanted = key.encode() if key is not None else None
        return [
            (k.decode("utf-8", "replace"), _decode(serde, topic, schema, value, k))
            for k, value in scan(consumer, topic, timeout_s)
            if wanted is None or k == wanted
        ]
    except KafkaException as exc:
        raise BrokerUnavailable(f"topic={topic}: cannot read: {exc}") from exc
    finally:
        consumer.close()


def latest_by_key(records: list[tuple[str, Record | None]]) -> dict[str, Record]:
    """The last record per key, tombstones removing the key."""
    latest: dict[str, Record] = {}
    for key, record in records:
        if record is None:
            latest.pop(key, None)
        else:
            latest[key] = record
    return latest


def scan(consumer: Consumer, topic: str, timeout_s: float) -> Iterator[tuple[bytes, bytes | None]]:
    """``(key, value)`` of every record from the beginning to the end offsets seen at the start."""
    marks = watermarks(consumer, topic, timeout_s)
    ends = {p: high for p, (low, high) in marks.items() if high > low}
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
    give_up = time.monotonic() + timeout_s
    while ends:
        if time.monotonic() > give_up:
            raise BrokerUnavailable(f"topic={topic}: not read to its end within {timeout_s}s")
        for message in consumer.consume(500, 0.2):
            if message.error() is None:
                yield message.key() or b"", message.value()
        positions = consumer.position([TopicPartition(topic, p) for p in ends])
        for tp in positions:
            if tp.offset >= ends[tp.partition]:
                del ends[tp.partition]


def _decode(
    serde: Serde, topic: str, schema: str, value: bytes | None, key: bytes
) -> Record | None:
    if not value:
        return None
    try:
        return serde.decode(value, topic=topic, expect=schema).record
    except DSPexError as exc:
        logger.warning("skipping undecodable record topic=%s key=%r: %s", topic, key, exc)
        return None


def job_status(settings: Settings, serde: Serde, job_id: str) -> Record | None:
    """A finished job's final Response from ``jobs.status``; None while it has not finished."""
    topic = Topics(settings.topics).name("jobs.status")
    found = read_compacted(settings, serde, topic, "Response", key=job_id)
    return latest_by_key(found).get(job_id)
