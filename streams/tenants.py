"""Tenant naming: the one place that says which topics and principal a tenant owns.

A tenant writes requests to its own topic and reads answers from its own topic;
the router learns the tenant from the topic a request arrived on, never from a
field the sender controls. Names are relative like the catalog's (the configured
prefix, default ``dspex.``, makes them physical):

- requests:  ``tenant.<name>.requests``
- responses: ``tenant.<name>.responses``
- principal: ``User:dspex-tenant-<name>`` (SCRAM user ``dspex-tenant-<name>``)
- sessions:  the router stores tenant ``<name>``'s session ``<id>`` as ``tenant.<name>/<id>``

Every topic and consumer group a tenant may touch starts with ``<prefix>tenant.<name>.``,
so one prefixed ACL per resource type grants exactly that and nothing of another tenant.
"""

from __future__ import annotations

import re

from dspex.streams.errors import ConfigError

NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
USER_PREFIX = "dspex-tenant-"


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid tenant name, else raise ConfigError saying why."""
    if not NAME.match(name):
        raise ConfigError(
            f"tenant name {name!r} is invalid: use 1-31 characters, a lowercase letter first, "
            "then lowercase letters, digits or '-'"
        )
    return name


def resource_prefix(name: str, prefix: str) -> str:
    """The physical name prefix of every topic and group of tenant ``name``."""
    return f"{prefix}tenant.{check_name(name)}."


def request_topic(name: str, prefix: str) -> str:
    """Physical topic tenant ``name`` writes its requests to."""
    return f"{resource_prefix(name, prefix)}requests"


def response_topic(name: str, prefix: str) -> str:
    """Physical topic tenant ``name`` reads its answers from."""
    return f"{resource_prefix(name, prefix)}responses"


def username(name: str) -> str:
    """The SCRAM user name of tenant ``name``."""
    return f"{USER_PREFIX}{check_name(name)}"


def principal(name: str) -> str:
    """The Kafka principal of tenant ``name``."""
    return f"User:{username(name)}"


def request_topic_pattern(prefix: str) -> str:
    """A librdkafka subscription regex matching every tenant's request topic."""
    return "^" + re.escape(f"{prefix}tenant.") + r"[a-z][a-z0-9-]{0,30}\.requests$"


SCOPED_SESSION = re.compile(r"^tenant\.[a-z][a-z0-9-]{0,30}/")


def session_scope(name: str, session_id: str) -> str:
    """The session id tenant ``name``'s session ``session_id`` has past the router.

    Tenants choose session ids freely; scoped, two tenants never share a session.
    """
    return f"tenant.{check_name(name)}/{session_id}"


def is_scoped_session(session_id: str) -> bool:
    """True for a session id of the scoped form, which only the router may give."""
    return SCOPED_SESSION.match(session_id) is not None


def tenant_of(topic: str, prefix: str) -> str | None:
    """The tenant owning physical request or response ``topic``; None for shared topics."""
    head = f"{prefix}tenant."
    if not topic.startswith(head):
        return None
    name, _, rest = topic[len(head) :].partition(".")
    if rest not in ("requests", "responses") or not NAME.match(name):
        return None
    return name
