"""Integration fixtures: one real broker per session, fresh uuid-named topics per test, tails."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator

import pytest
from confluent_kafka.admin import AdminClient

from dspex.streams import kafka
from dspex.streams.ops.admin import TopicReport, ensure_topics
from dspex.streams.settings import Settings, load_settings
from dspex.streams.topics import Topics
from tests.integration.brokers import SecureBroker, any_broker, secure_local_broker
from tests.integration.tail import OpenTail, Tail


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.path):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def kafka_bootstrap(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[str]:
    with any_broker(tmp_path_factory.mktemp("kafka")) as (bootstrap, source):
        reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
        if reporter:
            reporter.write_line(f"\nintegration broker: {bootstrap} ({source})")
        yield bootstrap


@pytest.fixture(scope="session")
def secure_broker(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[SecureBroker]:
    """ONE secured local broker (SASL_SSL, SCRAM-SHA-512, ACLs) for the whole session."""
    with secure_local_broker(tmp_path_factory.mktemp("kafka-secure")) as broker:
        reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
        if reporter:
            reporter.write_line(f"\nsecured broker: {broker.bootstrap} (SASL_SSL)")
        yield broker


@pytest.fixture
def secure_settings(secure_broker: SecureBroker) -> Settings:
    """Settings for DSPex (as dspex-admin) on the secured broker, with a prefix for this test."""
    return load_settings(
        kafka=secure_broker.kafka(),
        topics={"prefix": f"s{uuid.uuid4().hex[:10]}."},
        lm={"pool_variants": {"gpu": "local"}},
    )


@pytest.fixture
def settings(kafka_bootstrap: str) -> Settings:
    """Settings pointing at the session broker with a topic prefix unique to this test."""
    prefix = f"t{uuid.uuid4().hex[:10]}."
    return load_settings(
        kafka={"bootstrap_servers": kafka_bootstrap},
        topics={"prefix": prefix},
        # the echo simulation (tests/conftest.py), and the local model on the gpu pool
        lm={"pool_variants": {"gpu": "local"}},
    )


@pytest.fixture
def admin(settings: Settings) -> AdminClient:
    return kafka.admin_client(settings)


@pytest.fixture
def create_topics(
    settings: Settings, admin: AdminClient
) -> Iterator[Callable[[], list[TopicReport]]]:
    """Factory: create the catalog's topics under this test's prefix; delete them afterwards."""
    topics = Topics(settings.topics)

    def create() -> list[TopicReport]:
        return ensure_topics(admin, topics.all())

    yield create
    names = [name for name, _ in topics.all()]
    existing = set(admin.list_topics(timeout=10).topics)
    doomed = [n for n in names if n in existing]
    if doomed:
        for future in admin.delete_topics(doomed, operation_timeout=30).values():
            future.result()


@pytest.fixture
def tails(settings: Settings) -> Iterator[OpenTail]:
    """Factory: a :class:`Tail` of this test's topics, closed however the test ends.

    Pass ``settings`` when the test made its own copy (same prefix, other options).
    """
    opened: list[Tail] = []

    def open_tail(
        shorts: Iterable[str], *, settings: Settings | None = None, from_beginning: bool = False
    ) -> Tail:
        opened.append(Tail(settings or default, shorts, from_beginning=from_beginning))
        return opened[-1]

    default = settings
    yield open_tail
    for tail in opened:
        tail.close()
