"""The router's decisions, free of Kafka: request checks, program resolution, pool and variant.

Everything here is a pure function of a decoded ``Request`` record, the
materialized catalogs and the settings, so it is unit-tested without a broker.
:mod:`dspex.agents.router.router` runs it on the consumer loop.

Routing order: a ``pool_hint`` wins (reason ``hint``); else a variant sampled by
weight from the program's RoutingTable (or the ``*`` default table) decides the
pool (``table``); else ``settings.router.default_pool`` with the static variant
``settings.lm.variant_for_pool(pool)`` (``static``). A table whose weights are
all unusable (zero, negative, NaN, infinite) never breaks routing: it is
ignored with one warning per table version (``fallback``).
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
from collections.abc import Callable, Collection, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from dspex.agents.plumbing.deadlines import check_deadline, deadline_passed, expired
from dspex.agents.runtime.programs import (
    ProgramSpec,
    spec_from_request,
    spec_from_version,
    validate,
)
from dspex.agents.runtime.tools import ToolRegistry, default_tools
from dspex.schemas import records
from dspex.schemas.records import Record
from dspex.streams.errors import InvalidRequest
from dspex.streams.settings import POOLS, LMSettings, Settings

logger = logging.getLogger(__name__)

_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


class ProgramResolver(Protocol):
    """Resolves and validates a request's program: the seam to ``runtime.programs``."""

    def resolve(self, request: Mapping[str, Any], registered: Mapping[str, Any] | None) -> Record:
        """The validated program fields a pool record embeds; :class:`InvalidRequest` if not."""
        ...


class ProgramsResolver:
    """:class:`ProgramResolver` over ``runtime.programs``, the tools and deployed modules.

    The router knows the operator's allowlisted tools and modules by name only
    (``settings.tools`` / ``settings.modules``): it imports none of them.
    """

    def __init__(
        self,
        tools: ToolRegistry | None = None,
        *,
        deployed_tools: Collection[str] = (),
        deployed_modules: Collection[str] = (),
    ) -> None:
        registry = tools if tools is not None else default_tools()
        self._tools = registry.names() | frozenset(deployed_tools)
        self._modules = frozenset(deployed_modules)

    @classmethod
    def for_settings(cls, settings: Settings) -> ProgramsResolver:
        """The resolver for the tools and modules ``settings`` allowlists."""
        return cls(deployed_tools=settings.tools, deployed_modules=settings.modules)

    def resolve(self, request: Mapping[str, Any], registered: Mapping[str, Any] | None) -> Record:
        """Build the spec the request asks for, validate it with the inputs, embed it."""
        base = spec_from_version(registered) if registered is not None else None
        spec = spec_from_request(request, base)
        validate(spec, request.get("inputs") or {}, tools=self._tools, modules=self._modules)
        return program_fields(spec, request.get("program_id"))


def program_fields(spec: ProgramSpec, program_id: str | None) -> Record:
    """The Request fields that make a pool record self-contained (no program lookup)."""
    return {
        "program_id": spec.program_id or program_id,
        "program_version": spec.version,
        "signature": spec.signature,
        "module_type": spec.module_type,
        "module_config_json": spec.module_config_json,
        "state_json": spec.state_json,
        "tools": list(spec.tools),
        "adapter": spec.adapter,
    }


@dataclass(frozen=True, slots=True)
class Route:
    """One routing decision; :meth:`record` renders the Avro ``Route``."""

    pool: str
    variant: str
    reason: str
    model: str | None = None
    module_type: str | None = None
    table_version: int | None = None
    variables: Mapping[str, str] = field(default_factory=dict)
    program_version: int | None = None
    """The registered version the variant runs (a canary); None: the request's or latest."""

    def record(self, decided_at_ms: int, cache_key: str | None) -> Record:
        """The ``route`` field of a forwarded Request."""
        return records.route(
            pool=self.pool,
            variant=self.variant,
            model=self.model,
            module_type=self.module_type,
            routing_table_version=self.table_version,
            decided_at=decided_at_ms,
            cache_key=cache_key,
            reason=self.reason,
        )


def check_request(
    request: Mapping[str, Any],
    now_ms: int,
    topics: Sequence[str],
    existing: Container[str] | None = None,
) -> None:
    """Checks that need no program: id, deadline sanity, pool hint, reply topic.

    ``existing`` (when given) is the cluster's topics: a reply topic must be one of them.
    """
    if not request.get("request_id"):
        raise InvalidRequest("request_id", "must be a non-empty string")
    check_deadline(request.get("deadline_at"), now_ms)
    if deadline_passed(request, now_ms):
        raise expired(request, now_ms, "the router")
    hint = request.get("pool_hint")
    if hint is not None and hint not in POOLS:
        raise InvalidRequest("pool_hint", f"unknown pool {hint!r}; known: {', '.join(POOLS)}")
    _check_reply_topic(request.get("reply_topic"), topics, existing)


