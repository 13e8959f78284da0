"""Tenants on a secured cluster: a SCRAM user, two topics, least-privilege ACLs, Kafka quotas.

``dspex tenants add NAME`` (:func:`add`) gives tenant ``NAME`` (names from
:mod:`dspex.streams.tenants`):

- SCRAM-SHA-512 credentials for user ``dspex-tenant-NAME`` (Admin API
  ``alter_user_scram_credentials``);
- its topics ``<prefix>tenant.NAME.requests`` and ``.responses`` (the catalog's
  ``requests``/``responses`` configs);
- ACLs for ``User:dspex-tenant-NAME`` and nothing else: WRITE and DESCRIBE on its
  request topic, READ and DESCRIBE on its response topic, READ on consumer groups
  prefixed ``<prefix>tenant.NAME.`` — so it reads no other tenant's answers, writes
  no other tenant's requests, and touches no shared topic (requests, responses,
  programs, variables, the DLQ...);
- Kafka quotas (:mod:`dspex.streams.ops.quotas`): producer and consumer byte rates
  and request percentage.

DSPex's own processes connect as a super user (``dspex-admin`` on the secured local
broker), which is how the router reads every tenant's requests and answers onto
each tenant's response topic. :func:`remove` takes all of it away again.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialDeletion,
    UserScramCredentialUpsertion,
)

from dspex.streams import kafka, tenants
from dspex.streams.errors import AccessRefused, ConfigError, DSPexError
from dspex.streams.ops import quotas
from dspex.streams.ops.admin import TopicReport, ensure_topics
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics

logger = logging.getLogger(__name__)

SCRAM_ITERATIONS = 8192
TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Tenant:
    """A tenant as the cluster knows it."""

    name: str
    principal: str
    request_topic: str
    response_topic: str
    topics_exist: bool = False
    acls: int = 0
    quotas: dict[str, float] = field(default_factory=dict)


def acl_bindings(name: str, prefix: str) -> list[AclBinding]:
    """Every ACL tenant ``name`` holds: its two topics and its groups, nothing more."""
    who = tenants.principal(name)
    literal, prefixed = ResourcePatternType.LITERAL, ResourcePatternType.PREFIXED
    grants = [
        (ResourceType.TOPIC, tenants.request_topic(name, prefix), literal, AclOperation.WRITE),
        (ResourceType.TOPIC, tenants.request_topic(name, prefix), literal, AclOperation.DESCRIBE),
        (ResourceType.TOPIC, tenants.response_topic(name, prefix), literal, AclOperation.READ),
        (ResourceType.TOPIC, tenants.response_topic(name, prefix), literal, AclOperation.DESCRIBE),
        (ResourceType.GROUP, tenants.resource_prefix(name, prefix), prefixed, AclOperation.READ),
    ]
    return [
        AclBinding(kind, resource, pattern, who, "*", operation, AclPermissionType.ALLOW)
        for kind, resource, pattern, operation in grants
    ]


def add(
    settings: Settings, name: str, password: str, limits: Mapping[str, float] | None = None
) -> list[TopicReport]:
    """Create (or update) tenant ``name``: credentials, topics, ACLs, quotas. Idempotent."""
    tenants.check_name(name)
    if len(password) < 12:
        raise ConfigError(f"tenant {name}: the password must have at least 12 characters")
    admin = kafka.admin_client(settings)
    user = tenants.username(name)
    info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, SCRAM_ITERATIONS)
    upsert = UserScramCredentialUpsertion(user, info, password.encode())
    _wait(admin.alter_user_scram_credentials([upsert]), f"tenant {name}: SCRAM credentials")
    catalog = Topics(settings.topics)
    prefix = settings.topics.prefix
    reports = ensure_topics(
        admin,
        [
            (tenants.request_topic(name, prefix), catalog.spec("requests")),
            (tenants.response_topic(name, prefix), catalog.spec("responses")),
        ],
        settings=settings.topics,
    )
    _wait(admin.create_acls(acl_bindings(name, prefix)), f"tenant {name}: ACLs")
    if limits:
        quotas.alter(settings, user, limits)
    logger.info("tenant added name=%s principal=%s", name, tenants.principal(name))
    return reports


def remove(settings: Settings, name: str) -> bool:
    """Remove tenant ``name``'s ACLs, quotas, credentials and topics; False if it had none."""
    admin = kafka.admin_client(settings)
    user, prefix = tenants.username(name), settings.topics.prefix
    deleted = _wait(admin.delete_acls([_acl_filter(name)]), f"tenant {name}: ACLs")
    quotas.delete(settings, user)
    found = user in _scram_users(admin)
    if found:
        info = UserScramCredentialDeletion(user, ScramMechanism.SCRAM_SHA_512)
        _wait(admin.alter_user_scram_credentials([info]), f"tenant {name}: credentials")
    names = [tenants.request_topic(name, prefix), tenants.response_topic(name, prefix)]
    present = [t for t in names if t in admin.list_topics(timeout=TIMEOUT_S).topics]
    if present:
        _wait(admin.delete_topics(present, operation_timeout=TIMEOUT_S), f"tenant {name}: topics")
    logger.info("tenant removed name=%s", name)
    return found or bool(present) or any(deleted)


def list_all(settings: Settings) -> list[Tenant]:
    """Every tenant with SCRAM credentials, with its topics, ACL count and quotas."""
    admin = kafka.admin_client(settings)
    prefix = settings.topics.prefix
    names = sorted(
        user.removeprefix(tenants.USER_PREFIX)
        for user in _scram_users(admin)
        if user.startswith(tenants.USER_PREFIX)
    )
    live = admin.list_topics(timeout=TIMEOUT_S).topics
    limits = quotas.describe(settings) if names else {}
    found = []
    for name in names:
        request, response = (
            tenants.request_topic(name, prefix),
            tenants.response_topic(name, prefix),
        )
        acls = admin.describe_acls(_acl_filter(name), request_timeout=TIMEOUT_S).result()
        found.append(
            Tenant(name, tenants.principal(name), request, response,
                   request in live and response in live, len(acls),
                   limits.get(tenants.username(name), {}))
        )  # fmt: skip
    return found


def _acl_filter(name: str) -> AclBindingFilter:
    """Every ACL of tenant ``name``'s principal (None: any resource name, any host)."""
    anything: Any = None  # the stubs say str; librdkafka takes NULL as "match any"
    return AclBindingFilter(
        ResourceType.ANY, anything, ResourcePatternType.ANY, tenants.principal(name), anything,
        AclOperation.ANY, AclPermissionType.ANY,
    )  # fmt: skip


def _scram_users(admin: AdminClient) -> set[str]:
    every = admin.describe_user_scram_credentials(request_timeout=TIMEOUT_S)
    if isinstance(every, dict):  # only when users are named
        raise TypeError("describe_user_scram_credentials() named no users but returned a dict")
    try:
        described = every.result()
    except KafkaException as exc:
        raise kafka.explain(exc) from exc
    return set(described)


def _wait(futures: object, what: str) -> list[object]:
    """Results of an Admin call's futures (a dict or list of them); errors name ``what``."""
    pending = list(futures.values()) if isinstance(futures, dict) else list(futures)  # type: ignore[call-overload]
    results = []
    for future in pending:
        try:
            results.append(future.result(timeout=TIMEOUT_S))
        except KafkaException as exc:
            cause = kafka.explain(exc)
            if isinstance(cause, AccessRefused):  # not a super user: say so as a refusal
                raise AccessRefused(cause.cause, f"{what}: {cause}") from exc
            raise DSPexError(f"{what}: {cause}") from exc
    return results
