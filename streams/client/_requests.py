"""The sending half of the client: how a caller names a program, and the Request it becomes.

Pure functions and values, no I/O: :class:`Program`, :func:`build_request` (the
Avro-ready Request record), :func:`request_headers` and :func:`request_key`.
Inputs and variables travel as JSON strings (the contract's ``map<string>``), so
a value that JSON cannot represent is refused here, naming the field.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypedDict

from dspex.schemas import records
from dspex.schemas.times import millis
from dspex.streams.errors import InvalidRequest

CONTENT_TYPE = "application/vnd.dspex.request+avro"
HEADER_REQUEST_ID = "dspex-request-id"
HEADER_REPLY_TOPIC = "dspex-reply-topic"
HEADER_CONTENT_TYPE = "content-type"
DEFAULT_DEADLINE_S = 30.0


@dataclass(frozen=True)
class Program:
    """How a caller names a program: a registered one (``program_id``) or an inline one.

    Use :meth:`registered` or :meth:`inline`. For a registered program the other
    fields, when set, override the registered version's (the Request contract).
    """

    program_id: str | None = None
    version: int | None = None
    signature: str | None = None
    module_type: str | None = None
    state_json: str | None = None
    module_config_json: str | None = None
    tools: tuple[str, ...] = ()
    adapter: str | None = None
    """The DSPy adapter (``ChatAdapter``, ``JSONAdapter``, ``XMLAdapter``, ``TwoStepAdapter``,
    ``auto``); for a registered program, overrides the registered version's."""

    def __post_init__(self) -> None:
        if not self.program_id and not self.signature:
            raise InvalidRequest("program", "name a registered program_id or an inline signature")

    @classmethod
    def registered(
        cls, program_id: str, version: int | None = None, *, adapter: str | None = None
    ) -> Program:
        """A program registered on the programs topic; ``version=None`` means the latest."""
        return cls(program_id=program_id, version=version, adapter=adapter)

    @classmethod
    def inline(
        cls,
        signature: str,
        module_type: str = "Predict",
        *,
        state_json: str | None = None,
        module_config_json: str | None = None,
        tools: tuple[str, ...] = (),
        adapter: str | None = None,
    ) -> Program:
        """A program sent with the request: a DSPy signature run by ``module_type``."""
        return cls(
            signature=signature,
            module_type=module_type,
            state_json=state_json,
            module_config_json=module_config_json,
            tools=tuple(tools),
            adapter=adapter,
        )

    @classmethod
    def of(cls, program: Program | str) -> Program:
        """``program`` itself, or the registered program a plain string names."""
        return program if isinstance(program, Program) else cls.registered(program)


@dataclass(frozen=True)
class PipelineRef:
    """How a caller names a pipeline to run: its id and version (None: the latest).

    Pass it wherever a program goes (``client.submit(PipelineRef("support"), inputs)``);
    the run is answered like a request, its progress chunks carrying ``stage``.
    """

    pipeline_id: str
    version: int | None = None

    def __post_init__(self) -> None:
        if not self.pipeline_id:
            raise InvalidRequest("pipeline_id", "name a registered pipeline")


Target = Program | PipelineRef | str
"""What a request runs: a Program, a PipelineRef, or a registered program id."""


class RequestOptions(TypedDict, total=False):
    """Per-request options shared by ``submit``, ``stream`` and ``submit_many``.

    ``deadline_s``: seconds until the request's absolute deadline (default 30).
    ``session_id``: the Kafka key, keeping one session's requests in order.
    ``variables``: per-request variable overrides (JSON-encoded on the wire).
    ``pool_hint``: ``general``, ``optimizer`` or ``gpu``. ``cache``: False bypasses
    the response cache. ``metadata``: free-form string labels.
    """

    deadline_s: float
    session_id: str | None
    variables: Mapping[str, Any] | None
    pool_hint: str | None
    cache: bool
    metadata: Mapping[str, str] | None


def build_request(
    program: Target,
    inputs: Mapping[str, Any],
    *,
    stream: bool = False,
    reply_topic: str | None = None,
    now: datetime | None = None,
    **options: Any,
) -> dict[str, Any]:
    """A Request record with a fresh request id, ready for the serde.

    ``options`` are :class:`RequestOptions`; an unknown one is a ``TypeError``.
    """
    unknown = set(options) - set(RequestOptions.__annotations__)
    if unknown:
        raise TypeError(f"unknown request option(s): {sorted(unknown)}")
    created = millis(now or datetime.now(UTC))
    deadline_s = float(options.get("deadline_s", DEFAULT_DEADLINE_S))
    if not math.isfinite(deadline_s) or deadline_s <= 0:
        raise InvalidRequest(
            "deadline_s", f"must be a positive number of seconds, got {deadline_s}"
        )
    return records.request(
        request_id=str(uuid.uuid4()),
        created_at=created,
        deadline_at=created + timedelta(seconds=deadline_s),
        session_id=options.get("session_id"),
        inputs=json_map("inputs", inputs),
        variables=json_map("variables", options.get("variables") or {}),
        pool_hint=options.get("pool_hint"),
        stream=stream,
        cache=bool(options.get("cache", True)),
        reply_topic=reply_topic,
        metadata=options.get("metadata") or {},
        **_target_fields(program),
    )


def _target_fields(target: Target) -> dict[str, Any]:
    """The Request fields that name what runs: a pipeline, or a program's definition."""
    if isinstance(target, PipelineRef):
        return {"pipeline_id": target.pipeline_id, "pipeline_version": target.version}
    named = Program.of(target)
    return {
        "program_id": named.program_id,
        "program_version": named.version,
        "signature": named.signature,
        "module_type": named.module_type,
        "module_config_json": named.module_config_json,
        "state_json": named.state_json,
        "tools": named.tools,
        "adapter": named.adapter,
    }


def json_map(kind: str, values: Mapping[str, Any]) -> dict[str, str]:
    """``{name: json.dumps(value)}``; a value JSON cannot carry names ``kind.name``."""
    encoded: dict[str, str] = {}
    for name, value in values.items():
        if not isinstance(name, str):
            raise InvalidRequest(kind, f"names must be strings, got {name!r}")
        try:
            encoded[name] = json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"{kind}.{name}", f"not JSON-serializable: {exc}") from exc
    return encoded


def request_key(record: Mapping[str, Any]) -> bytes:
    """The Kafka key: the session id, else the request id (UTF-8)."""
    return str(record["session_id"] or record["request_id"]).encode()


def request_headers(record: Mapping[str, Any]) -> list[tuple[str, str | bytes | None]]:
    """The documented Kafka headers of a Request message (see ``dspex.streams.client.client``)."""
    headers: list[tuple[str, str | bytes | None]] = [
        (HEADER_REQUEST_ID, str(record["request_id"]).encode())
    ]
    if record.get("reply_topic"):
        headers.append((HEADER_REPLY_TOPIC, str(record["reply_topic"]).encode()))
    headers.append((HEADER_CONTENT_TYPE, CONTENT_TYPE.encode()))
    return headers
