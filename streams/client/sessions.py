"""Session handles: ``client.session("user-42")`` sends every request with that session id.

A session is server-side state (docs/sessions.md): the worker that serves it keeps
its history, pinned variant and counters on the ``sessions`` topic; a program with
a ``History`` input gets the earlier turns. The handle only saves repeating
``session_id=`` and adds :meth:`state` and :meth:`end`::

    chat = client.session("user-42")
    chat.submit("support.chat", {"question": "Where is my order?"})
    chat.submit("support.chat", {"question": "And when will it arrive?"})  # sees turn 1
    chat.end()  # tombstones the state; the next turn starts fresh (and says expired)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Generator, Mapping
from typing import Any, Protocol, Unpack

from dspex.schemas.records import Record
from dspex.streams.client._replies import Chunk, Result
from dspex.streams.client._requests import Program, RequestOptions
from dspex.streams.client.variables import VariableOptions
from dspex.streams.errors import InvalidRequest
from dspex.streams.serde import make_serde
from dspex.streams.sessions import end_session, find_session
from dspex.streams.settings import Settings
from dspex.streams.tenants import session_scope


class _AsyncClient(Protocol):
    """What an :class:`AsyncSession` needs of ``AsyncClient`` (no import: no cycle)."""

    tenant: str | None

    async def _submit(
        self, program: Program | str, inputs: Mapping[str, Any], options: RequestOptions
    ) -> Result: ...

    def stream(
        self, program: Program | str, inputs: Mapping[str, Any], **options: Unpack[RequestOptions]
    ) -> AsyncGenerator[Chunk, None]: ...

    async def set_variable(
        self, name: str, value: Any, **options: Unpack[VariableOptions]
    ) -> dict[str, Any]: ...


class _Client(Protocol):
    """What a :class:`Session` needs of ``Client``."""

    @property
    def tenant(self) -> str | None: ...

    def submit(
        self, program: Program | str, inputs: Mapping[str, Any], **options: Unpack[RequestOptions]
    ) -> Result: ...

    def stream(
        self, program: Program | str, inputs: Mapping[str, Any], **options: Unpack[RequestOptions]
    ) -> Generator[Chunk, None, None]: ...

    def set_variable(
        self, name: str, value: Any, **options: Unpack[VariableOptions]
    ) -> dict[str, Any]: ...


MAX_SESSION_ID_BYTES = 512


def check_session_id(session_id: Any) -> str:
    """A usable session id (a non-empty string of at most 512 UTF-8 bytes), else InvalidRequest."""
    if not isinstance(session_id, str) or not session_id.strip():
        raise InvalidRequest("session_id", "must be a non-empty string")
    if len(session_id.encode("utf-8")) > MAX_SESSION_ID_BYTES:
        raise InvalidRequest("session_id", f"longer than {MAX_SESSION_ID_BYTES} bytes")
    return session_id


def _with_session(session_id: str, options: Mapping[str, Any]) -> RequestOptions:
    other = options.get("session_id")
    if other is not None and other != session_id:
        raise InvalidRequest("session_id", f"{other!r} given to session {session_id!r}")
    return RequestOptions(**{**options, "session_id": session_id})  # type: ignore[typeddict-item]


def _session_scope(handle: _Handle, options: Mapping[str, Any]) -> VariableOptions:
    if (
        options.get("scope") not in (None, "session")
        or options.get("program")
        or options.get("module")
    ):
        raise InvalidRequest("scope", "a session's variable has scope session, nothing else")
    return VariableOptions(**{**options, "scope": "session", "session": handle.stored_id})  # type: ignore[typeddict-item]


class _Handle:
    def __init__(self, settings: Settings, session_id: str, tenant: str | None = None) -> None:
        self.session_id = check_session_id(session_id)
        self.stored_id = session_scope(tenant, session_id) if tenant else session_id
        """The id past the router: a tenant's sessions are scoped (docs/tenants.md)."""
        self._settings = settings

    def _state(self) -> Record | None:
        return find_session(self._settings, make_serde(self._settings), self.stored_id).state

    def _end(self) -> Record:
        return end_session(self._settings, make_serde(self._settings), self.stored_id)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.session_id!r})"


class AsyncSession(_Handle):
    """One session of an ``AsyncClient``: its requests all carry ``session_id``."""

    def __init__(self, client: _AsyncClient, settings: Settings, session_id: str) -> None:
        super().__init__(settings, session_id, client.tenant)
        self._client = client

    async def submit(
        self, program: Program | str, inputs: Mapping[str, Any], **options: Unpack[RequestOptions]
    ) -> Result:
        """``AsyncClient.submit`` as this session's next turn."""
        return await self._client._submit(program, inputs, _with_session(self.session_id, options))

    def stream(
        self, program: Program | str, inputs: Mapping[str, Any], **options: Unpack[RequestOptions]
    ) -> AsyncGenerator[Chunk, None]:
        """``AsyncClient.stream`` as this session's next turn."""
        return self._client.stream(program, inputs, **_with_session(self.session_id, options))

    async def set_variable(
        self, name: str, value: Any, **options: Unpack[VariableOptions]
    ) -> dict[str, Any]:
        """A variable for this session only: it overrides the shared ones for its requests."""
        return await self._client.set_variable(name, value, **_session_scope(self, options))

    async def state(self) -> Record | None:
        """The session's stored state (``SessionState``), None when it has none."""
        return await asyncio.to_thread(self._state)

    async def end(self) -> Record:
        """Tombstone the session; returns its last state. InvalidRequest when not live."""
        return await asyncio.to_thread(self._end)


class Session(_Handle):
    """One session of a ``Client``: its requests all carry ``session_id``."""

    def __init__(self, client: _Client, settings: Settings, session_id: str) -> None:
        super().__init__(settings, session_id, client.tenant)
        self._client = client

    def submit(
        self, program: Program | str, inputs: Mapping[str, Any], **options: Unpack[RequestOptions]
    ) -> Result:
        """``Client.submit`` as this session's next turn."""
        return self._client.submit(program, inputs, **_with_session(self.session_id, options))

    def stream(
        self, program: Program | str, inputs: Mapping[str, Any], **options: Unpack[RequestOptions]
    ) -> Generator[Chunk, None, None]:
        """``Client.stream`` as this session's next turn."""
        return self._client.stream(program, inputs, **_with_session(self.session_id, options))

    def set_variable(
        self, name: str, value: Any, **options: Unpack[VariableOptions]
    ) -> dict[str, Any]:
        """A variable for this session only: it overrides the shared ones for its requests."""
        return self._client.set_variable(name, value, **_session_scope(self, options))

    def state(self) -> Record | None:
        """The session's stored state (``SessionState``), None when it has none."""
        return self._state()

    def end(self) -> Record:
        """Tombstone the session; returns its last state. InvalidRequest when not live."""
        return self._end()
