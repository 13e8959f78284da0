"""Shared variables for the client: read them from their topics, set them on both.

``variables`` is compacted and keyed by variable key (see
:func:`dspex.streams.variables.variable_key`), so the value in force is found by
reading every partition from its start to its current end and replaying the
records through a :class:`~dspex.streams.variables.VariableStore`, exactly as the
router does: a refused record does not count, the last good value does.
``variables.history`` keeps every update for a year with who and why.

An update is validated here, before anything is produced (an invalid value
raises :class:`~dspex.streams.errors.InvalidRequest` and nothing is sent), then goes
to ``variables`` and to ``variables.history`` with the client's idempotent
producer; :func:`set_variable` returns once the broker has both.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypedDict

from dspex.schemas.records import Record
from dspex.streams.reader import read_to_end
from dspex.streams.serde import Serde
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics
from dspex.streams.variables import VariableStore, new_update, scope_ref_for, variable_key

logger = logging.getLogger(__name__)

Headers = list[tuple[str, str | bytes | None]]
Send = Callable[[str, bytes, bytes, Headers], Awaitable["asyncio.Future[None]"]]
"""How the client produces one message: returns a future resolved on delivery."""

READ_TIMEOUT_S = 10.0


class VariableScope(TypedDict, total=False):
    """Which variable a name means: ``scope`` (inferred when None: session if ``session``
    is given, else module if ``module`` is, else program if ``program`` is, else global),
    ``program``, ``module``, ``session`` (a session id: docs/sessions.md)."""

    scope: str | None
    program: str | None
    module: str | None
    session: str | None


class VariableOptions(VariableScope, total=False):
    """Options of ``set_variable``: see :func:`dspex.streams.variables.new_update`.

    ``var_type``/``constraints``/``observers`` default to the current record's;
    ``updated_by`` defaults to ``user@host``; ``source`` to ``"person"``.
    """

    var_type: str | None
    constraints: Mapping[str, Any] | None
    reason: str
    updated_by: str
    source: str
    observers: Sequence[str]


def scope_of(options: VariableScope) -> tuple[str, str | None]:
    """``(scope, scope_ref)`` for the options, the scope inferred when not given."""
    program, module, session = options.get("program"), options.get("module"), options.get("session")
    inferred = "session" if session else "module" if module else "program" if program else "global"
    scope = options.get("scope") or inferred
    return scope, scope_ref_for(scope, program, module, session)


async def set_variable(
    settings: Settings, serde: Serde, send: Send, name: str, value: Any, options: VariableOptions
) -> Record:
    """Validate and produce the next version of a variable to both topics; return the record."""
    topics = Topics(settings.topics)
    scope, scope_ref = scope_of(options)
    key = variable_key(name, scope, scope_ref)
    store, highest = await asyncio.to_thread(read_current, settings, serde, key)
    previous = store.get(key)
    if previous is not None:
        # a refused record may carry a higher version than the good one: stay above it
        previous["version"] = max(int(previous["version"]), highest.get(key, 0))
    record = new_update(
        name,
        value,
        var_type=options.get("var_type"),
        constraints=options.get("constraints"),
        scope=scope,
        scope_ref=scope_ref,
        previous=previous,
        updated_by=options.get("updated_by") or default_author(),
        source=options.get("source") or "person",
        reason=options.get("reason", ""),
        observers=options.get("observers", ()),
    )
    sent = []
    for short in ("variables", "variables.history"):
        topic = topics.name(short)
        value_bytes = serde.encode("VariableUpdate", record, topic=topic)
        sent.append(await send(topic, key.encode("utf-8"), value_bytes, []))
    await asyncio.gather(*sent)
    logger.info("set variable key=%s version=%s", key, record["version"])
    return record


def get_variable(
    settings: Settings, serde: Serde, name: str, options: VariableScope
) -> Record | None:
    """The record in force for one variable (what the routers use), or ``None``."""
    key = variable_key(name, *scope_of(options))
    store, _ = read_current(settings, serde, key)
    return store.get(key)


def list_variables(settings: Settings, serde: Serde) -> list[Record]:
    """Every variable's record in force, ordered by key."""
    store, _ = read_current(settings, serde)
    return store.records()


def variable_history(
    settings: Settings, serde: Serde, name: str, options: VariableScope
) -> list[Record]:
    """Every update of a variable still on ``variables.history``, oldest first.

    With no scope, program or module given: the updates of ``name`` in every scope.
    """
    topic = Topics(settings.topics).name("variables.history")
    exact = any(options.get(part) for part in ("scope", "program", "module"))
    key = variable_key(name, *scope_of(options)) if exact else None
    found = [
        record
        for _, record in read_topic(settings, serde, topic, key)
        if record is not None and record.get("name") == name
    ]
    return sorted(found, key=lambda r: (r["updated_at"], int(r["version"])))


def read_current(
    settings: Settings, serde: Serde, key: str | None = None
) -> tuple[VariableStore, dict[str, int]]:
    """The routers' view of ``variables`` (only ``key`` when given) and the highest
    version seen per key, refused records included."""
    topic = Topics(settings.topics).name("variables")
    store = VariableStore()
    highest: dict[str, int] = {}
    for record_key, record in read_topic(settings, serde, topic, key):
        if record is None:
            highest.pop(record_key, None)
        else:
            version = record.get("version")
            highest[record_key] = max(highest.get(record_key, 0), int(version or 0))
        error = store.apply(record_key, record)
        if error is not None:
            logger.warning("refused variable update topic=%s key=%s: %s", topic, record_key, error)
    return store, highest


def read_topic(
    settings: Settings, serde: Serde, topic: str, key: str | None = None
) -> list[tuple[str, Record | None]]:
    """Every ``(key, record)`` on ``topic`` (``None`` for a tombstone), in order per partition."""
    return read_to_end(settings, serde, topic, "VariableUpdate", key=key, timeout_s=READ_TIMEOUT_S)


def default_author() -> str:
    """``user@host`` of this process, for ``updated_by``."""
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"
