"""Tenants on the secured broker: each reads and writes its own two topics and nothing else.

Two tenants are made with :func:`dspex.streams.ops.tenants.add` (as ``dspex tenants add``
does); every attempt of tenant A on what is not its own is asserted to fail with an
authorization error from the broker (mapped to :class:`AccessRefused`), while B's own
traffic flows.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (
    AclBinding,
    AclOperation,
    AclPermissionType,
    ResourcePatternType,
    ResourceType,
)

from dspex.streams import kafka, tenants
from dspex.streams.errors import AccessRefused
from dspex.streams.ops import quotas
from dspex.streams.ops import tenants as tenant_ops
from dspex.streams.ops.admin import ensure_topics
from dspex.streams.settings import Settings, load_settings
from dspex.streams.topics import Topics
from tests.integration.brokers import SecureBroker

LIMITS = {"producer_byte_rate": 1_048_576.0, "consumer_byte_rate": 2_097_152.0}
LIMITS["request_percentage"] = 50.0
TIMEOUT_S = 60.0


@dataclass(frozen=True)
class World:
    """The operator's settings and two tenants' (A with quotas, B without)."""

    admin: Settings
    a: str
    b: str
    as_a: Settings
    as_b: Settings


@pytest.fixture(scope="module")
def world(secure_broker: SecureBroker) -> Iterator[World]:
    prefix = f"s{uuid.uuid4().hex[:10]}."
    admin = load_settings(kafka=secure_broker.kafka(), topics={"prefix": prefix})
    ensure_topics(kafka.admin_client(admin), Topics(admin.topics).all())
    tag = uuid.uuid4().hex[:6]
    a, b = f"a{tag}", f"b{tag}"
    passwords = {a: secrets.token_urlsafe(18), b: secrets.token_urlsafe(18)}
    tenant_ops.add(admin, a, passwords[a], LIMITS)
    tenant_ops.add(admin, b, passwords[b])

    def tenant(name: str) -> Settings:
        own = secure_broker.kafka(tenants.username(name), passwords[name])
        return load_settings(kafka=own, topics={"prefix": prefix})

    yield World(admin, a, b, tenant(a), tenant(b))
    for name in (a, b):
        tenant_ops.remove(admin, name)
    catalog = [name for name, _ in Topics(admin.topics).all()]
    client = kafka.admin_client(admin)  # held: futures of a collected client fail
    for future in client.delete_topics(catalog, operation_timeout=30).values():
        future.result()


def _produce(settings: Settings, topic: str) -> KafkaError | None:
    """Produce one record; the delivery error, or None when it was written."""
    outcome: list[KafkaError | None] = []
    producer = kafka.producer(settings)
    producer.produce(topic, b"v", key=b"k", on_delivery=lambda error, _msg: outcome.append(error))
    producer.flush(TIMEOUT_S)
    assert outcome, f"no delivery report for {topic}"
    return outcome[0]


def _consume(settings: Settings, topic: str, group: str) -> KafkaError | bytes:
    """Subscribe as ``group`` and return the first record's value, or the first error."""
    consumer = kafka.consumer(settings, group)
    consumer.subscribe([topic])
    try:
        for _ in range(int(TIMEOUT_S / 0.2)):
            message = consumer.poll(0.2)
            if message is None:
                continue
            error = message.error()
            if error is not None and error.code() != KafkaError._PARTITION_EOF:
                return error
            if error is None:
                return message.value() or b""
        raise AssertionError(f"neither a record nor an error on {topic} as {group}")
    finally:
        consumer.close()


def _denied(error: KafkaError | bytes | None, code: int) -> None:
    assert isinstance(error, KafkaError), f"expected {KafkaError(code).name()}, got {error!r}"
    assert error.code() == code, error
    refused = kafka.explain(KafkaException(error))
    assert isinstance(refused, AccessRefused) and refused.cause == "authorization", refused
    print(f"refused as expected: {refused}")


def _group(world: World, name: str) -> str:
    return f"{tenants.resource_prefix(name, world.admin.topics.prefix)}g-{uuid.uuid4().hex[:6]}"


def test_a_tenant_cannot_read_another_tenants_answers(world: World) -> None:
    prefix = world.admin.topics.prefix
    b_responses = tenants.response_topic(world.b, prefix)
    assert _produce(world.admin, b_responses) is None  # there is something to steal
    _denied(
        _consume(world.as_a, b_responses, _group(world, world.a)),
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
    )
    assert _consume(world.as_b, b_responses, _group(world, world.b)) == b"v"  # B is served


def test_a_tenant_cannot_write_another_tenants_requests(world: World) -> None:
    prefix = world.admin.topics.prefix
    _denied(_produce(world.as_a, tenants.request_topic(world.b, prefix)),
            KafkaError.TOPIC_AUTHORIZATION_FAILED)  # fmt: skip
    assert _produce(world.as_b, tenants.request_topic(world.b, prefix)) is None
    assert _produce(world.as_a, tenants.request_topic(world.a, prefix)) is None


@pytest.mark.parametrize("short", ["dlq", "programs", "variables", "responses", "requests"])
def test_a_tenant_cannot_read_shared_topics(world: World, short: str) -> None:
    topic = Topics(world.admin.topics).name(short)
    assert _produce(world.admin, topic) is None
    group = _group(world, world.a)
    _denied(_consume(world.as_a, topic, group), KafkaError.TOPIC_AUTHORIZATION_FAILED)


def test_a_tenant_cannot_write_the_shared_request_topic(world: World) -> None:
    shared = Topics(world.admin.topics).name("requests")
    _denied(_produce(world.as_a, shared), KafkaError.TOPIC_AUTHORIZATION_FAILED)


def test_a_tenant_reads_its_answers_only_in_its_own_groups(world: World) -> None:
    own = tenants.response_topic(world.a, world.admin.topics.prefix)
    assert _produce(world.admin, own) is None
    assert _consume(world.as_a, own, _group(world, world.a)) == b"v"
    foreign = _group(world, world.b)
    _denied(_consume(world.as_a, own, foreign), KafkaError.GROUP_AUTHORIZATION_FAILED)


def test_a_tenant_cannot_grant_itself_more(world: World) -> None:
    steal = AclBinding(
        ResourceType.TOPIC, tenants.response_topic(world.b, world.admin.topics.prefix),
        ResourcePatternType.LITERAL, tenants.principal(world.a), "*", AclOperation.READ,
        AclPermissionType.ALLOW,
    )  # fmt: skip
    client = kafka.admin_client(world.as_a)  # held: futures of a collected client fail
    (future,) = client.create_acls([steal]).values()
    with pytest.raises(KafkaException) as raised:
        future.result(timeout=TIMEOUT_S)
    _denied(raised.value.args[0], KafkaError.CLUSTER_AUTHORIZATION_FAILED)


def test_the_quota_set_for_a_tenant_is_visible_through_the_admin_api(world: World) -> None:
    described = quotas.describe(world.admin)
    print(f"quotas: {described}")
    assert described[tenants.username(world.a)] == LIMITS
    assert tenants.username(world.b) not in described
    listed = {t.name: t for t in tenant_ops.list_all(world.admin)}
    assert listed[world.a].quotas == LIMITS and listed[world.a].acls == 5
    assert listed[world.b].topics_exist
