"""The secured local broker: DSPex connects over SASL_SSL, and is refused clearly otherwise."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import KafkaError
from confluent_kafka.admin import ConfigResource, ResourceType

from dspex.streams import kafka
from dspex.streams.client.client import AsyncClient, Program
from dspex.streams.errors import AccessRefused, InvalidRequest
from dspex.streams.ops import tls
from dspex.streams.ops.admin import ensure_topics
from dspex.streams.reader import watermarks
from dspex.streams.settings import (
    MAX_MESSAGE_BYTES,
    RECORD_ENVELOPE_BYTES,
    Settings,
    load_settings,
)
from dspex.streams.topics import Topics
from tests.integration.brokers import SecureBroker


def test_dspex_admin_creates_topics_and_round_trips_a_record(secure_settings: Settings) -> None:
    admin = kafka.admin_client(secure_settings)
    topic = Topics(secure_settings.topics).name("requests")
    reports = ensure_topics(admin, [(topic, Topics(secure_settings.topics).spec("requests"))])
    assert [r.status for r in reports] == ["created"]
    producer = kafka.producer(secure_settings)
    producer.produce(topic, key=b"k", value=b"over TLS")
    assert producer.flush(30) == 0
    consumer = kafka.consumer(secure_settings, f"{secure_settings.topics.prefix}probe")
    consumer.subscribe([topic])
    try:
        message = None
        for _ in range(300):
            message = consumer.poll(0.2)
            if message is not None and message.error() is None:
                break
        assert message is not None and message.value() == b"over TLS"
    finally:
        consumer.close()


def _refusal(settings: Settings) -> AccessRefused:
    with pytest.raises(AccessRefused) as refused:
        kafka.check_reachable(settings, timeout_s=5)
    print(f"refused: cause={refused.value.cause}: {refused.value}")
    return refused.value


def test_a_wrong_password_is_refused_naming_the_credentials(secure_broker: SecureBroker) -> None:
    wrong = secure_broker.kafka(password="not-the-password")  # noqa: S106
    settings = load_settings(kafka=wrong)
    refused = _refusal(settings)
    assert refused.cause == "credentials"
    assert "SASL authentication failed" in str(refused)


def test_a_plaintext_client_is_refused_naming_tls(secure_broker: SecureBroker) -> None:
    settings = load_settings(kafka={"bootstrap_servers": secure_broker.bootstrap})
    refused = _refusal(settings)
    assert refused.cause == "plaintext"
    assert "SASL_SSL" in str(refused)


def test_an_untrusted_certificate_is_refused_naming_the_ca(
    secure_broker: SecureBroker, tmp_path: Path
) -> None:
    other_ca = tmp_path / "other-ca.pem"
    other_ca.write_bytes(tls.issue_ca("not the broker's CA").cert_pem)
    settings = load_settings(kafka={**secure_broker.kafka(), "ssl_ca_location": other_ca})
    refused = _refusal(settings)
    assert refused.cause == "certificate"
    assert "ssl_ca_location" in str(refused)


async def test_limits_agree_and_an_oversize_request_is_refused_at_the_client(
    secure_settings: Settings,
) -> None:
    admin = kafka.admin_client(secure_settings)
    topics = Topics(secure_settings.topics)
    ensure_topics(admin, topics.all())
    resource = ConfigResource(ResourceType.TOPIC, topics.name("requests"))
    configs = admin.describe_configs([resource])[resource].result()
    topic_max = int(configs["max.message.bytes"].value)
    # a busy broker may take a while to elect leaders of new topics: the client waits 10 s
    probe = kafka.consumer(secure_settings, f"{secure_settings.topics.prefix}probe")
    try:
        watermarks(probe, topics.name("responses"), 120.0)
    finally:
        probe.close()
    assert topic_max == MAX_MESSAGE_BYTES
    assert secure_settings.router.max_request_bytes + RECORD_ENVELOPE_BYTES <= topic_max
    async with AsyncClient(secure_settings) as client:
        with pytest.raises(InvalidRequest) as refused:
            await client.submit(Program.inline("question -> answer"), {"question": "x" * 1_200_000})
    print(f"refused at the client: {refused.value}")
    assert refused.value.field == "request" and "max.message.bytes" in str(refused.value)


def test_mtls_a_client_certificate_authenticates_and_none_is_refused(
    secure_broker: SecureBroker, tmp_path: Path
) -> None:
    material = secure_broker.material
    mtls = {
        "bootstrap_servers": secure_broker.mtls_bootstrap,
        "security_protocol": "SSL",
        "ssl_ca_location": material.ca,
    }
    with_cert = load_settings(
        kafka={**mtls, "ssl_certificate_location": material.admin_cert,
               "ssl_key_location": material.admin_key},
        topics={"prefix": f"m{uuid.uuid4().hex[:10]}."},
    )  # fmt: skip
    assert kafka.check_reachable(with_cert, timeout_s=30) == 1
    admin = kafka.admin_client(with_cert)  # User:CN=dspex-admin may create topics
    topic = Topics(with_cert.topics).name("requests")
    reports = ensure_topics(admin, [(topic, Topics(with_cert.topics).spec("requests"))])
    assert [r.status for r in reports] == ["created"]
    stranger = material.issue("stranger")  # signed by the CA, but no ACL names it
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(stranger.cert_pem)
    key.write_bytes(stranger.key_pem)
    as_stranger = with_cert.model_copy(
        update={"kafka": with_cert.kafka.model_copy(
            update={"ssl_certificate_location": cert, "ssl_key_location": key})}
    )  # fmt: skip
    producer = kafka.producer(as_stranger)
    outcome: list[object] = []
    producer.produce(topic, b"v", on_delivery=lambda error, _m: outcome.append(error))
    producer.flush(60)
    print(f"CN=stranger: {outcome}")
    assert outcome and getattr(outcome[0], "code", lambda: None)() == (
        KafkaError.TOPIC_AUTHORIZATION_FAILED
    )
    no_cert = load_settings(kafka=mtls)
    refused = _refusal(no_cert)
    assert refused.cause == "client_certificate"


async def test_a_client_with_a_wrong_password_fails_at_start_naming_the_credentials(
    secure_broker: SecureBroker, secure_settings: Settings
) -> None:
    """What an application sees, not only `check_reachable`: the client's first call."""
    wrong = secure_broker.kafka(password="not-the-password")  # noqa: S106
    settings = load_settings(kafka=wrong, topics={"prefix": secure_settings.topics.prefix})
    started = time.monotonic()
    with pytest.raises(AccessRefused) as refused:
        async with AsyncClient(settings) as client:
            await client.submit(Program.inline("word -> answer"), {"word": "x"}, deadline_s=30)
    waited = time.monotonic() - started
    print(f"\nclient refused after {waited:.1f}s: {refused.value}")
    assert refused.value.cause == "credentials"
    assert waited < 30  # refused, not left to time out
