"""Kafka client plumbing: where the cluster is, and well-configured clients for it.

Every confluent-kafka client DSPex creates comes from here, so delivery
guarantees (idempotence, acks=all) and security settings are decided once.
"""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient

from dspex.streams.errors import BrokerUnavailable, ConfigError
from dspex.streams.ops.broker import local_bootstrap
from dspex.streams.settings import Settings

_librdkafka_logger = logging.getLogger("librdkafka")


def bootstrap_servers(settings: Settings) -> str:
    """The configured cluster, else the running local broker; a clear error when neither."""
    if settings.kafka.bootstrap_servers:
        return settings.kafka.bootstrap_servers
    local = local_bootstrap(settings.local_broker)
    if local:
        return local
    raise ConfigError(
        "no Kafka cluster configured and no local broker running: "
        "run `dspex broker start` (or `dspex up`), or set KAFKA_BOOTSTRAP_SERVERS"
    )


def client_conf(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """librdkafka configuration for this cluster, with ``overrides`` (dotted keys) on top."""
    conf: dict[str, Any] = settings.kafka.to_librdkafka(bootstrap_servers(settings))
    # librdkafka's own log lines go through Python logging, so one config governs them all.
    conf["logger"] = _librdkafka_logger
    conf.update(overrides)
    return conf


def admin_client(settings: Settings) -> AdminClient:
    """An AdminClient for topic management."""
    return AdminClient(client_conf(settings))


def producer(settings: Settings, **overrides: Any) -> Producer:
    """An idempotent producer (acks=all): retries never duplicate or reorder a partition."""
    defaults = {
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": settings.kafka.linger_ms,
        # Java's and aiokafka's (faust's) key hashing: a key lands on the same partition
        # whoever produces it (librdkafka's default, CRC32, would split compacted topics)
        "partitioner": "murmur2_random",
    }
    return Producer(client_conf(settings, **{**defaults, **overrides}))


def consumer(settings: Settings, group_id: str, **overrides: Any) -> Consumer:
    """A consumer that commits only what the caller explicitly stores or commits."""
    defaults = {
        "group.id": group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
    }
    return Consumer(client_conf(settings, **{**defaults, **overrides}))


def check_reachable(settings: Settings, timeout_s: float = 10.0) -> int:
    """Ask the cluster for metadata; return the number of brokers or raise BrokerUnavailable."""
    servers = bootstrap_servers(settings)
    try:
        metadata = admin_client(settings).list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise BrokerUnavailable(f"bootstrap={servers}: no metadata in {timeout_s}s: {exc}") from exc
    return len(metadata.brokers)
