"""The asyncio client: :class:`AsyncClient`, re-exported by :mod:`dspex.streams.client.client`.

It owns an idempotent producer and one :class:`~dspex.streams.client._listener.ReplyListener`;
the listener's thread also serves the producer's delivery reports, and both hand
their results to this client's event loop with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from functools import partial
from types import TracebackType
from typing import Any, Unpack

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from dspex.streams import kafka, tracing
from dspex.streams.client import jobs as _jobs
from dspex.streams.client import variables as _variables
from dspex.streams.client._feedback import feedback_record
from dspex.streams.client._listener import ReplyListener
from dspex.streams.client._replies import (
    Chunk,
    ClientClosed,
    Dispatcher,
    Inbox,
    RequestFailed,
    Result,
)
from dspex.streams.client._requests import (
    DEFAULT_DEADLINE_S,
    RequestOptions,
    Target,
    build_request,
    request_headers,
    request_key,
)
from dspex.streams.client.programs import (
    latest_version,
    program_version_record,
    publish_next_version,
)
from dspex.streams.client.sessions import AsyncSession
from dspex.streams.errors import BrokerUnavailable, ConfigError, DSPexError
from dspex.streams.programs import check_program
from dspex.streams.serde import Serde, make_serde
from dspex.streams.settings import Settings
from dspex.streams.tenants import check_name, request_topic, resource_prefix, response_topic
from dspex.streams.topics import Topics

logger = logging.getLogger(__name__)

DEFAULT_GRACE_S = 2.0
_PRODUCE_ATTEMPTS = 200
_PRODUCE_BACKOFF_S = 0.05


class AsyncClient:
    """Sends requests and receives their answers on one asyncio event loop.

    ``reply_topic``: a topic of this client's own for its replies (it must exist);
    None means the shared responses topic. ``tenant`` (default
    ``settings.tenants.client``): send to that tenant's request topic and read its
    response topic instead (docs/tenants.md); a tenant's answers come only there, so
    it excludes ``reply_topic``. ``grace_s``: how long past a request's deadline to
    wait for the server's own ``timeout`` reply.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        reply_topic: str | None = None,
        tenant: str | None = None,
        grace_s: float = DEFAULT_GRACE_S,
    ) -> None:
        topics = Topics(settings.topics)
        self._settings = settings
        self.tenant = check_name(tenant) if tenant else settings.tenants.client
        self._requests_topic = topics.name("requests")
        self._programs_topic = topics.name("programs")
        self._telemetry_topic = topics.name("telemetry")
        if self.tenant is not None:
            own = response_topic(self.tenant, settings.topics.prefix)
            if reply_topic not in (None, own):
                raise ConfigError(
                    f"reply_topic={reply_topic!r} with tenant={self.tenant!r}: a tenant's "
                    f"answers always come on {own}"
                )
            reply_topic = own
            self._requests_topic = request_topic(self.tenant, settings.topics.prefix)
        self.reply_topic = reply_topic
        self.listen_topic = reply_topic or topics.name("responses")
        self._grace_s = grace_s
        self._dispatcher = Dispatcher()
        self._start_lock = asyncio.Lock()
        self._serde: Serde | None = None
        self._producer: Producer | None = None
        self._listener: ReplyListener | None = None
        self._closed = False

    @property
    def requests_topic(self) -> str:
        """The topic this client produces its requests to (its tenant's, else the shared one)."""
        return self._requests_topic

    async def __aenter__(self) -> AsyncClient:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Create the producer and the reply consumer; idempotent, implied by every call."""
        if self._listener is not None and not self._closed:
            return  # started: every request calls this, so skip the lock
        async with self._start_lock:
            if self._closed:
                raise ClientClosed("the client is closed")
            if self._listener is None:
                await self._start_io()

    async def _start_io(self) -> None:
        loop = asyncio.get_running_loop()
        self._serde = make_serde(self._settings)
        producer = self._producer = kafka.producer(self._settings)
        group = f"dspex-client-{uuid.uuid4().hex}"
        if self.tenant is not None:  # a tenant may use only groups under its own prefix
            group = resource_prefix(self.tenant, self._settings.topics.prefix) + group
        listener = ReplyListener(
            kafka.consumer(self._settings, group),
            self._serde,
            self.listen_topic,
            on_chunk=partial(_call_soon, loop, self._dispatcher.deliver),
            on_idle=partial(producer.poll, 0),
            waiting=partial(_any, self._dispatcher),
        )
        try:
            await asyncio.to_thread(listener.start)
        except BrokerUnavailable as exc:  # a refused client sees a broker that "is down"
            await asyncio.to_thread(listener.stop)
            await asyncio.to_thread(producer.poll, 0.5)  # serve callbacks naming a refusal
            refused = kafka.refusal(self._settings)
            if refused is not None:
                raise refused from exc
            raise
        except BaseException:
            await asyncio.to_thread(listener.stop)
            raise
        self._listener = listener

    async def close(self) -> None:
        """Fail every waiting request with ClientClosed, stop the consumer, flush the producer."""
        async with self._start_lock:
            if self._closed:
                return
            self._closed = True
            self._dispatcher.close(ClientClosed("the client was closed while waiting"))
            if self._listener is not None:
                await asyncio.to_thread(self._listener.stop)
            if self._producer is not None:
                await asyncio.to_thread(self._producer.flush, 5.0)

    async def submit(
        self,
        program: Target,
        inputs: Mapping[str, Any],
        *,
        deadline_s: float = DEFAULT_DEADLINE_S,
        session_id: str | None = None,
        variables: Mapping[str, Any] | None = None,
        pool_hint: str | None = None,
        cache: bool = True,
        metadata: Mapping[str, str] | None = None,
    ) -> Result:
        """Run ``program`` (a Program, or a registered program id) on ``inputs``; await the answer.

        Raises RequestFailed when the answer is an error, RequestTimeout when none
        arrives by the deadline (+ grace).
        """
        options = RequestOptions(
            deadline_s=deadline_s,
            session_id=session_id,
            variables=variables,
            pool_hint=pool_hint,
            cache=cache,
            metadata=metadata,
        )
        return await self._submit(program, inputs, options)

    def session(self, session_id: str) -> AsyncSession:
        """A handle whose requests all carry ``session_id`` (docs/sessions.md)."""
        return AsyncSession(self, self._settings, session_id)

    async def _submit(
        self, program: Target, inputs: Mapping[str, Any], options: RequestOptions
    ) -> Result:
        started = time.monotonic()
        inbox = await self._open(program, inputs, False, options)
        return await self._answer(inbox, started)

    def stream(
        self, program: Target, inputs: Mapping[str, Any], **options: Unpack[RequestOptions]
    ) -> AsyncGenerator[Chunk, None]:
        """Request progress chunks; yield them in ``seq`` order, ending with the final one.

        The request is produced when iteration starts. The final chunk is yielded
        whatever its status (check ``chunk.status``/``chunk.error``); RequestTimeout
        is raised when no final chunk arrives by the deadline (+ grace).
        """
        return self._until_final(partial(self._open, program, inputs, True, options))

    async def submit_many(
        self,
        requests: Iterable[tuple[Target, Mapping[str, Any]]],
        **options: Unpack[RequestOptions],
    ) -> list[Result | DSPexError]:
        """Submit every request concurrently; results in input order, failures as the error.

        Every request is produced before any answer is awaited; the answers are then
        collected in order. No task per request: with 10,000 in flight, tasks and their
        coroutines were most of the objects the garbage collector walked, and its full
        passes in the client took up to 0.7 s on the bench machine.
        """
        opened: list[tuple[Inbox, float] | DSPexError] = []
        try:
            for program, inputs in requests:
                started = time.monotonic()
                try:
                    opened.append((await self._open(program, inputs, False, options), started))
                except DSPexError as exc:
                    opened.append(exc)
            return [await self._answer_or_error(item) for item in opened]
        finally:
            for item in opened:
                if not isinstance(item, DSPexError):
                    self._dispatcher.discard(item[0].request_id)

    async def _answer_or_error(self, item: tuple[Inbox, float] | DSPexError) -> Result | DSPexError:
        if isinstance(item, DSPexError):
            return item
        try:
            return await self._answer(*item)
        except DSPexError as exc:
            return exc

    async def publish_program(
        self,
        program_id: str,
        signature: str,
        *,
        module_type: str = "Predict",
        state_json: str | None = None,
        module_config_json: str = "{}",
        tools: Iterable[str] = (),
        metric: str | None = None,
        description: str | None = None,
        version: int | None = None,
        created_by: str = "",
        adapter: str | None = None,
    ) -> int:
        """Publish a ProgramVersion to the programs topic (key: program id); return its version.

        The program is checked first with the router's own rules (signature, module
        type — built in or allowlisted in ``settings.modules`` —, module config,
        adapter): ``InvalidRequest`` naming the field, and nothing is produced.
        ``version=None`` takes the latest + 1, read and published inside a transaction
        fenced per program, so publishers racing on one program id (another put, an
        optimizer job) never take the same number.
        """
        check_program(
            signature,
            module_type=module_type,
            module_config_json=module_config_json,
            adapter=adapter,
            deployed=self._settings.modules,
        )
        await self.start()
        serde = self._require_serde()

        def build(latest: int) -> dict[str, Any]:
            return program_version_record(
                program_id,
                signature,
                version=version or latest + 1,
                parent_version=latest or None,
                module_type=module_type,
                state_json=state_json,
                module_config_json=module_config_json,
                tools=tools,
                metric=metric,
                description=description,
                created_by=created_by,
                adapter=adapter,
            )

        if version is None:
            published = await asyncio.to_thread(
                publish_next_version,
                self._settings,
                serde,
                self._programs_topic,
                program_id,
                build,
            )
        else:
            latest = await asyncio.to_thread(
                latest_version, self._settings, serde, self._programs_topic, program_id
            )
            value = serde.encode("ProgramVersion", build(latest), topic=self._programs_topic)
            await (await self._send(self._programs_topic, program_id.encode(), value, []))
            published = version
        logger.info("published program_id=%s version=%s", program_id, published)
        return published

    async def send_feedback(
        self,
        request: Result | str,
        quality: float,
        *,
        program_id: str | None = None,
        variant: str | None = None,
    ) -> None:
        """Score an answered request's quality in [0, 1] for the learning agent.

        ``request`` is the :class:`Result` (its program id is used) or a request id
        with ``program_id``. Returns once the broker has the record.
        """
        await self.start()
        request_id = request if isinstance(request, str) else request.request_id
        if not isinstance(request, str):
            program_id = program_id or request.program_id
        record = feedback_record(request_id, quality, program_id=program_id or "", variant=variant)
        topic = self._telemetry_topic
        value = self._require_serde().encode("Telemetry", record, topic=topic)
        await (await self._send(topic, str(record["program_id"]).encode(), value, []))

    async def set_variable(
        self, name: str, value: Any, **options: Unpack[_variables.VariableOptions]
    ) -> dict[str, Any]:
        """Validate and publish the next version of a shared variable; return its record.

        An invalid value raises InvalidRequest naming the field and nothing is sent;
        otherwise the update goes to ``variables`` and ``variables.history`` and this
        returns once the broker has both. See ``docs/variables.md``.
        """
        await self.start()
        serde = self._require_serde()
        return await _variables.set_variable(
            self._settings, serde, self._send, name, value, options
        )

    async def get_variable(
        self, name: str, **scope: Unpack[_variables.VariableScope]
    ) -> dict[str, Any] | None:
        """The record in force for a variable (as the routers see it), or None."""
        await self.start()
        read = _variables.get_variable
        return await asyncio.to_thread(read, self._settings, self._require_serde(), name, scope)

    async def list_variables(self) -> list[dict[str, Any]]:
        """Every variable's record in force, ordered by key."""
        await self.start()
        read = _variables.list_variables
        return await asyncio.to_thread(read, self._settings, self._require_serde())

    async def variable_history(
        self, name: str, **scope: Unpack[_variables.VariableScope]
    ) -> list[dict[str, Any]]:
        """Every update of a variable on ``variables.history``, oldest first (all scopes
        unless ``scope``/``program``/``module`` narrows it)."""
        await self.start()
        read = _variables.variable_history
        return await asyncio.to_thread(read, self._settings, self._require_serde(), name, scope)

    async def optimize(
        self,
        program_id: str,
        *,
        on_progress: Callable[[_jobs.JobProgress], object] | None = None,
        timeout_s: float | None = None,
        **job: Unpack[_jobs.JobOptions],
    ) -> _jobs.JobResult:
        """Run an optimizer job on a registered program; return how it ended.

        ``on_progress`` gets each progress chunk (phase, trial, score, best). The
        result's ``status`` is "ok", "cancelled" or "error"; RequestTimeout after
        ``timeout_s`` (default 7 days) without an end. See ``docs/optimizer.md``.
        """
        await self.start()
        record = await self._checked_job(program_id, job)
        inbox = self._open_job_inbox(record["job_id"], timeout_s)
        try:
            await self._produce_job(record)
            return await _jobs.wait_for_result(inbox, on_progress)
        finally:
            self._dispatcher.discard(record["job_id"])

    async def submit_job(self, program_id: str, **job: Unpack[_jobs.JobOptions]) -> str:
        """Queue an optimizer job without waiting; return its job id (see :meth:`follow_job`)."""
        await self.start()
        record = await self._checked_job(program_id, job)
        await self._produce_job(record)
        return str(record["job_id"])

    async def _checked_job(self, program_id: str, job: _jobs.JobOptions) -> dict[str, Any]:
        """The job's record, refused here (``InvalidRequest``) if the runner would refuse it."""
        record = _jobs.job_record(program_id, job, reply_topic=self.reply_topic)
        check = _jobs.check_job_record
        await asyncio.to_thread(check, self._settings, self._require_serde(), record)
        return record

    def follow_job(
        self, job_id: str, *, timeout_s: float | None = None
    ) -> AsyncGenerator[Chunk, None]:
        """A job's chunks from now on, in arrival order, ending with its final one."""
        return self._until_final(partial(self._open_job, job_id, timeout_s))

    async def _open_job(self, job_id: str, timeout_s: float | None) -> Inbox:
        await self.start()
        return self._open_job_inbox(job_id, timeout_s)

    def _open_job_inbox(self, job_id: str, timeout_s: float | None) -> _jobs.JobInbox:
        """Register a job's inbox with the dispatcher (before anything is produced)."""
        inbox = _jobs.job_inbox(job_id, timeout_s, asyncio.get_running_loop().time())
        self._dispatcher.open(inbox)
        return inbox

    async def _produce_job(self, record: Mapping[str, Any]) -> None:
        """Produce the job to the jobs topic (key: job id) and wait for the broker's ack."""
        topic = Topics(self._settings.topics).name("jobs")
        value = self._require_serde().encode("OptimizationJob", record, topic=topic)
        headers: list[tuple[str, str | bytes | None]] = [("dspex-job-id", str(record["job_id"]))]
        await (await self._send(topic, str(record["job_id"]).encode(), value, headers))

    async def cancel_job(self, job_id: str, *, requested_by: str = "", reason: str = "") -> None:
        """Ask the job's runner to stop it; it ends with a final "cancelled" Response.

        ``InvalidRequest`` (field ``job_id``) when no such job was submitted or it has
        already finished.
        """
        await self.start()
        check = _jobs.check_cancellable
        await asyncio.to_thread(check, self._settings, self._require_serde(), job_id)
        topic = Topics(self._settings.topics).name("jobs.control")
        record = _jobs.control_record(job_id, "cancel", requested_by, reason)
        value = self._require_serde().encode("JobControl", record, topic=topic)
        await (await self._send(topic, job_id.encode(), value, []))

    async def _until_final(
        self, open_inbox: Callable[[], Awaitable[Inbox]]
    ) -> AsyncGenerator[Chunk, None]:
        """Open an inbox when iteration starts; yield its chunks up to the final one."""
        inbox = await open_inbox()
        try:
            while True:
                chunk = await inbox.next()
                yield chunk
                if chunk.final:
                    return
        finally:
            self._dispatcher.discard(inbox.request_id)

    async def _open(
        self,
        program: Target,
        inputs: Mapping[str, Any],
        stream: bool,
        options: RequestOptions,
    ) -> Inbox:
        """Build the request, register its inbox, produce it; the caller discards the inbox."""
        await self.start()
        record = build_request(
            program, inputs, stream=stream, reply_topic=self.reply_topic, **options
        )
        inbox = self._dispatcher.open(self._inbox(record, options))
        try:
            await self._send_request(record)
        except BaseException:
            self._dispatcher.discard(inbox.request_id)
            raise
        return inbox

    async def _answer(self, inbox: Inbox, started: float) -> Result:
        """Every chunk of ``inbox`` up to the final one, as a Result (RequestFailed if not ok)."""
        try:
            chunks = [await inbox.next()]
            while not chunks[-1].final:
                chunks.append(await inbox.next())
        finally:
            self._dispatcher.discard(inbox.request_id)
        answered_at = inbox.answered_at or time.monotonic()
        result = Result.from_chunks(chunks, answered_at - started)
        if result.status != "ok":
            raise RequestFailed(result, chunks[-1].error)
        return result

    def _inbox(self, record: Mapping[str, Any], options: RequestOptions) -> Inbox:
        loop = asyncio.get_running_loop()
        wait_s = options.get("deadline_s", DEFAULT_DEADLINE_S) + self._grace_s
        return Inbox(
            record["request_id"], record["deadline_at"], loop.time() + wait_s, self._grace_s
        )

    async def _send_request(self, record: Mapping[str, Any]) -> None:
        topic = self._requests_topic
        value = self._require_serde().encode("Request", record, topic=topic)
        with tracing.producing(topic, {"dspex.request_id": str(record["request_id"])}):
            headers = tracing.inject(request_headers(record))
            sent = await self._send(topic, request_key(record), value, headers)
        sent.add_done_callback(partial(self._check_sent, str(record["request_id"])))
        logger.debug("sent request_id=%s topic=%s", record["request_id"], topic)

    def _check_sent(self, request_id: str, sent: asyncio.Future[None]) -> None:
        if not sent.cancelled() and sent.exception() is not None:
            error = sent.exception()
            assert isinstance(error, DSPexError)  # noqa: S101 - _delivered only sets these
            self._dispatcher.fail(request_id, error)

    async def _send(
        self, topic: str, key: bytes, value: bytes, headers: list[tuple[str, str | bytes | None]]
    ) -> asyncio.Future[None]:
        """Produce one message; the returned future resolves on its delivery report."""
        loop = asyncio.get_running_loop()
        sent: asyncio.Future[None] = loop.create_future()
        callback = partial(_delivered, loop, sent)
        for _ in range(_PRODUCE_ATTEMPTS):
            try:
                self._require_producer().produce(
                    topic, value, key, headers=headers, on_delivery=callback
                )
                return sent
            except KafkaException as exc:  # one Kafka will not take (too large...): say why
                raise kafka.explain(exc) from exc
            except BufferError:  # librdkafka's local queue is full: let deliveries drain
                await asyncio.sleep(_PRODUCE_BACKOFF_S)
        raise BrokerUnavailable(f"topic={topic}: producer queue still full, message not sent")

    def _require_serde(self) -> Serde:
        if self._serde is None:
            raise ClientClosed("the client is not started")
        return self._serde

    def _require_producer(self) -> Producer:
        if self._producer is None or self._closed:
            raise ClientClosed("the client is closed")
        return self._producer


def _call_soon(loop: asyncio.AbstractEventLoop, func: Any, *args: Any) -> None:
    """Run ``func(*args)`` on ``loop`` from another thread; dropped once the loop is closed."""
    try:
        loop.call_soon_threadsafe(func, *args)
    except RuntimeError:
        logger.debug("event loop closed: dropping a callback")


def _delivered(
    loop: asyncio.AbstractEventLoop,
    sent: asyncio.Future[None],
    err: KafkaError | None,
    msg: Message,
) -> None:
    """Delivery report (on the poll thread): resolve ``sent`` on the event loop."""
    if err is None:
        _call_soon(loop, _resolve, sent, None)
        return
    where = f"topic={msg.topic()}"
    error = BrokerUnavailable(f"{where}: message not delivered: {err.str()}")
    _call_soon(loop, _resolve, sent, error)


def _resolve(sent: asyncio.Future[None], error: DSPexError | None) -> None:
    if sent.done():
        return
    if error is None:
        sent.set_result(None)
    else:
        sent.set_exception(error)


def _any(dispatcher: Dispatcher) -> bool:
    """Whether any request waits for a reply (read from the listener's thread)."""
    return len(dispatcher) > 0
