"""Tenants at the router: who sent a request, where its answer goes, and whether it may run.

The tenant is learned from the topic a request arrived on
(``<prefix>tenant.<name>.requests``, :mod:`dspex.streams.tenants`), never from the
record. :func:`admit` makes the record say so before anything else reads it:

- ``reply_topic`` is forced to the tenant's own response topic, whatever the sender
  named (another tenant's topic, the shared ``responses``, anything);
- ``session_id`` is scoped (``tenant.<name>/<id>``): tenants never share a session;
  a shared-topic request may not name a scoped session id;
- ``metadata["dspex.tenant"]`` is set to the tenant, overwriting what the sender put
  there; on the shared ``requests`` topic the key is removed. The worker stamps
  Execution and Telemetry from that key
  (:func:`dspex.agents.plumbing.records.tenant_of_request`). A metadata key
  rather than a Kafka header: it lives inside the Avro record, so it survives every
  path a routed request takes (pool, ``retry`` topic, pipeline agent) without each
  producer having to copy headers, and only DSPex services may write the topics
  past the router (pool, retry: docs/security.md).

:class:`Quotas` holds the per-tenant DSPex limits (``settings.tenants``): a token
bucket per tenant for requests per second (per router instance), and daily tokens
from :class:`DailyUsage`, a view of the ``telemetry`` topic since 00:00 UTC
that every router rebuilds at start (so the daily counts survive a restart and agree
between router instances). No Kafka here: unit-tested as is.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from dspex.agents.plumbing.records import TENANT_KEY
from dspex.schemas.records import Record
from dspex.schemas.times import to_ms
from dspex.streams.errors import InvalidRequest, QuotaExceeded
from dspex.streams.settings import TenantLimits, TenantsSettings
from dspex.streams.tenants import (
    is_scoped_session,
    request_topic,
    response_topic,
    session_scope,
    tenant_of,
)

logger = logging.getLogger(__name__)

DAY_MS = 86_400_000
TOKEN_FIELDS = ("prompt_tokens", "completion_tokens")
QUIET_S = 10.0  # one log line per tenant and limit per this many seconds


def tenant_of_topic(topic: str, prefix: str) -> str | None:
    """The tenant whose request topic ``topic`` is; None for any other topic."""
    tenant = tenant_of(topic, prefix)
    if tenant is None or topic != request_topic(tenant, prefix):
        return None
    return tenant


def admit(request: Record, topic: str, prefix: str) -> tuple[str | None, Record]:
    """(tenant, the request as the router trusts it) for a request consumed from ``topic``.

    A tenant's request has its reply topic forced to the tenant's response topic and
    ``metadata["dspex.tenant"]`` overwritten; a shared-topic request loses that key and
    may not name a tenant's topic as its reply topic (:class:`InvalidRequest`).
    """
    tenant = tenant_of_topic(topic, prefix)
    metadata = {k: v for k, v in (request.get("metadata") or {}).items() if k != TENANT_KEY}
    session_id = request.get("session_id")
    if tenant is None:
        if session_id and is_scoped_session(session_id):
            raise InvalidRequest(
                "session_id",
                f"{session_id!r} is a tenant's session: only that tenant's requests join it",
            )
        reply = request.get("reply_topic")
        owner = tenant_of(reply, prefix) if reply else None
        if owner is not None:
            raise InvalidRequest(
                "reply_topic",
                f"{reply} belongs to tenant {owner}: only that tenant's own requests are "
                "answered there",
            )
        return None, {**request, "metadata": metadata}
    metadata[TENANT_KEY] = tenant
    return tenant, {
        **request,
        "metadata": metadata,
        "reply_topic": response_topic(tenant, prefix),
        "session_id": session_scope(tenant, session_id) if session_id else session_id,
    }


def refusable(request: Record, prefix: str) -> Record:
    """A shared-topic request :func:`admit` refused, made safe to answer: never on a
    tenant's topic (its error goes to the shared ``responses`` instead)."""
    reply = request.get("reply_topic")
    if reply and tenant_of(reply, prefix) is not None:
        return {**request, "reply_topic": None}
    return request


