"""The router's decisions, free of Kafka: request checks, program resolution, pool and variant.

Everything here is a pure function of a decoded ``Request`` record, the
materialized catalogs and the settings, so it is unit-tested without a broker.
:mod:`agents.router` wires it to faust.

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
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from agents.programs import ProgramSpec, spec_from_request, spec_from_version, validate
from agents.tools import ToolRegistry, default_tools
from streams.errors import InvalidRequest
from streams.settings import POOLS, LMSettings

logger = logging.getLogger(__name__)

Record = dict[str, Any]
# A deadline further out than the requests topic's retention cannot be meant.
MAX_DEADLINE_AHEAD_MS = 7 * 24 * 60 * 60 * 1000
_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


class DeadlineExceeded(InvalidRequest):
    """The request's deadline passed before it could be routed: answered with "timeout"."""


class Overloaded(DeadlineExceeded):
    """The deadline passed while the request waited in Kafka: answered with "overloaded"."""


def expired(request: Mapping[str, Any], now_ms: int, where: str) -> DeadlineExceeded:
    """Why a request whose deadline passed before it started is not run.

    Waiting in Kafka past a deadline that was still ahead when the request was
    created means DSPex is behind: ``overloaded``. A deadline already past at
    creation is the client's: ``timeout``.
    """
    deadline = to_ms(request.get("deadline_at")) or 0
    created = to_ms(request.get("created_at"))
    if created is not None and created < deadline:
        waited = max(now_ms - created, 0)
        return Overloaded(
            "deadline_at",
            f"waited {waited} ms for {where}; the deadline passed before it could start "
            "(DSPex is overloaded: requests wait in Kafka)",
        )
    return DeadlineExceeded("deadline_at", f"the deadline had passed before {where}")


class ProgramResolver(Protocol):
    """Resolves and validates a request's program: the seam to :mod:`agents.programs`."""

    def resolve(self, request: Mapping[str, Any], registered: Mapping[str, Any] | None) -> Record:
        """The validated program fields a pool record embeds; :class:`InvalidRequest` if not."""
        ...


class ProgramsResolver:
    """:class:`ProgramResolver` over :mod:`agents.programs` and the registered tools."""

    def __init__(self, tools: ToolRegistry | None = None) -> None:
        self._tools = tools if tools is not None else default_tools()

    def resolve(self, request: Mapping[str, Any], registered: Mapping[str, Any] | None) -> Record:
        """Build the spec the request asks for, validate it with the inputs, embed it."""
        base = spec_from_version(registered) if registered is not None else None
        spec = spec_from_request(request, base)
        validate(spec, request.get("inputs") or {}, tools=self._tools)
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
        return {
            "pool": self.pool,
            "variant": self.variant,
            "model": self.model,
            "module_type": self.module_type,
            "routing_table_version": self.table_version,
            "decided_at": decided_at_ms,
            "cache_key": cache_key,
            "reason": self.reason,
        }


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
    _check_deadline(request.get("deadline_at"), now_ms)
    if deadline_passed(request, now_ms):
        raise expired(request, now_ms, "the router")
    hint = request.get("pool_hint")
    if hint is not None and hint not in POOLS:
        raise InvalidRequest("pool_hint", f"unknown pool {hint!r}; known: {', '.join(POOLS)}")
    _check_reply_topic(request.get("reply_topic"), topics, existing)


def deadline_passed(request: Mapping[str, Any], now_ms: int) -> bool:
    """True when the request carries a deadline that is already over."""
    deadline = to_ms(request.get("deadline_at"))
    return deadline is not None and deadline <= now_ms


def _check_deadline(value: Any, now_ms: int) -> None:
    deadline = to_ms(value)
    if deadline is None:
        return
    if deadline <= 0:
        raise InvalidRequest("deadline_at", f"{deadline} is not a UTC epoch-millisecond time")
    if deadline > now_ms + MAX_DEADLINE_AHEAD_MS:
        raise InvalidRequest("deadline_at", "is more than 7 days ahead")


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


def to_ms(value: Any) -> int | None:
    """Epoch milliseconds from fastavro's timestamp (an aware ``datetime``) or an int."""
    if value is None:
        return None
    if isinstance(value, int):
        return value
    millis: int = round(float(value.timestamp()) * 1000)
    return millis


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
