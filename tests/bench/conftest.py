"""Bench fixtures: one real broker for the smoke test, as the integration tests get theirs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.brokers import any_broker


@pytest.fixture(scope="session")
def bench_bootstrap(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[str]:
    """``KAFKA_BOOTSTRAP_SERVERS``, a testcontainers broker, or the local KRaft broker."""
    with any_broker(tmp_path_factory.mktemp("bench-kafka")) as (bootstrap, source):
        reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
        if reporter:
            reporter.write_line(f"\nbench broker: {bootstrap} ({source})")
        yield bootstrap
