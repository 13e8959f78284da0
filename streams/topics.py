"""The topic catalog: every DSPex topic with its partitions, cleanup policy and retention.

Names are relative (``requests``); the configured prefix (default ``dspex.``)
makes them physical (``dspex.requests``). The catalog is the single place that
says what a topic is for and how Kafka should keep it; ``dspex.streams.ops.admin``
creates and checks topics from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dspex.streams.errors import ConfigError
from dspex.streams.settings import MAX_MESSAGE_BYTES, TopicSettings

DAY_MS = 24 * 60 * 60 * 1000

RETRY_TIERS: dict[str, float] = {"1s": 1.0, "5s": 5.0, "30s": 30.0}
"""The delay-tier retry topics (``retry.<label>``) and the longest backoff each holds."""


@dataclass(frozen=True)
class TopicSpec:
    """One topic as the design defines it."""

    name: str
    schema: str
    key: str
    partitions: int
    cleanup_policy: str
    retention_ms: int | None = None
    doc: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def configs(self) -> dict[str, str]:
        """Topic-level Kafka configs this spec pins (compared against the live topic)."""
        conf = {
            "cleanup.policy": self.cleanup_policy,
            # what every DSPex producer may send (message.max.bytes): the two agree
            "max.message.bytes": str(MAX_MESSAGE_BYTES),
            **self.extra,
        }
        if self.retention_ms is not None:
            conf["retention.ms"] = str(self.retention_ms)
        return conf


def _delete(name: str, schema: str, key: str, partitions: int, days: int, doc: str) -> TopicSpec:
    return TopicSpec(name, schema, key, partitions, "delete", days * DAY_MS, doc)


def _compact(name: str, schema: str, key: str, partitions: int, doc: str) -> TopicSpec:
    # Compacted topics are the system of record: keep the latest value per key forever,
    # and compact promptly so a restarting process replays little.
    extra = {"min.cleanable.dirty.ratio": "0.1", "segment.ms": str(DAY_MS)}
    return TopicSpec(name, schema, key, partitions, "compact", None, doc, extra)


CATALOG: tuple[TopicSpec, ...] = (
    _delete(
        "requests",
        "Request",
        "session id, else request id",
        6,
        7,
        "Requests from applications; the router consumes them.",
    ),
    _delete(
        "pool.general",
        "Request",
        "same as requests",
        6,
        7,
        "Routed requests for the general worker pool (I/O-bound LM calls).",
    ),
    _delete(
        "pool.optimizer",
        "Request",
        "same as requests",
        3,
        7,
        "Routed requests for the optimizer pool (long optimizer jobs).",
    ),
    _delete(
        "pool.gpu",
        "Request",
        "same as requests",
        3,
        7,
        "Routed requests for the gpu pool (locally hosted models).",
    ),
    _delete(
        "responses",
        "Response",
        "request id",
        6,
        1,
        "Streamed response chunks (seq, final) back to clients.",
    ),
    _delete(
        "executions", "Execution", "request id", 6, 30, "One record per execution: the audit log."
    ),
    TopicSpec(
        "cache",
        "Response",
        "cache key (sha256 of program, inputs, variables and variant)",
        6,
        "compact,delete",
        7 * DAY_MS,
        "The final ok Response of each cacheable request, written by the worker that ran it;"
        " every router answers identical repeats from it. Entries expire after a week.",
        {"min.cleanable.dirty.ratio": "0.1", "segment.ms": str(DAY_MS)},
    ),
    _compact(
        "programs",
        "ProgramVersion",
        "program id",
        3,
        "Program versions (signature, module type, DSPy JSON state).",
    ),
    _compact(
        "pipelines",
        "PipelineVersion",
        "pipeline id",
        3,
        "Pipeline versions (stages, references, map/when/optional); the pipeline agent runs them.",
    ),
    _delete(
        "pipeline.runs",
        "Request",
        "same as requests",
        3,
        7,
        "Pipeline runs the router validated (a Request naming pipeline_id); the pipeline"
        " agent consumes them.",
    ),
    _delete(
        "pipeline.replies",
        "Response",
        "request id (of a stage request)",
        3,
        1,
        "Answers to the pipeline agent's stage requests (their reply_topic): only the pipeline"
        " agent reads it; only routers and workers should write it (a Kafka ACL).",
    ),
    TopicSpec(
        "pipeline.state",
        "PipelineRun",
        "run id (the run's request id)",
        3,
        "compact,delete",
        7 * DAY_MS,
        "The pipeline agent's state per run (stage events, outputs, what was sent): a restarted"
        " agent resumes every run from it. Entries expire after a week.",
        {"min.cleanable.dirty.ratio": "0.1", "segment.ms": str(DAY_MS)},
    ),
    _compact(
        "variables",
        "VariableUpdate",
        "variable key: name | program/<program id>/<name> | module/<program id>/<module>/<name>",
        3,
        "Latest value of each shared variable; the router materializes it.",
    ),
    _delete(
        "variables.history",
        "VariableUpdate",
        "variable key (as variables)",
        3,
        365,
        "Every variable update with who and why: the variables' audit trail.",
    ),
    _delete(
        "telemetry",
        "Telemetry",
        "program id",
        6,
        7,
        "Per-execution measurements and worker health.",
    ),
    TopicSpec(
        "sessions",
        "SessionState",
        "session id",
        6,
        "compact",
        None,
        "Session state (bounded history, variables, pinned variants, counters, TTL), written by"
        " the worker serving the session; a tombstone ends it. Tombstones are kept a day"
        " (delete.retention.ms): within it, a returning session is told it expired.",
        {
            "min.cleanable.dirty.ratio": "0.1",
            "segment.ms": str(DAY_MS),
            "delete.retention.ms": str(DAY_MS),
        },
    ),
    _compact(
        "routing",
        "RoutingTable",
        "program id",
        3,
        "Current routing table per program, published by the learning agent.",
    ),
    _delete(
        "metrics",
        "MetricSnapshot",
        "metric name",
        3,
        7,
        "Windowed aggregates that dashboards read.",
    ),
    _delete(
        "retry",
        "Request",
        "request id",
        3,
        1,
        "Requests that failed transiently, with their attempt, pool and not-before headers;"
        " the router sends each back to its pool after its backoff (records of workers that"
        " predate the delay tiers below).",
    ),
    *(
        _delete(
            f"retry.{label}",
            "Request",
            "request id",
            3,
            1,
            f"Delay tier for retries whose backoff is at most {label} (the longest tier takes"
            " the rest), headers as on retry; the router's retrier pauses a partition until its"
            " first record is due, then sends it back to its pool.",
        )
        for label in RETRY_TIERS
    ),
    _delete(
        "dlq",
        "DeadLetter",
        "original key",
        3,
        30,
        "Dead letters: anything that could not be decoded, validated or executed.",
    ),
    _delete(
        "jobs",
        "OptimizationJob",
        "job id",
        3,
        7,
        "Optimizer jobs: the optimizer pool's job runners consume them (one job per member).",
    ),
    _compact(
        "jobs.control",
        "JobControl",
        "job id",
        3,
        "Control requests for optimizer jobs (cancel), latest per job.",
    ),
    _compact(
        "jobs.status",
        "Response",
        "job id",
        3,
        "The final Response of every finished optimizer job (completed, failed, cancelled).",
    ),
    TopicSpec(
        "jobs.checkpoints",
        "JobCheckpoint",
        "job id",
        3,
        "compact,delete",
        7 * DAY_MS,
        "How far each running optimizer job has got (baseline, compiled state, trials done):"
        " a restarted job resumes from it. Entries expire after a week.",
        {"min.cleanable.dirty.ratio": "0.1", "segment.ms": str(DAY_MS)},
    ),
)


AGENT_REPLY_TOPICS = frozenset({"pipeline.replies"})
"""Catalog topics that may be a request's ``reply_topic``: the pipeline agent's stage replies."""


@dataclass(frozen=True)
class Topics:
    """The catalog resolved against settings: prefix and partition overrides applied."""

    settings: TopicSettings

    def __post_init__(self) -> None:
        known = {s.name for s in CATALOG}
        unknown = sorted(set(self.settings.partitions) - known)
        if unknown:
            raise ConfigError(
                f"topics.partitions names unknown topics {unknown}; known: {sorted(known)}"
            )

    def name(self, short: str) -> str:
        """Physical topic name for a catalog entry, e.g. ``requests`` -> ``dspex.requests``."""
        self.spec(short)
        return f"{self.settings.prefix}{short}"

    def spec(self, short: str) -> TopicSpec:
        """The catalog entry with this settings' partition override applied."""
        for spec in CATALOG:
            if spec.name == short:
                override = self.settings.partitions.get(short)
                if override is None:
                    return spec
                return TopicSpec(**{**spec.__dict__, "partitions": override})
        known = ", ".join(s.name for s in CATALOG)
        raise KeyError(f"unknown topic {short!r}; the catalog has: {known}")

    def all(self) -> list[tuple[str, TopicSpec]]:
        """Every (physical name, spec) pair in catalog order."""
        return [(self.name(s.name), self.spec(s.name)) for s in CATALOG]
