"""The local KRaft broker for real: start, use, restart on formatted storage, stop.

Runs in a temporary data dir on free ports (never 9092, never the user's data
dir); the jar cache is the default one, so Maven downloads at most once per machine.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from dspex.streams.ops import _kraft
from dspex.streams.ops.broker import LocalBroker
from dspex.streams.ops.cluster import local_bootstrap
from dspex.streams.settings import LocalBrokerSettings

pytestmark = pytest.mark.integration


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[LocalBroker]:
    settings = LocalBrokerSettings(
        port=_kraft.free_port(), controller_port=_kraft.free_port(), data_dir=tmp_path / "broker"
    )
    broker = LocalBroker(settings)
    try:
        yield broker
    finally:
        broker.stop()


def create_topic(bootstrap: str, name: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(name, 1, 1)], operation_timeout=20).values():
        future.result(timeout=30)


def topics(bootstrap: str) -> set[str]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    return set(admin.list_topics(timeout=10).topics)


def round_trip(bootstrap: str, topic: str, payload: bytes) -> bytes | None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    producer.produce(topic, key=b"k", value=payload)
    assert producer.flush(15) == 0
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"g-{uuid.uuid4().hex[:8]}",
        "auto.offset.reset": "earliest",
    })  # fmt: skip
    consumer.subscribe([topic])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                value: bytes | None = msg.value()
                return value
        return None
    finally:
        consumer.close()


def timed(label: str, timings: dict[str, float], start: float) -> None:
    timings[label] = round(time.monotonic() - start, 1)


def test_lifecycle_on_persistent_storage(broker: LocalBroker) -> None:
    timings: dict[str, float] = {}
    t = time.monotonic()
    info = broker.start()
    timed("first start (jars cached or not, format)", timings, t)
    assert broker.status() == info
    assert local_bootstrap(broker.settings) == info.bootstrap_servers
    assert info.bootstrap_servers == f"127.0.0.1:{broker.settings.port}"
    assert info.log_file.is_file() and "Kafka Server started" in info.log_file.read_text()

    topic = f"it-{uuid.uuid4().hex[:8]}"
    t = time.monotonic()
    create_topic(info.bootstrap_servers, topic)
    assert round_trip(info.bootstrap_servers, topic, b"hello") == b"hello"
    timed("create topic + round trip", timings, t)

    assert broker.start().pid == info.pid
    t = time.monotonic()
    assert broker.stop() is True
    timed("stop", timings, t)
    assert broker.status() is None
    assert not broker.state_file.exists()

    # The controller port the storage was formatted with is taken now: the broker
    # must come back on another one without re-formatting.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", broker.settings.controller_port))
        squatter.listen()
        t = time.monotonic()
        again = broker.start()
        timed("warm start on formatted storage", timings, t)
    props = _kraft.read_properties(broker.config)
    assert props["controller.quorum.bootstrap.servers"] != (
        f"127.0.0.1:{broker.settings.controller_port}"
    )
    assert again.pid != info.pid
    assert topic in topics(again.bootstrap_servers)
    second = f"it-{uuid.uuid4().hex[:8]}"
    create_topic(again.bootstrap_servers, second)  # needs the controller at its new port
    assert round_trip(again.bootstrap_servers, second, b"again") == b"again"
    print(f"\nlocal broker timings (s): {timings}")
