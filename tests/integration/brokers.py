"""Where integration tests get a real Apache Kafka broker.

In order: ``KAFKA_BOOTSTRAP_SERVERS`` (an existing cluster), a testcontainers
``apache/kafka`` container when a Docker engine answers, else the project's own
local KRaft broker started from Apache Kafka's jars in a temporary data dir.
Never a fake: if none of them can be had, the fixture fails, it does not skip.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka.admin import AdminClient

from dspex.streams.ops import _kraft
from dspex.streams.ops.broker import LocalBroker
from dspex.streams.ops.security import ADMIN, MECHANISM, Material
from dspex.streams.settings import LocalBrokerSettings

KAFKA_IMAGE = "apache/kafka:4.1.2"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
    except Exception:
        return False
    return True


@contextlib.contextmanager
def local_broker(data_dir: Path) -> Iterator[str]:
    settings = LocalBrokerSettings(
        port=free_port(), controller_port=free_port(), data_dir=data_dir, heap="768m"
    )
    broker = LocalBroker(settings)
    info = broker.start()
    try:
        yield info.bootstrap_servers
    finally:
        broker.stop()


@dataclass(frozen=True)
class SecureBroker:
    """The session's secured local broker: where it listens and its CA and passwords."""

    bootstrap: str
    material: Material
    mtls_bootstrap: str  # the SSL listener that requires a client certificate

    def kafka(self, user: str = ADMIN, password: str | None = None) -> dict[str, object]:
        """``kafka`` settings for ``user`` (its generated password unless ``password``)."""
        secret = password if password is not None else self.material.password(user)
        return {
            "bootstrap_servers": self.bootstrap,
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": MECHANISM,
            "sasl_username": user,
            "sasl_password": secret,
            "ssl_ca_location": self.material.ca,
        }


@contextlib.contextmanager
def secure_local_broker(data_dir: Path) -> Iterator[SecureBroker]:
    """The local KRaft broker with ``--secure``: always this, whatever else is available
    (neither KAFKA_BOOTSTRAP_SERVERS nor the container is secured)."""
    settings = LocalBrokerSettings(
        port=free_port(),
        controller_port=free_port(),
        mtls_port=free_port(),
        data_dir=data_dir,
        heap="768m",
        secure=True,
        start_timeout_s=300.0,  # a busy shared machine: TLS makes the JVM start slower still
    )
    broker = LocalBroker(settings)
    info = broker.start()
    try:
        listeners = _kraft.read_properties(broker.config)["listeners"].split(",")
        (mtls,) = [item.removeprefix("SSL://") for item in listeners if item.startswith("SSL://")]
        yield SecureBroker(info.bootstrap_servers, Material(broker.data_dir), mtls)
    finally:
        broker.stop()


@contextlib.contextmanager
def container_broker() -> Iterator[str]:
    from testcontainers.core.container import DockerContainer

    port = free_port()
    container = DockerContainer(KAFKA_IMAGE).with_bind_ports(9092, port)
    for key, value in container_env(f"127.0.0.1:{port}").items():
        container = container.with_env(key, value)
    with container:
        bootstrap = f"127.0.0.1:{port}"
        wait_for_metadata(bootstrap, timeout_s=120)
        yield bootstrap


def container_env(advertised: str) -> dict[str, str]:
    """Single-node KRaft settings for the official image (same as docker-compose.yml)."""
    return {
        "KAFKA_NODE_ID": "1",
        "KAFKA_PROCESS_ROLES": "broker,controller",
        "KAFKA_LISTENERS": "PLAINTEXT://:9092,CONTROLLER://:9093",
        "KAFKA_ADVERTISED_LISTENERS": f"PLAINTEXT://{advertised}",
        "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
        "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@localhost:9093",
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR": "1",
        "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
        "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "false",
    }


def wait_for_metadata(bootstrap: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    admin = AdminClient({"bootstrap.servers": bootstrap})
    while True:
        try:
            admin.list_topics(timeout=5)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


@contextlib.contextmanager
def any_broker(data_dir: Path) -> Iterator[tuple[str, str]]:
    """Yield (bootstrap servers, where it came from)."""
    existing = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if existing:
        yield existing, "KAFKA_BOOTSTRAP_SERVERS"
    elif docker_answers():
        with container_broker() as bootstrap:
            yield bootstrap, f"testcontainers {KAFKA_IMAGE}"
    else:
        with local_broker(data_dir) as bootstrap:
            yield bootstrap, "local KRaft broker (Apache Kafka jars from Maven Central)"
