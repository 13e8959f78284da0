"""The topic catalog: what the design lists, with prefix and overrides applied."""

from __future__ import annotations

import pytest

from dspex.streams.errors import ConfigError
from dspex.streams.settings import TopicSettings
from dspex.streams.topics import CATALOG, Topics

DESIGN_TOPICS = {
    "requests",
    "pool.general",
    "pool.optimizer",
    "pool.gpu",
    "responses",
    "executions",
    "programs",
    "variables",
    "variables.history",
    "telemetry",
    "routing",
    "metrics",
    "retry",
    "retry.1s",
    "retry.5s",
    "retry.30s",
    "dlq",
    "jobs",
    "jobs.control",
    "jobs.status",
    "jobs.checkpoints",
    "cache",
    "pipelines",
    "pipeline.runs",
    "pipeline.replies",
    "pipeline.state",
    "sessions",
}


def test_catalog_is_the_design_table() -> None:
    assert {spec.name for spec in CATALOG} == DESIGN_TOPICS
    compacted = {spec.name for spec in CATALOG if spec.cleanup_policy == "compact"}
    assert compacted == {
        "programs",
        "pipelines",
        "variables",
        "routing",
        "jobs.control",
        "jobs.status",
        "sessions",
    }
    expiring = {spec.name for spec in CATALOG if spec.cleanup_policy == "compact,delete"}
    assert expiring == {
        "cache",
        "pipeline.state",
        "jobs.checkpoints",
    }  # the latest entry per key, for a week


def test_compacted_topics_keep_values_forever_and_delete_topics_expire() -> None:
    for spec in CATALOG:
        conf = spec.configs()
        if spec.cleanup_policy == "compact":
            assert "retention.ms" not in conf
        else:
            assert int(conf["retention.ms"]) > 0


def test_prefix_and_partition_override() -> None:
    topics = Topics(TopicSettings(prefix="acme.", partitions={"requests": 24}))
    assert topics.name("requests") == "acme.requests"
    assert topics.spec("requests").partitions == 24
    assert topics.spec("responses").partitions == 6
    assert all(name.startswith("acme.") for name, _ in topics.all())


def test_unknown_names_are_refused() -> None:
    with pytest.raises(ConfigError, match="requets"):
        Topics(TopicSettings(partitions={"requets": 3}))
    with pytest.raises(KeyError, match="unknown topic"):
        Topics(TopicSettings()).name("nope")


def test_the_retry_topic_holds_requests_briefly() -> None:
    spec = Topics(TopicSettings()).spec("retry")
    assert (spec.schema, spec.key, spec.cleanup_policy) == ("Request", "request id", "delete")
    assert spec.configs()["retention.ms"] == str(24 * 60 * 60 * 1000)
