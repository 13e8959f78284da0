"""Kafka client plumbing: where the cluster is, and well-configured clients for it.

The one place that turns settings into client configuration, for both client
libraries DSPex uses: confluent-kafka (librdkafka: :func:`client_conf`, with
:meth:`KafkaSettings.to_librdkafka`), on the whole request path and for every
compacted-topic reader, and faust (:func:`sasl_credentials` and :func:`ssl_context`,
which the learning and metrics agents' faust app wraps in its own credential
types). Delivery guarantees (idempotence, acks=all) and security settings are
decided here once.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient

from dspex.streams.errors import BrokerUnavailable, ConfigError
from dspex.streams.ops.cluster import local_bootstrap
from dspex.streams.settings import KafkaSettings, Settings

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


@dataclass(frozen=True)
class SaslCredentials:
    """SASL credentials the settings describe (the password revealed, for a client only)."""

    mechanism: str
    username: str | None
    password: str | None


def sasl_credentials(kafka: KafkaSettings) -> SaslCredentials | None:
    """The SASL credentials for a ``SASL_*`` security protocol; None otherwise."""
    if not kafka.security_protocol.startswith("SASL"):
        return None
    password = kafka.sasl_password.get_secret_value() if kafka.sasl_password else None
    return SaslCredentials(kafka.sasl_mechanism or "PLAIN", kafka.sasl_username, password)


def ssl_context(kafka: KafkaSettings) -> ssl.SSLContext | None:
    """The TLS context for an ``SSL``/``SASL_SSL`` security protocol; None otherwise.

    Verifies the broker's certificate against ``ssl_ca_location`` (the system's CAs
    when unset) and presents a client certificate when one is configured (mTLS).
    """
    if kafka.security_protocol not in ("SSL", "SASL_SSL"):
        return None
    cafile = str(kafka.ssl_ca_location) if kafka.ssl_ca_location is not None else None
    context = ssl.create_default_context(cafile=cafile)
    if kafka.ssl_certificate_location is not None:
        password = kafka.ssl_key_password.get_secret_value() if kafka.ssl_key_password else None
        key = str(kafka.ssl_key_location) if kafka.ssl_key_location is not None else None
        context.load_cert_chain(str(kafka.ssl_certificate_location), key, password)
    return context
