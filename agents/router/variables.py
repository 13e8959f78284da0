"""Shared variables in the router: the materialized ``variables`` topic and how it steers requests.

:class:`SharedVariables` is the router's :class:`~dspex.streams.variables.VariableStore`,
fed by the :class:`~dspex.agents.plumbing.catalog.CompactedReader`; every record is validated
again there, and a refused one leaves the last good value in force.
:class:`RefusedUpdates` dead-letters the refused records (stage ``variables``).

For each request (see ``docs/variables.md``):

1. the store's variables for the program (global < program scope < the request's
   session's scope, ``when``
   conditions evaluated with the request's own variables on top) and the request's
   variables decide ``model``: a configured LM backend name pins the route's variant;
2. ``module`` (store < routing variant < request) sets the module type a
   registered program runs as, unless the request names ``module_type`` itself;
3. the effective variables are the store's (now with module scope, and the route's
   variant counting as ``model`` in conditions when no variable sets it),
   overridden by the routing variant's, overridden by the request's own.

The worker needs no consumer of its own: the router embeds the effective
variables in the pool record and the worker re-checks the values it uses
(``temperature``, ``max_tokens``, the module type).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Producer

from dspex.agents.plumbing.messages import Consumed, ErrorInfo
from dspex.agents.plumbing.records import dead_letter
from dspex.agents.router.cache import effective_variables
from dspex.agents.router.routing import Route
from dspex.schemas.records import Record
from dspex.streams import kafka
from dspex.streams.errors import DSPexError, InvalidRequest
from dspex.streams.serde import Serde
from dspex.streams.settings import LMSettings, Settings
from dspex.streams.topics import Topics
from dspex.streams.variables import MODULE_TYPES, VariableStore

logger = logging.getLogger(__name__)

MODEL = "model"
MODULE = "module"
STAGE = "variables"
FLUSH_TIMEOUT_S = 10.0
_MAX_WARNED = 1000


@dataclass(frozen=True)
class Steering:
    """What the variables decided for one request before its program is resolved."""

    request: Mapping[str, Any]
    """The request, with ``module_type`` set when the ``module`` variable applies."""
    route: Route
    """The chosen route, or the variant a ``model`` variable pins."""
    shared: Mapping[str, str]
    """The store's global and program-scope variables for the request."""


class SharedVariables:
    """The ``variables`` topic as the router sees it, and what it does to a request."""

    def __init__(self, lm: LMSettings, store: VariableStore | None = None) -> None:
        self._lm = lm
        self.store = store if store is not None else VariableStore()
        self._warned: set[str] = set()

    def apply(self, key: str, record: Record | None) -> InvalidRequest | None:
        """Take one ``variables`` record; the refusal, if any, for the reader to report."""
        return self.store.apply(key, record)

    def steer(
        self, request: Mapping[str, Any], route: Route, registered: Mapping[str, Any] | None
    ) -> Steering:
        """Apply ``model`` to the route and ``module`` to the request (steps 1 and 2)."""
        own = request.get("variables") or {}
        session = request.get("session_id")
        shared = self.store.resolve(request.get("program_id"), context=own, session_id=session)
        route = self._pinned(route, {**shared, **own})
        module = module_variable({**shared, **route.variables, **own})
        if module is not None and not request.get("module_type"):
            request = _with_module(request, module, registered)
        return Steering(request, route, shared)

    def effective(self, steering: Steering, module_type: str | None) -> dict[str, str]:
        """The variables the request runs with (step 3)."""
        request, route = steering.request, steering.route
        own = request.get("variables") or {}
        context = {} if MODEL in steering.shared else {MODEL: json.dumps(route.variant)}
        context.update({**route.variables, **own})
        shared = self.store.resolve(
            request.get("program_id"),
            module_type,
            context=context,
            session_id=request.get("session_id"),
        )
        return effective_variables(route, request, shared)

    def _pinned(self, route: Route, variables: Mapping[str, str]) -> Route:
        if MODEL not in variables:
            return route
        variant = _decoded(variables[MODEL])
        backend = self._lm.backends.get(variant) if isinstance(variant, str) else None
        if backend is None:
            self._warn_once(variables[MODEL])
            return route
        if variant == route.variant:
            return route
        # The pool stays (hint, table or default); the table variant's own variables do not.
        return Route(
            route.pool,
            str(variant),
            "variable",
            backend.model,
            table_version=route.table_version,
            program_version=route.program_version,
        )

    def _warn_once(self, value: str) -> None:
        # bounded: request variables are caller-controlled
        if value not in self._warned and len(self._warned) < _MAX_WARNED:
            self._warned.add(value)
            logger.warning(
                "model variable %s names no configured LM backend (%s): routing unchanged",
                value,
                ", ".join(sorted(self._lm.backends)),
            )


