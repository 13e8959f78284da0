"""The vocabulary every agent shares with Kafka: one type per idea.

- :class:`Consumed`: a message as it was consumed (coordinates, exact bytes),
  enough to dead-letter or replay it; built from a confluent-kafka or a faust message.
- :class:`Outgoing`: one encoded record to produce.
- :class:`ErrorInfo`: why something failed, as the contract's ``ErrorInfo`` carries it,
  plus the final Response status it gives a waiting client.
- :class:`TokenUsage`: tokens one run used.

The records built from these (Response, Execution, Telemetry, DeadLetter) live in
:mod:`dspex.agents.plumbing.records`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from dspex.schemas import records
from dspex.schemas.records import Record
from dspex.streams.errors import InvalidRequest

if TYPE_CHECKING:
    from confluent_kafka import Message

Header = tuple[str, bytes | None]


@dataclass(frozen=True, slots=True)
class Consumed:
    """Where a consumed message came from and its exact bytes."""

    topic: str
    partition: int = -1
    offset: int = -1
    key: bytes | None = None
    value: bytes | None = None
    headers: Sequence[Header] = ()
    timestamp_ms: int | None = None
    maybe_redone: bool = False
    """True when an earlier owner of the partition may have processed this message already:
    it lies below the partition's end offset at the time this consumer was assigned it."""

    def where(self) -> str:
        """``topic=... partition=... offset=...`` for log lines and messages."""
        return f"topic={self.topic} partition={self.partition} offset={self.offset}"

    @classmethod
    def from_message(cls, message: Message, *, maybe_redone: bool = False) -> Consumed:
        """A consumed confluent-kafka message."""
        _, timestamp = message.timestamp()
        return cls(
            topic=message.topic() or "",
            partition=_int(message.partition()),
            offset=_int(message.offset()),
            key=message.key(),
            value=message.value(),
            headers=tuple(_confluent_headers(message)),
            timestamp_ms=timestamp if timestamp > 0 else None,
            maybe_redone=maybe_redone,
        )

    @classmethod
    def from_faust(cls, message: Any) -> Consumed:
        """A faust (aiokafka) message: ``event.message`` in an agent."""
        timestamp = getattr(message, "timestamp", None)
        return cls(
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            key=message.key,
            value=message.value,
            headers=_pairs(message.headers),
            timestamp_ms=int(timestamp * 1000) if timestamp is not None else None,
        )


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One record to produce: already-encoded value bytes for a topic."""

    topic: str
    key: bytes | None
    value: bytes
    headers: Sequence[Header] = ()
    final_status: str | None = None
    """For the final Response to a request (keyed by its id): its status."""


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """Why a request or record failed; :meth:`record` is the contract's ``ErrorInfo``.

    ``status`` is the final Response status the failure gives a waiting client
    (``error``, ``timeout``, ``overloaded``); it is not part of ``ErrorInfo`` itself.
    """

    error_class: str
    message: str
    field: str | None = None
    stage: str | None = None
    retryable: bool = False
    status: str = "error"

    def record(self) -> Record:
        return records.error_info(
            error_class=self.error_class,
            message=self.message,
            field=self.field,
            stage=self.stage,
            retryable=self.retryable,
        )

    @classmethod
    def from_exception(cls, exc: BaseException, stage: str, *, status: str = "error") -> ErrorInfo:
        """The error an exception describes; ``InvalidRequest`` contributes its field."""
        name = type(exc).__name__
        if isinstance(exc, InvalidRequest):
            return cls(name, exc.reason, exc.field, stage, status=status)
        return cls(name, str(exc) or name, None, stage, status=status)


class TokenUsage(NamedTuple):
    """Tokens one run used, summed over every LM call."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


def _int(value: int | None) -> int:
    return -1 if value is None else value


def _confluent_headers(message: Message) -> Iterator[Header]:
    # a consumed message's headers are a list of (key, value) pairs; the stubs allow more
    pairs = cast("list[tuple[str, str | bytes | None]]", message.headers() or [])
    for key, value in pairs:
        yield key, value.encode() if isinstance(value, str) else value


def _pairs(headers: Any) -> tuple[Header, ...]:
    if not headers:
        return ()
    items = headers.items() if isinstance(headers, Mapping) else headers
    return tuple((str(k), v) for k, v in items)