def reply_topic(
    request: Mapping[str, Any], topics: Sequence[str], existing: Container[str] | None = None
) -> str | None:
    """The request's own reply topic when it is an acceptable one, else ``None``."""
    try:
        _check_reply_topic(request.get("reply_topic"), topics, existing)
    except InvalidRequest:
        return None
    topic: str | None = request.get("reply_topic")
    return topic


def _check_reply_topic(
    reply_topic: str | None, topics: Sequence[str], existing: Container[str] | None
) -> None:
    if reply_topic is None:
        return
    if not _TOPIC_NAME.match(reply_topic):
        raise InvalidRequest("reply_topic", f"{reply_topic!r} is not a valid Kafka topic name")
    if reply_topic in topics:
        # Responses must never land on a request, pool or system-of-record topic.
        raise InvalidRequest("reply_topic", f"{reply_topic} is a DSPex topic, not a reply topic")
    if existing is not None and reply_topic not in existing:
        # Producing to it would block on metadata (and stall everyone's requests).
        raise InvalidRequest("reply_topic", f"topic {reply_topic} does not exist: create it first")


class KnownTopics:
    """The cluster's topic names, cached; a miss refreshes them at most once per interval."""

    def __init__(
        self,
        list_topics: Callable[[], Iterable[str]],
        *,
        min_refresh_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._list = list_topics
        self._min_refresh_s = min_refresh_s
        self._clock = clock
        self._names: frozenset[str] = frozenset()
        self._refreshed_at = -math.inf

    def __contains__(self, topic: object) -> bool:
        if topic in self._names:
            return True
        if self._clock() - self._refreshed_at >= self._min_refresh_s:
            self._refreshed_at = self._clock()
            try:
                self._names = frozenset(self._list())
            except Exception:  # metadata unavailable: keep the last known names
                logger.warning("cannot refresh the topic list", exc_info=True)
        return topic in self._names


class RouteChooser:
    """Chooses pool and variant for a request; warns once per unusable routing table."""

    def __init__(self, lm: LMSettings, default_pool: str, rng: random.Random | None = None) -> None:
        self._lm = lm
        self._default_pool = default_pool
        self._rng = rng or random.Random()  # noqa: S311 - traffic splitting, not security
        self._warned: set[tuple[str, int]] = set()

    def choose(self, request: Mapping[str, Any], table: Mapping[str, Any] | None) -> Route:
        """The route for ``request`` given its program's current table (or none)."""
        hint = request.get("pool_hint")
        if table is not None:
            candidates = self._usable(table, hint)
            if candidates:
                return self._sampled(candidates, table, hint)
        if hint is not None:
            return self._static(hint, "hint")
        if table is not None:
            return self._static(self._default_pool, "fallback")
        return self._static(self._default_pool, "static")

    def _static(self, pool: str, reason: str) -> Route:
        variant = self._lm.variant_for_pool(pool)
        return Route(pool, variant, reason, model=self.backend_model(variant))

    def _sampled(
        self, candidates: list[tuple[Record, float]], table: Mapping[str, Any], hint: str | None
    ) -> Route:
        top = max(weight for _, weight in candidates)
        # Scaled to at most 1 each: huge finite weights cannot overflow the total.
        weights = [weight / top for _, weight in candidates]
        variant = self._rng.choices([v for v, _ in candidates], weights=weights)[0]
        return Route(
            pool=hint or variant["pool"],
            variant=variant["name"],
            reason="hint" if hint else "table",
            model=variant.get("model") or self.backend_model(variant["name"]),
            module_type=variant.get("module_type"),
            table_version=table.get("version"),
            variables=dict(variant.get("variables") or {}),
            program_version=variant.get("program_version"),
        )

    def _usable(self, table: Mapping[str, Any], hint: str | None) -> list[tuple[Record, float]]:
        usable, bad = [], []
        for variant in table.get("variants") or []:
            weight = variant.get("weight")
            if not _valid_weight(weight) or variant.get("pool") not in POOLS:
                bad.append(str(variant.get("name")))
            elif weight > 0 and (hint is None or variant["pool"] == hint):
                usable.append((variant, float(weight)))
        if bad or (not usable and hint is None):
            self._warn(table, bad)
        return usable

    def _warn(self, table: Mapping[str, Any], bad: list[str]) -> None:
        ident = (str(table.get("program_id")), int(table.get("version") or 0))
        if ident in self._warned:
            return
        self._warned.add(ident)
        logger.warning(
            "routing table unusable in part program_id=%s version=%s bad_variants=%s "
            "(invalid weight or unknown pool; no positive weight means static routing)",
            ident[0],
            ident[1],
            ",".join(bad) or "-",
        )

    def backend_model(self, variant: str) -> str | None:
        """The LiteLLM model string of a configured backend variant, if it is one."""
        backend = self._lm.backends.get(variant)
        return backend.model if backend is not None else None


def _valid_weight(weight: Any) -> bool:
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        return False
    return math.isfinite(weight) and weight >= 0