@dataclass
class TokenBucket:
    """``rate`` tokens per second, holding at most ``capacity``; starts full."""

    rate: float
    capacity: float
    tokens: float
    at_s: float

    def take(self, now_s: float) -> bool:
        """Take one token if there is one."""
        self.tokens = min(self.capacity, self.tokens + max(0.0, now_s - self.at_s) * self.rate)
        self.at_s = now_s
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class DailyUsage:
    """Tokens per tenant and UTC day, from execution Telemetry (a reader view).

    Counts ``kind="execution"`` records that carry a tenant: one per attempt a worker
    made, so a retried request counts each attempt's tokens (what the LM was paid for).
    Only today and yesterday are kept.
    """

    def __init__(self) -> None:
        self._used: dict[tuple[str, int], int] = {}
        self._latest_day = 0

    def apply(self, _key: str, record: Record | None) -> None:
        """The CompactedReader view function for the ``telemetry`` topic."""
        if record is None or record.get("kind") != "execution" or not record.get("tenant"):
            return
        at_ms = to_ms(record.get("emitted_at"))
        if at_ms is None:
            return
        day = at_ms // DAY_MS
        tokens = sum(max(0, int(record.get(f) or 0)) for f in TOKEN_FIELDS)
        key = (str(record["tenant"]), day)
        self._used[key] = self._used.get(key, 0) + tokens
        if day > self._latest_day:
            self._latest_day = day
            self._used = {k: v for k, v in self._used.items() if k[1] >= day - 1}

    def today(self, tenant: str, now_ms: int) -> int:
        """Tokens ``tenant`` used since 00:00 UTC of ``now_ms``."""
        return self._used.get((tenant, now_ms // DAY_MS), 0)


def start_of_day_ms(now_ms: int) -> int:
    """00:00 UTC of the day ``now_ms`` falls in."""
    return now_ms - now_ms % DAY_MS


class Quotas:
    """Per-tenant DSPex limits; :meth:`check` raises :class:`QuotaExceeded` over one."""

    def __init__(
        self,
        settings: TenantsSettings,
        usage: DailyUsage | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self.usage = usage or DailyUsage()
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._logged: dict[tuple[str, str], float] = {}
        self.refused: dict[tuple[str, str], int] = {}
        """Requests refused so far, by (tenant, limit)."""

    def check(self, tenant: str, now_ms: int) -> None:
        """Admit one request of ``tenant`` (taking a token), or raise :class:`QuotaExceeded`."""
        limits = self._settings.limits_for(tenant)
        try:
            self._check_day(tenant, limits, now_ms)
            self._check_rate(tenant, limits)
        except QuotaExceeded as exc:
            self._note(exc)
            raise

    def _check_day(self, tenant: str, limits: TenantLimits, now_ms: int) -> None:
        if not limits.per_day:
            return
        tokens = self.usage.today(tenant, now_ms)
        allowed = limits.tokens_per_day
        if allowed is not None and tokens >= allowed:
            raise QuotaExceeded(
                tenant,
                "tokens_per_day",
                f"{tokens} tokens used today (UTC), limit {allowed}; retry after 00:00 UTC",
            )

    def _check_rate(self, tenant: str, limits: TenantLimits) -> None:
        rate = limits.requests_per_s
        if rate is None:
            return
        capacity = float(limits.burst or max(1, math.ceil(rate)))
        now_s = self._clock()
        bucket = self._buckets.get(tenant)
        if bucket is None or bucket.rate != rate or bucket.capacity != capacity:
            bucket = self._buckets[tenant] = TokenBucket(rate, capacity, capacity, now_s)
        if not bucket.take(now_s):
            raise QuotaExceeded(
                tenant,
                "requests_per_s",
                f"more than {rate:g} requests/s (burst {capacity:g}) at this router; retry later",
            )

    def _note(self, exc: QuotaExceeded) -> None:
        key = (exc.tenant, exc.limit)
        self.refused[key] = self.refused.get(key, 0) + 1
        now_s = self._clock()
        if now_s - self._logged.get(key, -math.inf) >= QUIET_S:
            self._logged[key] = now_s
            logger.warning(
                "quota exceeded tenant=%s limit=%s refused_so_far=%d: %s",
                exc.tenant,
                exc.limit,
                self.refused[key],
                exc,
            )
