"""The router agent: validates every request, answers from the cache or forwards it to a pool.

:class:`RouterHandler` is the whole decision for one record: bytes in, records
out (unit-tested without a broker). :class:`RouterApp` runs it on the request
path's shared :class:`~dspex.agents.plumbing.loop.ConsumerLoop` (librdkafka, no
faust): one consumer-group member reading ``requests`` and ``retry`` (the
retrier: each transiently failed request goes back to its pool once its backoff is
over, :mod:`dspex.agents.plumbing.retry`), plus a :class:`CompactedReader` that
materializes the ``programs``, ``routing``, ``variables`` and ``cache`` topics for
every instance (shared variables: :mod:`dspex.agents.router.variables`; the result
cache, which workers fill: :mod:`dspex.agents.router.cache`), and ``pipelines``: a
request naming a ``pipeline_id`` is checked against its pipeline (version, declared
inputs) and handed to the pipeline agent on ``pipeline.runs``, pinned to that version.
The router never reads ``responses``. Its records go out through librdkafka
(:class:`~dspex.agents.plumbing.publisher.Publisher`, as in the worker); a request
is done, and so committable, once the broker has all of them. Records are produced
in the order their requests were consumed, so one session's requests keep their
order into the pool topics.

Nothing invalid reaches a pool: an undecodable record becomes a DeadLetter
(stage ``decode``); a rejected request becomes a DeadLetter *and* one final
error Response (stage ``validate``, or ``route`` with status ``timeout`` for a
passed deadline); a refused variable update becomes a DeadLetter (stage
``variables``) and the last good value stays; a retry record with a missing or
bad retry header, or an unknown pool, becomes a DeadLetter (stage ``retry``). Start it with
``make_router(settings).run()``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Container
from typing import Any

from dspex.agents.plumbing.answers import AnswerFinder, answered_before
from dspex.agents.plumbing.catalog import (
    Apply,
    CompactedReader,
    PipelineCatalog,
    ProgramCatalog,
    RoutingCatalog,
)
from dspex.agents.plumbing.deadlines import DeadlineExceeded, status_of
from dspex.agents.plumbing.loop import HandleBatch, LoopApp, LoopConfig
from dspex.agents.plumbing.messages import Consumed, ErrorInfo, Outgoing
from dspex.agents.plumbing.records import dead_letter, error_response, tenant_of_request
from dspex.agents.plumbing.retry import RETRY_POOL, retry_due
from dspex.agents.router.cache import (
    ResultCache,
    cache_key,
    cached_responses,
    decode_outputs,
    is_cacheable,
)
from dspex.agents.router.pipelines import CheckedPipelines
from dspex.agents.router.retrier import Retrier
from dspex.agents.router.routing import (
    KnownTopics,
    ProgramResolver,
    ProgramsResolver,
    Route,
    RouteChooser,
    check_request,
    reply_topic,
)
from dspex.agents.router.tenancy import (
    DailyUsage,
    Quotas,
    admit,
    refusable,
    start_of_day_ms,
)
from dspex.agents.router.variables import RefusedUpdates, SharedVariables
from dspex.schemas import records
from dspex.schemas.records import Record
from dspex.streams import kafka, tracing
from dspex.streams.errors import (
    ConfigError,
    CorruptRecord,
    InvalidRequest,
    PermanentError,
    QuotaExceeded,
    SerdeError,
)
from dspex.streams.ops.admin import require_topics
from dspex.streams.serde import Serde, make_serde
from dspex.streams.settings import Settings
from dspex.streams.tenants import request_topic_pattern, response_topic
from dspex.streams.topics import AGENT_REPLY_TOPICS, RETRY_TIERS, Topics

logger = logging.getLogger(__name__)

COMPONENT = "router"
READY_TIMEOUT_S = 60.0
FLUSH_TIMEOUT_S = 10.0
SEND_ATTEMPTS = 5
IN_FLIGHT = 2000  # requests routed but not yet acknowledged, and retries waiting
DRAIN_TIMEOUT_S = 70.0  # a graceful stop forwards waiting retries (backoff <= 60 s)


class RouterHandler:
    """Turns one ``requests`` record into the records to produce; never raises."""

    def __init__(
        self,
        settings: Settings,
        serde: Serde,
        *,
        programs: ProgramCatalog,
        routing: RoutingCatalog,
        resolver: ProgramResolver,
        cache: ResultCache,
        chooser: RouteChooser | None = None,
        clock: Callable[[], float] = time.time,
        existing_topics: Container[str] | None = None,
        variables: SharedVariables | None = None,
        pipelines: PipelineCatalog | None = None,
        quotas: Quotas | None = None,
    ) -> None:
        self._settings = settings
        self._prefix = settings.topics.prefix
        self.quotas = quotas or Quotas(settings.tenants)
        self._pipelines = pipelines if pipelines is not None else PipelineCatalog()
        self._variables = variables or SharedVariables(settings.lm)
        self._existing = existing_topics
        self._serde = serde
        self._topics = Topics(settings.topics)
        # a request may name the pipeline agent's reply topic (its stage requests do)
        self._own_topics = [
            n for n, spec in self._topics.all() if spec.name not in AGENT_REPLY_TOPICS
        ]
        self._programs = programs
        self._checked = CheckedPipelines(programs)
        self._routing = routing
        self._resolver = resolver
        self._cache = cache
        self._chooser = chooser or RouteChooser(settings.lm, settings.router.default_pool)
        self._clock = clock
        self._max_retry_wait_s = max(settings.reliability.retry_topic_backoff_s)

    def now_ms(self) -> int:
        """The handler's clock in UTC epoch milliseconds."""
        return int(self._clock() * 1000)

    def handle_request(self, original: Consumed) -> list[Outgoing]:
        """Decode, admit (tenant, limits), check, resolve, validate, then answer or forward."""
        now = self.now_ms()
        try:
            decoded = self._decode(original, "Request")
        except SerdeError as exc:
            logger.warning("undecodable request %s error=%s", original.where(), exc)
            return [self._dead_letter(original, ErrorInfo.from_exception(exc, "decode"), None, now)]
        try:
            tenant, request = admit(decoded, original.topic, self._prefix)
        except InvalidRequest as exc:  # a shared request reaching for a tenant's topic or session
            request = refusable(decoded, self._prefix)
            return self._reject(original, request, ErrorInfo.from_exception(exc, "validate"), now)
        try:
            if tenant is not None:
                self.quotas.check(tenant, now)
            return self._route(original, request, now)
        except QuotaExceeded as exc:
            return [self._over_quota(request, exc, now)]
        except DeadlineExceeded as exc:
            status = status_of(exc)
            return self._reject(
                original, request, ErrorInfo.from_exception(exc, "route", status=status), now
            )
        except PermanentError as exc:
            return self._reject(original, request, ErrorInfo.from_exception(exc, "validate"), now)
        except Exception as exc:  # a bug must not stop the stream: reject and keep going
            logger.exception(
                "routing failed %s request_id=%s", original.where(), request.get("request_id")
            )
            return self._reject(original, request, ErrorInfo.from_exception(exc, "route"), now)

    def handle_retry(self, original: Consumed) -> tuple[float, list[Outgoing]]:
        """A ``retry`` record: (seconds to wait, its pool record), else (0, its DeadLetter).

        The record's bytes and headers go back to ``pool.<dspex-retry-pool>``
        unchanged, once ``dspex-not-before`` has passed.
        """
        now = self.now_ms()
        try:
            due = retry_due(original.headers, now, self._max_retry_wait_s)
            topic = self._pool_topic(due.pool)
            if original.value is None:
                raise InvalidRequest("value", "tombstone (null value) where a request was expected")
        except InvalidRequest as exc:
            logger.warning("bad retry record %s error=%s", original.where(), exc)
            request_id = (original.key or b"").decode("utf-8", "replace") or None
            failure = ErrorInfo.from_exception(exc, "retry")
            return 0.0, [self._dead_letter(original, failure, request_id, now)]
        logger.info(
            "retry scheduled %s attempt=%d to=%s in_s=%.3f",
            original.where(),
            due.attempt,
            topic,
            due.delay_s,
        )
        return due.delay_s, [Outgoing(topic, original.key, original.value, original.headers)]

    def _pool_topic(self, pool: str) -> str:
        try:
            return self._topics.name(f"pool.{pool}")
        except KeyError:
            raise InvalidRequest(f"headers.{RETRY_POOL}", f"unknown pool {pool!r}") from None

    def _decode(self, original: Consumed, schema: str) -> Record:
        if original.value is None:
            raise CorruptRecord(
                "tombstone (null value) where a record was expected", topic=original.topic
            )
        return self._serde.decode(original.value, topic=original.topic, expect=schema).record

    def _route(self, original: Consumed, request: Record, now: int) -> list[Outgoing]:
        self._check_size(len(original.value or b""), "request")
        check_request(request, now, self._own_topics, self._existing)
        if request.get("pipeline_id") is not None:
            return [self._run_pipeline(original, request)]
        program_id = request.get("program_id")
        chosen = self._chooser.choose(request, self._routing.table_for(program_id))
        registered = None
        if program_id is not None:
            registered = self._registered(program_id, request.get("program_version"), chosen)
        steering = self._variables.steer(request, chosen, registered)
        route = steering.route
        tracing.annotate({"dspex.pool": route.pool, "dspex.variant": route.variant})
        program = self._resolver.resolve(steering.request, registered)
        variables = self._variables.effective(steering, program.get("module_type"))
        key = None
        if self._settings.router.cache_enabled and is_cacheable(
            request, program, route, self._settings.lm, variables
        ):
            inputs = request.get("inputs") or {}
            key = cache_key(program, inputs, variables, route, tenant_of_request(request))
            hits = self._cached(request, program, key, now)
            if hits:
                tracing.annotate({"dspex.cache_hit": True})
                return hits
        # the decoded request has every Request field; the program and route complete it
        forwarded = records.request(
            **{
                **request,
                **program,
                "variables": variables,
                "route": route.record(now, key),
                "metadata": with_program_metric(request, registered),
            }
        )
        return [self._forward(original, forwarded, route.pool)]

    def _run_pipeline(self, original: Consumed, request: Record) -> Outgoing:
        """A pipeline run, checked against its pipeline and pinned to a version, to the agent."""
        for field in ("program_id", "signature"):
            if request.get(field) is not None:
                raise InvalidRequest(field, "a request names a pipeline_id or a program, not both")
        version = self._pipelines.resolve(request["pipeline_id"], request.get("pipeline_version"))
        plan = self._checked.plan(version)  # validated once per version and programs catalog
        plan.check_run_inputs(request.get("inputs") or {})
        topic = self._topics.name("pipeline.runs")
        pinned = records.request(**{**request, "pipeline_version": plan.version})
        value = self._serde.encode("Request", pinned, topic=topic)
        return Outgoing(topic, original.key, value, original.headers)

    def _registered(self, program_id: str, version: int | None, route: Route) -> Record:
        """The program version to run: the request's, else the route's canary, else latest.

        A canary version this router does not know (yet) falls back to the latest.
        """
        if version is None and route.program_version is not None:
            try:
                return self._programs.resolve(program_id, route.program_version)
            except InvalidRequest:
                logger.warning(
                    "routing table names unknown program_id=%s version=%s; using the latest",
                    program_id,
                    route.program_version,
                )
        return self._programs.resolve(program_id, version)

    def _forward(self, original: Consumed, forwarded: Record, pool: str) -> Outgoing:
        topic = self._topics.name(f"pool.{pool}")
        value = self._serde.encode("Request", forwarded, topic=topic)
        self._check_size(len(value), "state_json")
        return Outgoing(topic, original.key, value, original.headers)

    def _cached(self, request: Record, program: Record, key: str, now: int) -> list[Outgoing]:
        stored = self._cache.get(key)
        outputs = decode_outputs(stored) if stored is not None else None
        if outputs is None:
            return []
        chunks = cached_responses(request, outputs, program, now)
        return [self._response(request, chunk) for chunk in chunks]

    def _check_size(self, size: int, field: str) -> None:
        limit = self._settings.router.max_request_bytes
        if size > limit:
            raise InvalidRequest(
                field, f"record is {size} bytes, over router.max_request_bytes={limit}"
            )

    def _reject(
        self, original: Consumed, request: Record, failure: ErrorInfo, now: int
    ) -> list[Outgoing]:
        request_id = str(request.get("request_id") or "")
        tracing.outcome(failure.status, failure)
        logger.info(
            "rejected request %s request_id=%s stage=%s field=%s error=%s",
            original.where(),
            request_id,
            failure.stage,
            failure.field,
            failure.message,
        )
        program = {
            "program_id": request.get("program_id"),
            "program_version": request.get("program_version"),
        }
        response = error_response(request_id, failure, produced_at_ms=now, program=program)
        return [
            self._response(request, response),
            self._dead_letter(original, failure, request_id or None, now),
        ]

    def _over_quota(self, request: Record, exc: QuotaExceeded, now: int) -> Outgoing:
        """The final ``quota_exceeded`` answer (no DeadLetter: the request itself is fine)."""
        failure = ErrorInfo(
            type(exc).__name__,
            str(exc),
            None,
            "route",
            retryable=True,
            status="quota_exceeded",
        )
        tracing.outcome(failure.status, failure)
        program = {
            "program_id": request.get("program_id"),
            "program_version": request.get("program_version"),
        }
        request_id = str(request.get("request_id") or "")
        response = error_response(request_id, failure, produced_at_ms=now, program=program)
        return self._response(request, response)

    def _response(self, request: Record, response: Record) -> Outgoing:
        tenant = tenant_of_request(request)  # set by admit() only: a tenant's answers go to
        if tenant is not None:  # its own topic, whatever else happened
            topic = response_topic(tenant, self._prefix)
        else:
            topic = reply_topic(request, self._own_topics, self._existing) or self._topics.name(
                "responses"
            )
        value = self._serde.encode("Response", response, topic=topic)
        status = response["status"] if response["final"] else None
        return Outgoing(topic, response["request_id"].encode("utf-8"), value, (), status)

    def _dead_letter(
        self, original: Consumed, failure: ErrorInfo, request_id: str | None, now: int
    ) -> Outgoing:
        topic = self._topics.name("dlq")
        record = dead_letter(
            original, failure, component=COMPONENT, failed_at_ms=now, request_id=request_id
        )
        return Outgoing(topic, original.key, self._serde.encode("DeadLetter", record, topic=topic))


