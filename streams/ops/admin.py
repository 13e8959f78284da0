"""Topic administration: create the catalog's topics and report any that drifted.

``ensure_topics`` is idempotent: it creates what is missing and, for topics
that already exist, compares partitions, replicas and the configs the catalog
pins (cleanup policy, retention, ``min.insync.replicas``, ...) with what the
cluster holds. It never alters an existing topic: a difference is reported for
a person to decide.

Replication is decided here (:func:`replication_for`): what the settings say,
else from the cluster's size: 3 replicas with ``min.insync.replicas=2`` from
three brokers on (a write needs two copies, so one broker may fail without
losing an acknowledged record or stopping writes), one replica on a single node.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from dspex.streams.errors import BrokerUnavailable, ConfigError, TopicConfigError
from dspex.streams.settings import TopicSettings
from dspex.streams.topics import TopicSpec

logger = logging.getLogger(__name__)

Status = Literal["created", "ok", "differs"]


def replication_factor(brokers: int) -> int:
    """Replicas per partition on a cluster of ``brokers``: 3 from three on, else one each."""
    return min(3, max(1, brokers))


def min_insync(replicas: int) -> int:
    """``min.insync.replicas`` for ``replicas``: 2 of 3 or more (one may fail), else 1."""
    return 2 if replicas >= 3 else 1


@dataclass(frozen=True)
class Replication:
    """How many copies of each partition, and how many must have a write before it is acked."""

    factor: int
    min_insync: int

    def configs(self) -> dict[str, str]:
        """The topic config it pins (producers use acks=all: this is what "acked" means)."""
        return {"min.insync.replicas": str(self.min_insync)}


def replication_for(brokers: int, settings: TopicSettings | None = None) -> Replication:
    """The settings' factor and min ISR where set, else decided from the cluster's size."""
    settings = settings or TopicSettings()
    factor = settings.replication_factor or replication_factor(brokers)
    if factor > brokers:
        raise TopicConfigError(
            f"topics.replication_factor={factor} but the cluster has {brokers} broker(s)"
        )
    return Replication(factor, settings.min_insync_replicas or min_insync(factor))


@dataclass(frozen=True)
class TopicReport:
    """What ``ensure_topics`` found or did for one topic."""

    topic: str
    status: Status
    partitions: int
    differences: list[str] = field(default_factory=list)
    replicas: int = 1


def ensure_topics(
    admin: AdminClient,
    topics: Iterable[tuple[str, TopicSpec]],
    *,
    settings: TopicSettings | None = None,
    timeout_s: float = 30.0,
) -> list[TopicReport]:
    """Create missing topics; describe existing ones and report differences from the spec.

    Replication comes from ``settings`` (see :func:`replication_for`), else from the
    cluster's size.
    """
    wanted = dict(topics)
    brokers, existing = _existing(admin, timeout_s)
    replication = replication_for(brokers, settings)
    missing = [name for name in wanted if name not in existing]
    created = _create(admin, {n: wanted[n] for n in missing}, replication, timeout_s)
    await_visible(admin, set(wanted), timeout_s)
    present = {n: s for n, s in wanted.items() if n not in created}
    live = _describe(admin, list(present), timeout_s)
    reports = []
    for name, spec in wanted.items():
        if name in created:
            reports.append(TopicReport(name, "created", spec.partitions, [], replication.factor))
            continue
        partitions, replicas = existing.get(name, (spec.partitions, replication.factor))
        diffs = _differences(spec, replication, (partitions, replicas), live[name])
        status: Status = "differs" if diffs else "ok"
        reports.append(TopicReport(name, status, partitions, diffs, replicas))
    return reports


def _existing(admin: AdminClient, timeout_s: float) -> tuple[int, dict[str, tuple[int, int]]]:
    """The number of brokers, and (partitions, replicas of partition 0) per topic."""
    try:
        metadata = admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise BrokerUnavailable(f"cannot list topics: {exc}") from exc
    topics = {
        name: (len(t.partitions), len(t.partitions[0].replicas) if 0 in t.partitions else 0)
        for name, t in metadata.topics.items()
    }
    return len(metadata.brokers), topics


def _create(
    admin: AdminClient, specs: dict[str, TopicSpec], replication: Replication, timeout_s: float
) -> set[str]:
    if not specs:
        return set()
    new = [
        NewTopic(
            name,
            num_partitions=spec.partitions,
            replication_factor=replication.factor,
            config={**spec.configs(), **replication.configs()},
        )
        for name, spec in specs.items()
    ]
    created: set[str] = set()
    for name, future in admin.create_topics(new, request_timeout=timeout_s).items():
        try:
            future.result(timeout=timeout_s)
            created.add(name)
            logger.info(
                "topic created topic=%s partitions=%d replicas=%d min_insync=%d",
                name, specs[name].partitions, replication.factor, replication.min_insync,
            )  # fmt: skip
        except KafkaException as exc:
            # Another process may have created it between our listing and our request.
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise TopicConfigError(f"topic={name}: cannot create: {exc.args[0].str()}") from exc
    return created


def await_visible(admin: AdminClient, names: set[str], timeout_s: float) -> None:
    """Wait until every topic is in the broker's metadata with a leader for each partition.

    KRaft acknowledges a creation once the controller commits it; brokers learn of it a
    moment later, and until then describe/produce answer UNKNOWN_TOPIC_OR_PART.
    """
    deadline = time.monotonic() + timeout_s
    pending = set(names)
    while pending:
        topics = admin.list_topics(timeout=timeout_s).topics
        pending = {
            n
            for n in pending
            if n not in topics or any(p.leader < 0 for p in topics[n].partitions.values())
        }
        if pending and time.monotonic() > deadline:
            raise BrokerUnavailable(f"topics not visible after {timeout_s}s: {sorted(pending)}")
        if pending:
            time.sleep(0.1)


def _describe(admin: AdminClient, names: list[str], timeout_s: float) -> dict[str, dict[str, str]]:
    if not names:
        return {}
    resources = [ConfigResource(ConfigResource.Type.TOPIC, name) for name in names]
    out: dict[str, dict[str, str]] = {}
    for resource, future in admin.describe_configs(resources, request_timeout=timeout_s).items():
        try:
            entries = future.result(timeout=timeout_s)
        except KafkaException as exc:
            raise TopicConfigError(f"topic={resource.name}: cannot describe: {exc}") from exc
        out[resource.name] = {key: entry.value for key, entry in entries.items()}
    return out


def _differences(
    spec: TopicSpec, replication: Replication, shape: tuple[int, int], live: dict[str, str]
) -> list[str]:
    partitions, replicas = shape
    diffs = []
    if partitions != spec.partitions:
        diffs.append(f"partitions: catalog {spec.partitions}, cluster {partitions}")
    if replicas != replication.factor:
        diffs.append(f"replicas: wanted {replication.factor}, cluster {replicas}")
    for key, value in {**spec.configs(), **replication.configs()}.items():
        if live.get(key) != value:
            diffs.append(f"{key}: catalog {value}, cluster {live.get(key)}")
    return diffs


WAIT_MAX_S = 30.0


def _wait_for_topics(admin: AdminClient, who: str) -> dict[str, Any]:
    """The cluster's topic metadata, waiting (with back-off) while it cannot be reached."""
    started, pause, warned = time.monotonic(), 1.0, False
    while True:
        try:
            live: dict[str, Any] = admin.list_topics(timeout=10).topics
        except KafkaException as exc:
            if not warned:
                logger.warning("%s: Kafka cluster unreachable, waiting for it: %s", who, exc)
                warned = True
            time.sleep(pause)
            pause = min(pause * 2, WAIT_MAX_S)
            continue
        if warned:
            logger.info("%s: Kafka cluster reachable after %.1fs", who, time.monotonic() - started)
        return live


def require_topics(admin: AdminClient, names: Iterable[str], who: str) -> dict[str, int]:
    """Partition counts of every live topic; a ConfigError naming those of ``names`` missing.

    ``who`` (e.g. ``router``) starts the message, which says how to fix it. A
    cluster that does not answer is waited for (back-off up to 30 s, one warning
    line, one line when it answers): a process started before its broker serves
    once the broker is up, instead of exiting for its supervisor to retry.
    """
    live = _wait_for_topics(admin, who)
    missing = [name for name in names if name not in live]
    if missing:
        raise ConfigError(f"{who}: topics missing: {', '.join(missing)}; run `dspex topics create`")
    return {name: len(meta.partitions) for name, meta in live.items()}
