"""Topic administration: create the catalog's topics and report any that drifted.

``ensure_topics`` is idempotent: it creates what is missing and, for topics
that already exist, compares partitions and the configs the catalog pins
(cleanup policy, retention, ...) with what the cluster holds. It never alters
an existing topic: a difference is reported for a person to decide.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from dspex.streams.errors import BrokerUnavailable, ConfigError, TopicConfigError
from dspex.streams.topics import TopicSpec

logger = logging.getLogger(__name__)

Status = Literal["created", "ok", "differs"]


@dataclass(frozen=True)
class TopicReport:
    """What ``ensure_topics`` found or did for one topic."""

    topic: str
    status: Status
    partitions: int
    differences: list[str] = field(default_factory=list)


def ensure_topics(
    admin: AdminClient,
    topics: Iterable[tuple[str, TopicSpec]],
    *,
    replication_factor: int = 1,
    timeout_s: float = 30.0,
) -> list[TopicReport]:
    """Create missing topics; describe existing ones and report differences from the spec."""
    wanted = dict(topics)
    existing = _existing_partitions(admin, timeout_s)
    missing = [name for name in wanted if name not in existing]
    created = _create(admin, {n: wanted[n] for n in missing}, replication_factor, timeout_s)
    await_visible(admin, set(wanted), timeout_s)
    present = {n: s for n, s in wanted.items() if n not in created}
    live = _describe(admin, list(present), timeout_s)
    reports = []
    for name, spec in wanted.items():
        if name in created:
            reports.append(TopicReport(name, "created", spec.partitions))
            continue
        partitions = existing.get(name, spec.partitions)
        diffs = _differences(spec, partitions, live[name])
        reports.append(TopicReport(name, "differs" if diffs else "ok", partitions, diffs))
    return reports


def _existing_partitions(admin: AdminClient, timeout_s: float) -> dict[str, int]:
    try:
        metadata = admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise BrokerUnavailable(f"cannot list topics: {exc}") from exc
    return {name: len(t.partitions) for name, t in metadata.topics.items()}


def _create(
    admin: AdminClient, specs: dict[str, TopicSpec], replication: int, timeout_s: float
) -> set[str]:
    if not specs:
        return set()
    new = [
        NewTopic(
            name,
            num_partitions=spec.partitions,
            replication_factor=replication,
            config=spec.configs(),
        )
        for name, spec in specs.items()
    ]
    created: set[str] = set()
    for name, future in admin.create_topics(new, request_timeout=timeout_s).items():
        try:
            future.result(timeout=timeout_s)
            created.add(name)
            logger.info("topic created topic=%s partitions=%d", name, specs[name].partitions)
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


def _differences(spec: TopicSpec, partitions: int, live: dict[str, str]) -> list[str]:
    diffs = []
    if partitions != spec.partitions:
        diffs.append(f"partitions: catalog {spec.partitions}, cluster {partitions}")
    for key, value in spec.configs().items():
        if live.get(key) != value:
            diffs.append(f"{key}: catalog {value}, cluster {live.get(key)}")
    return diffs


def require_topics(admin: AdminClient, names: Iterable[str], who: str) -> dict[str, int]:
    """Partition counts of every live topic; a ConfigError naming those of ``names`` missing.

    ``who`` (e.g. ``router``) starts the message, which says how to fix it.
    """
    live = admin.list_topics(timeout=10).topics
    missing = [name for name in names if name not in live]
    if missing:
        raise ConfigError(f"{who}: topics missing: {', '.join(missing)}; run `dspex topics create`")
    return {name: len(meta.partitions) for name, meta in live.items()}