def module_variable(variables: Mapping[str, str]) -> str | None:
    """The module type the ``module`` variable names; InvalidRequest when it names none."""
    if MODULE not in variables:
        return None
    value = _decoded(variables[MODULE])
    if not isinstance(value, str) or value not in MODULE_TYPES:
        raise InvalidRequest(
            f"variables.{MODULE}",
            f"{variables[MODULE]} is not a module type (known: {', '.join(MODULE_TYPES)})",
        )
    return value


def _with_module(
    request: Mapping[str, Any], module: str, registered: Mapping[str, Any] | None
) -> dict[str, Any]:
    changed = {**request, "module_type": module}
    if registered is not None and registered.get("module_type") != module:
        # a module config belongs to its module type: BestOfN's "N" would break Predict
        changed["module_config_json"] = request.get("module_config_json") or "{}"
    return changed


def _decoded(text: str) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError, RecursionError):
        return None


class RefusedUpdates:
    """Dead-letters ``variables`` records the router refuses (stage ``variables``).

    Only records that arrive while the router is live are dead-lettered: replaying
    the compacted topic after a restart would dead-letter the same record again. With
    N router instances a live refusal is dead-lettered N times (same original offset).
    """

    def __init__(
        self,
        settings: Settings,
        serde: Serde,
        *,
        component: str,
        held: Callable[[str], Record | None] = lambda _: None,
    ) -> None:
        topics = Topics(settings.topics)
        self._held = held
        self._settings = settings
        self._serde = serde
        self._component = component
        self.topic = topics.name("variables")
        self._dlq = topics.name("dlq")
        self._producer: Producer | None = None

    async def __call__(self, original: Consumed, error: DSPexError, live: bool) -> None:
        """The CompactedReader's ``on_refused`` hook."""
        if original.topic != self.topic:
            return
        if not live:
            logger.warning(
                "variable update refused during replay %s (dead-lettered when it arrived): %s",
                original.where(),
                error,
            )
            return
        failure = ErrorInfo.from_exception(error, STAGE)
        now_ms = int(time.time() * 1000)
        letter = dead_letter(original, failure, component=self._component, failed_at_ms=now_ms)
        value = self._serde.encode("DeadLetter", letter, topic=self._dlq)
        if self._producer is None:
            self._producer = kafka.producer(self._settings)
        self._producer.produce(self._dlq, value, original.key)
        self._restore(original)
        await self.flush()

    def _restore(self, original: Consumed) -> None:
        """Produce the record in force again, so the refused one is not the key's latest.

        Compaction keeps only the latest record per key: left as it is, the refused
        record would be all a restarted router finds. The copy is the held record
        itself (same version), which every reader takes as a no-op.
        """
        key = (original.key or b"").decode("utf-8", "replace")
        held = self._held(key)
        if held is None or self._producer is None:
            return
        value = self._serde.encode("VariableUpdate", held, topic=self.topic)
        self._producer.produce(self.topic, value, original.key)
        logger.info("restored the value in force key=%s version=%s", key, held.get("version"))

    async def flush(self) -> None:
        """Wait for the dead letters to reach the broker; log the ones that did not."""
        if self._producer is None:
            return
        remaining = await asyncio.to_thread(self._producer.flush, FLUSH_TIMEOUT_S)
        if remaining:
            logger.error(
                "%d variable dead letter(s) not delivered to topic=%s", remaining, self._dlq
            )