def _failed(future: asyncio.Future[Any]) -> bool:
    return future.cancelled() or future.exception() is not None


def with_program_metric(request: Record, registered: Record | None) -> dict[str, str]:
    """The request's metadata, plus the registered program's metric for worker scoring.

    A worker scores an answer whose request carries ``dspex.gold``; the metric is
    the request's ``dspex.metric``, else the program's own (``ProgramVersion.metric``).
    """
    metadata = dict(request.get("metadata") or {})
    metric = (registered or {}).get("metric")
    if metric and "dspex.gold" in metadata:
        metadata.setdefault("dspex.metric", str(metric))
    return metadata


class RouterApp(LoopApp):
    """The router process: the handler on the shared consumer loop, plus the compacted views."""

    flush_timeout_s = FLUSH_TIMEOUT_S

    def __init__(
        self,
        settings: Settings,
        *,
        app_id: str,
        resolver: ProgramResolver,
        chooser: RouteChooser | None = None,
        instance_id: str | None = None,
    ) -> None:
        self.settings = settings
        topics = Topics(settings.topics)
        serde = make_serde(settings)
        self._topics = topics
        self.programs = ProgramCatalog()
        self.pipelines = PipelineCatalog()
        self.routing = RoutingCatalog()
        self.variables = SharedVariables(settings.lm)
        self.cache = ResultCache(settings.router.cache_max_entries)
        self.usage = DailyUsage()
        self._answers: AnswerFinder | None = AnswerFinder(settings, serde)
        self._refused = RefusedUpdates(
            settings, serde, component=COMPONENT, held=self.variables.store.get
        )
        views: dict[str, tuple[str, Apply]] = {
            topics.name("programs"): ("ProgramVersion", self.programs.apply),
            topics.name("pipelines"): ("PipelineVersion", self.pipelines.apply),
            topics.name("routing"): ("RoutingTable", self.routing.apply),
            topics.name("variables"): ("VariableUpdate", self.variables.apply),
            topics.name("cache"): ("Response", self.cache.apply),
        }
        since: dict[str, int] = {}
        if settings.tenants.per_day:
            # today's tokens and cost per tenant, rebuilt from telemetry since 00:00 UTC
            # before the first request is routed, then followed (docs/tenants.md)
            views[topics.name("telemetry")] = ("Telemetry", self.usage.apply)
            since[topics.name("telemetry")] = start_of_day_ms(int(time.time() * 1000))
        self.reader = CompactedReader(
            settings,
            serde,
            views,
            on_refused=self._refused,
            # the cache is best effort while it loads: at most what the LRU holds is
            # replayed, and the router starts routing without waiting for it
            recent={topics.name("cache"): settings.router.cache_max_entries},
            since=since,
        )
        self.handler = RouterHandler(
            settings,
            serde,
            programs=self.programs,
            routing=self.routing,
            resolver=resolver,
            cache=self.cache,
            chooser=chooser,
            existing_topics=KnownTopics(self._list_topics),
            variables=self.variables,
            pipelines=self.pipelines,
            quotas=Quotas(settings.tenants, self.usage),
        )
        self._retry_topic = topics.name("retry")
        self._own_topics = frozenset(name for name, _ in topics.all())
        config = LoopConfig(
            # every tenant's requests topic too, one created later included (a regex
            # subscription, re-matched at each metadata refresh)
            topics=(
                topics.name("requests"),
                self._retry_topic,
                request_topic_pattern(settings.topics.prefix),
            ),
            metadata_refresh_s=settings.tenants.refresh_s,
            group_id=app_id,
            client_id=app_id,
            limit=IN_FLIGHT,
            instance_id=f"{app_id}-{instance_id}" if instance_id else None,
            drain_timeout_s=DRAIN_TIMEOUT_S,
        )
        super().__init__(settings, serde, config)
        # the durable retry waits: a consumer of the delay tiers in a thread of its own
        self._retrier_stop = threading.Event()
        self._retrier_thread = threading.Thread(
            target=Retrier(
                settings,
                self.handler.handle_retry,
                topics=[topics.name(f"retry.{label}") for label in RETRY_TIERS],
                group_id=f"{app_id}-retrier",
                client_id=f"{app_id}-retrier",
                instance_id=f"{app_id}-{instance_id}-retrier" if instance_id else None,
            ).run,
            args=(self._retrier_stop,),
            name="dspex-retrier",
            daemon=True,
        )

    def _list_topics(self) -> list[str]:
        # a short-lived admin handle: one kept across a broker restart can abort the
        # process inside librdkafka (docs/reliability.md)
        return list(kafka.admin_client(self.settings).list_topics(timeout=5).topics)

    async def handle(self, consumed: Consumed) -> None:
        """Route one ``requests`` record, or forward one ``retry`` record once it is due.

        Returns once the broker has every record it caused, so the loop may commit it.
        A retry waits for its not-before time in its own task: a long backoff never
        holds up a shorter one behind it (kept in memory only: after a crash the next
        router reads the record again from the committed offset).
        """
        if consumed.topic == self._retry_topic:
            delay_s, outs = self.handler.handle_retry(consumed)
            if delay_s > 0:
                await asyncio.sleep(delay_s)
        else:
            outs = self.handler.handle_request(consumed)
            if consumed.maybe_redone:
                outs = await self._unless_answered_before(consumed, outs)
        await self.deliver(consumed, outs)

    def batch_handler(self) -> HandleBatch | None:
        """:meth:`handle_batch` when ``router.batch_processing`` is on."""
        return self.handle_batch if self.settings.router.batch_processing else None

    async def handle_batch(self, batch: list[Consumed]) -> None:
        """Route one fetch's requests together: decide each in order, produce every record,
        then wait for the broker once. Retries and possible redos go one by one (:meth:`handle`).
        """
        alone = [c.topic == self._retry_topic or c.maybe_redone for c in batch]
        others = [
            asyncio.create_task(self._traced(c)) for c, one in zip(batch, alone, strict=True) if one
        ]
        sent: list[tuple[Consumed, list[Outgoing], list[asyncio.Future[Any]]]] = []
        for consumed in (c for c, one in zip(batch, alone, strict=True) if not one):
            with tracing.processing(consumed, group=self.config.group_id):
                outs = self.handler.handle_request(consumed)
                sent.append((consumed, outs, [await self._send(out) for out in outs]))
        waiting = [f for _, _, futures in sent for f in futures]
        if waiting:
            await asyncio.wait(waiting)
        resends = [
            self.deliver(consumed, failed)  # as deliver() resends: with backoff, concurrently
            for consumed, outs, futures in sent
            if (failed := [o for o, f in zip(outs, futures, strict=True) if _failed(f)])
        ]
        await asyncio.gather(*resends, *others)

    async def _traced(self, consumed: Consumed) -> None:
        with tracing.processing(consumed, group=self.config.group_id):
            await self.handle(consumed)

    async def _unless_answered_before(
        self, consumed: Consumed, outs: list[Outgoing]
    ) -> list[Outgoing]:
        """Nothing, for a redo past its deadline that was answered before (by a worker).

        A router that forwarded a request and died before committing it sees it again;
        answering it ``overloaded`` now would contradict the worker's ``ok``.
        """
        late = [o for o in outs if o.final_status in ("overloaded", "timeout") and o.key]
        if not late or self._answers is None:
            return outs
        answer = late[0]
        request_id = (answer.key or b"").decode("utf-8")
        created_ms = consumed.timestamp_ms or self.handler.now_ms()
        lookup = self._answers.final_status
        if not await answered_before(
            lookup, consumed.where(), answer.topic, request_id, created_ms
        ):
            return outs
        return []

    async def deliver(self, consumed: Consumed, outs: list[Outgoing]) -> None:
        """Produce ``outs`` and return once the broker has them all; resend what failed.

        A record for a DSPex topic is resent (with backoff) until the broker takes it:
        giving up would lose a request. A record for a client's reply topic is given
        up after :data:`SEND_ATTEMPTS` (e.g. the topic was deleted after the request
        was checked): that client's request times out.
        """
        attempt = 0
        while outs:
            delivered = [await self._send(out) for out in outs]
            await asyncio.wait(delivered)
            failed = [(o, f) for o, f in zip(outs, delivered, strict=True) if _failed(f)]
            if not failed:
                return
            attempt += 1
            outs = [o for o, _ in failed if attempt < SEND_ATTEMPTS or o.topic in self._own_topics]
            _log_failed_send(consumed, failed, attempt, gave_up=not outs)
            if outs:
                await asyncio.sleep(min(2.0**attempt * 0.1, 5.0))

    async def _send(self, out: Outgoing) -> asyncio.Future[Any]:
        """Queue one record; the returned future resolves once the broker has it.

        produce() never blocks: a record for a topic that does not exist fails its
        delivery once librdkafka gives up on its metadata, and a record produce()
        refuses (e.g. an invalid topic name) fails its own future only.
        """
        try:
            if self._publisher is None:
                raise RuntimeError("the router sends only between start() and stop()")
            return await self._publisher.send_bytes(out.topic, out.key, out.value, out.headers)
        except Exception as exc:
            failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            return failed

    async def start(self) -> None:
        """Check the topics, load programs and routing tables, then start consuming."""
        partitions = await asyncio.to_thread(self._check_topics)
        await self.reader.start(partitions)
        try:
            await asyncio.wait_for(self.reader.ready.wait(), READY_TIMEOUT_S)
        except TimeoutError as exc:
            await self.reader.stop()
            raise ConfigError(
                f"router: programs/routing/variables topics not read within {READY_TIMEOUT_S}s"
            ) from exc
        await super().start()
        self._retrier_thread.start()

    async def close(self) -> None:
        """Stop the retrier and following the views; send the refused updates' dead letters."""
        self._retrier_stop.set()
        if self._retrier_thread.is_alive():
            await asyncio.to_thread(self._retrier_thread.join, FLUSH_TIMEOUT_S)
        await self.reader.stop()
        await self._refused.flush()

    def _check_topics(self) -> dict[str, int]:
        """Partition counts of the live topics; every catalog topic must exist."""
        # a short-lived admin handle: one kept across a broker restart can abort the
        # process inside librdkafka (docs/reliability.md)
        names = [name for name, _ in self._topics.all()]
        return require_topics(kafka.admin_client(self.settings), names, "router")


