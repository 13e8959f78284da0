"""Topic creation against a real broker: idempotent, and drift is reported, not hidden."""

from __future__ import annotations

import time
from collections.abc import Callable

from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewPartitions,
)

from dspex.streams.ops.admin import TopicReport
from dspex.streams.settings import Settings
from dspex.streams.topics import CATALOG, Topics
from tests.integration.stack import cli_env, run_dspex


def test_create_is_idempotent_and_matches_catalog(
    settings: Settings, admin: AdminClient, create_topics: Callable[[], list[TopicReport]]
) -> None:
    first = create_topics()
    assert [r.status for r in first] == ["created"] * len(CATALOG)
    second = create_topics()
    assert [r.status for r in second] == ["ok"] * len(CATALOG)
    live = admin.list_topics(timeout=10).topics
    for name, spec in Topics(settings.topics).all():
        assert len(live[name].partitions) == spec.partitions


def test_config_drift_is_reported(
    settings: Settings, admin: AdminClient, create_topics: Callable[[], list[TopicReport]]
) -> None:
    create_topics()
    routing = Topics(settings.topics).name("routing")
    resource = ConfigResource(
        ConfigResource.Type.TOPIC,
        routing,
        incremental_configs=[
            ConfigEntry("cleanup.policy", "delete", incremental_operation=AlterConfigOpType.SET)
        ],
    )
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(timeout=30)
    _wait_for_config(admin, routing, "cleanup.policy", "delete")
    reports = {r.topic: r for r in create_topics()}
    assert reports[routing].status == "differs"
    assert reports[routing].differences == ["cleanup.policy: catalog compact, cluster delete"]
    assert all(r.status == "ok" for name, r in reports.items() if name != routing)


def _wait_for_config(admin: AdminClient, topic: str, key: str, value: str) -> None:
    """Config changes reach describe_configs asynchronously: wait (bounded) until visible."""
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    for _ in range(100):
        (future,) = admin.describe_configs([resource]).values()
        if future.result(timeout=10)[key].value == value:
            return
        time.sleep(0.1)
    raise AssertionError(f"{topic}: {key} never became {value}")


def test_cli_topics_create_reports_drift_with_exit_code(
    settings: Settings, admin: AdminClient, create_topics: Callable[[], list[TopicReport]]
) -> None:
    run = run_dspex(cli_env(settings, COLUMNS="250"), "topics", "create")
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("created") == len(CATALOG)
    again = run_dspex(cli_env(settings, COLUMNS="250"), "topics", "create")
    assert again.returncode == 0, again.stderr
    assert "created" not in again.stdout
    requests = Topics(settings.topics).name("requests")
    for future in admin.create_partitions([NewPartitions(requests, 8)]).values():
        future.result(timeout=30)
    drift = run_dspex(cli_env(settings, COLUMNS="250"), "topics", "create")
    assert drift.returncode == 1
    assert "partitions: catalog 6, cluster 8" in drift.stdout
    assert "differ from the catalog" in drift.stderr
