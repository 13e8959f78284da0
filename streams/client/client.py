"""The application-facing client: send DSPy requests, receive their streamed answers.

:class:`AsyncClient` (asyncio) and :class:`Client` (a blocking facade running an
AsyncClient on a background event loop) share one API::

    async with AsyncClient(settings) as client:
        result = await client.submit("support.answer", {"question": "Capital of France?"})
        async for chunk in client.stream(Program.inline("question -> answer"), {...}):
            print(chunk.delta, end="")

Each client owns an idempotent producer and its own consumer on the reply topic
(the shared responses topic, or ``reply_topic``), assigned at the end of every
partition before the first request is produced. Replies are matched by request
id, ordered by ``seq`` and deduplicated, so each answer reaches its caller once.

Errors (besides the settings' and serde's own)::

    DSPexError
    ├── RequestFailed        the final chunk's status is not "ok": .result, .error
    ├── ClientClosed         the client was closed while the request waited
    ├── RetryableError
    │   ├── RequestTimeout   no final chunk by the deadline (+ grace): .request_id, .deadline_at
    │   └── BrokerUnavailable  the request could not be produced / offsets not read
    └── PermanentError
        └── InvalidRequest   refused before sending: no program, inputs not JSON, bad deadline

The wire contract this client implements, for clients in any language (encoding,
key, headers, reply topic, chunk order and dedupe, deadline grace), is in the
README: "Wire contract for any language". ``DEFAULT_GRACE_S`` is its rule 6 grace.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Callable, Coroutine, Generator, Iterable, Mapping
from types import TracebackType
from typing import Any, TypeVar, Unpack

from dspex.streams.client._async import DEFAULT_GRACE_S, AsyncClient
from dspex.streams.client._replies import Chunk, ClientClosed, RequestFailed, RequestTimeout, Result
from dspex.streams.client._requests import PipelineRef, Program, RequestOptions, Target
from dspex.streams.client.jobs import JobOptions, JobProgress, JobResult
from dspex.streams.client.pipelines import Pipelines
from dspex.streams.client.sessions import Session
from dspex.streams.client.variables import VariableOptions, VariableScope
from dspex.streams.errors import DSPexError
from dspex.streams.settings import Settings

__all__ = [
    "AsyncClient",
    "Chunk",
    "Client",
    "ClientClosed",
    "JobOptions",
    "JobProgress",
    "JobResult",
    "PipelineRef",
    "Program",
    "RequestFailed",
    "RequestOptions",
    "RequestTimeout",
    "Result",
    "VariableOptions",
    "VariableScope",
]

T = TypeVar("T")


class Client:
    """The blocking client: an :class:`AsyncClient` on a background event-loop thread.

    Same methods as the AsyncClient, without ``await``; usable as a context manager.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        reply_topic: str | None = None,
        tenant: str | None = None,
        grace_s: float = DEFAULT_GRACE_S,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="dspex-client-loop", daemon=True
        )
        self._thread.start()
        try:
            self._client = AsyncClient(
                settings, reply_topic=reply_topic, tenant=tenant, grace_s=grace_s
            )
        except BaseException:
            self._stop_loop()
            raise
        try:
            self._call(self._client.start())
        except BaseException:
            self._stop_loop()
            raise

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def reply_topic(self) -> str | None:
        """This client's own reply topic, or None for the shared responses topic."""
        return self._client.reply_topic

    @property
    def tenant(self) -> str | None:
        """The tenant this client sends as (docs/tenants.md), or None for the shared topics."""
        return self._client.tenant

    @property
    def pipelines(self) -> Pipelines:
        """Pipeline versions on the pipelines topic: ``put`` (validated), ``list``, ``get``."""
        client = self._client
        return Pipelines(client._settings, client._require_serde())

    def submit(
        self, program: Target, inputs: Mapping[str, Any], **options: Unpack[RequestOptions]
    ) -> Result:
        """Blocking :meth:`AsyncClient.submit`."""
        return self._call(self._client._submit(program, inputs, options))

    def stream(
        self, program: Target, inputs: Mapping[str, Any], **options: Unpack[RequestOptions]
    ) -> Generator[Chunk, None, None]:
        """Blocking :meth:`AsyncClient.stream`: chunks in order; ``close()`` it to leave early."""
        return self._blocking(self._client.stream(program, inputs, **options))

    def session(self, session_id: str) -> Session:
        """A handle whose requests all carry ``session_id`` (docs/sessions.md)."""
        return Session(self, self._client._settings, session_id)

    def submit_many(
        self,
        requests: Iterable[tuple[Target, Mapping[str, Any]]],
        **options: Unpack[RequestOptions],
    ) -> list[Result | DSPexError]:
        """Blocking :meth:`AsyncClient.submit_many`."""
        return self._call(self._client.submit_many(requests, **options))

    def publish_program(
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
        """Blocking :meth:`AsyncClient.publish_program`."""
        publish = self._client.publish_program(
            program_id,
            signature,
            module_type=module_type,
            state_json=state_json,
            module_config_json=module_config_json,
            tools=tools,
            metric=metric,
            description=description,
            version=version,
            created_by=created_by,
            adapter=adapter,
        )
        return self._call(publish)

    def send_feedback(
        self,
        request: Result | str,
        quality: float,
        *,
        program_id: str | None = None,
        variant: str | None = None,
    ) -> None:
        """Blocking :meth:`AsyncClient.send_feedback`."""
        send = self._client.send_feedback(request, quality, program_id=program_id, variant=variant)
        self._call(send)

    def set_variable(
        self, name: str, value: Any, **options: Unpack[VariableOptions]
    ) -> dict[str, Any]:
        """Blocking :meth:`AsyncClient.set_variable`."""
        return self._call(self._client.set_variable(name, value, **options))

    def get_variable(self, name: str, **scope: Unpack[VariableScope]) -> dict[str, Any] | None:
        """Blocking :meth:`AsyncClient.get_variable`."""
        return self._call(self._client.get_variable(name, **scope))

    def list_variables(self) -> list[dict[str, Any]]:
        """Blocking :meth:`AsyncClient.list_variables`."""
        return self._call(self._client.list_variables())

    def variable_history(self, name: str, **scope: Unpack[VariableScope]) -> list[dict[str, Any]]:
        """Blocking :meth:`AsyncClient.variable_history`."""
        return self._call(self._client.variable_history(name, **scope))

    def optimize(
        self,
        program_id: str,
        *,
        on_progress: Callable[[JobProgress], object] | None = None,
        timeout_s: float | None = None,
        **job: Unpack[JobOptions],
    ) -> JobResult:
        """Blocking :meth:`AsyncClient.optimize` (``on_progress`` runs on the client's loop)."""
        run = self._client.optimize(program_id, on_progress=on_progress, timeout_s=timeout_s, **job)
        return self._call(run)

    def submit_job(self, program_id: str, **job: Unpack[JobOptions]) -> str:
        """Blocking :meth:`AsyncClient.submit_job`."""
        return self._call(self._client.submit_job(program_id, **job))

    def follow_job(
        self, job_id: str, *, timeout_s: float | None = None
    ) -> Generator[Chunk, None, None]:
        """Blocking :meth:`AsyncClient.follow_job`; ``close()`` it to leave early."""
        return self._blocking(self._client.follow_job(job_id, timeout_s=timeout_s))

    def cancel_job(self, job_id: str, *, requested_by: str = "", reason: str = "") -> None:
        """Blocking :meth:`AsyncClient.cancel_job`."""
        self._call(self._client.cancel_job(job_id, requested_by=requested_by, reason=reason))

    def close(self) -> None:
        """Close the AsyncClient, then stop the event-loop thread; idempotent."""
        if self._loop.is_closed():
            return
        try:
            self._call(self._client.close())
        finally:
            self._stop_loop()

    def _blocking(self, chunks: AsyncGenerator[Chunk, None]) -> Generator[Chunk, None, None]:
        """An async chunk generator driven from this thread; closed however it ends."""
        try:
            while True:
                try:
                    yield self._call(_anext(chunks))
                except StopAsyncIteration:
                    return
        finally:
            if not self._loop.is_closed():
                self._call(chunks.aclose())

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop.is_closed():
            coro.close()
            raise ClientClosed("the client is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10.0)
        self._loop.close()


async def _anext(chunks: AsyncGenerator[Chunk, None]) -> Chunk:
    return await chunks.__anext__()