def _log_failed_send(
    consumed: Consumed,
    failed: list[tuple[Outgoing, asyncio.Future[Any]]],
    attempt: int,
    *,
    gave_up: bool,
) -> None:
    error = next((f.exception() for _, f in failed if not f.cancelled()), "cancelled")
    if gave_up:
        logger.error(
            "gave up sending %s after %d attempts topic=%s error=%s",
            consumed.where(),
            attempt,
            failed[0][0].topic,
            error,
        )
    elif attempt == 1 or attempt % 10 == 0:  # once, then every tenth: a long outage stays readable
        logger.warning(
            "sending failed %s attempt=%d topic=%s error=%s; resending",
            consumed.where(),
            attempt,
            failed[0][0].topic,
            error,
        )


def make_router(
    settings: Settings,
    *,
    app_id: str | None = None,
    resolver: ProgramResolver | None = None,
    chooser: RouteChooser | None = None,
    instance_id: str | None = None,
) -> RouterApp:
    """The router for ``settings``; ``app_id`` (client id and consumer group) defaults to
    ``<prefix>router``; ``resolver`` defaults to ``dspex.agents.runtime.programs``;
    ``instance_id`` makes it a static group member (a supervised process)."""
    return RouterApp(
        settings,
        app_id=app_id or f"{settings.topics.prefix}router",
        resolver=resolver or ProgramsResolver.for_settings(settings),
        chooser=chooser,
        instance_id=instance_id,
    )
