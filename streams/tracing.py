"""Traces across Kafka hops: spans, and the W3C trace context in record headers.

One request is one trace, whichever processes it crosses: the client's ``send``
span is the root (or a child of the application's current span); each process
that consumes a record continues the trace its headers carry
(:func:`processing`), and every record it produces meanwhile carries the
context of its current span in a ``traceparent`` header (:func:`inject`, called
by the agents' publisher for every record). Any process uses these few calls::

    from dspex.streams import tracing

    tracing.configure(settings, "dspex-pipeline")        # once, at process start
    with tracing.processing(consumed, group="g"):         # a consumed record
        tracing.annotate({"dspex.pipeline.run_id": rid})  # attributes of the current span
        with tracing.span("stage summarize"):            # a child span
            headers = tracing.inject(headers)             # before producing

Off by default, at almost no cost: until an SDK tracer provider is installed
(:func:`configure` from the ``OTEL_*`` variables, :func:`use_provider`, or the
application's own ``opentelemetry.trace.set_tracer_provider``) every call here
returns at once (no span objects, headers unchanged). Exporters and the
``OTEL_*`` variables: ``docs/tracing.md``. Only the OpenTelemetry API is imported
here; the SDK is imported by :func:`configure` when exporting is configured.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from dspex.streams.errors import ConfigError

if TYPE_CHECKING:
    from dspex.streams.settings import Settings

__all__ = [
    "OpenSpan",
    "SpanKind",
    "annotate",
    "configure",
    "enabled",
    "extract",
    "gen_ai_attributes",
    "inject",
    "open_span",
    "outcome",
    "processing",
    "producing",
    "span",
    "use_provider",
]

V = TypeVar("V")
Header = tuple[str, Any]


class ConsumedRecord(Protocol):
    """What :func:`processing` reads of a consumed record (the agents' ``Consumed`` is one)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def headers(self) -> Sequence[Header]: ...
    @property
    def timestamp_ms(self) -> int | None: ...


class _State:
    override: trace.TracerProvider | None = None
    provider: trace.TracerProvider | None = None
    tracer: trace.Tracer | None = None


_NOOP: AbstractContextManager[None] = contextlib.nullcontext()
# the variables that can turn exporting on (tracing_export reads them all)
_SWITCHES = (
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
)
_INERT = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)


def _tracer() -> trace.Tracer | None:
    """This process's DSPex tracer; None while no SDK provider is installed (tracing off)."""
    # the API's global, read directly: get_tracer_provider() looks up os.environ on every
    # call while none is set, which costs more than everything else here together
    provider = _State.override or trace._TRACER_PROVIDER
    if provider is None:
        return None
    if provider is not _State.provider:
        _State.provider = provider
        _State.tracer = None if isinstance(provider, _INERT) else provider.get_tracer("dspex")
    return _State.tracer


def enabled() -> bool:
    """Whether spans are recorded in this process (an SDK tracer provider is installed)."""
    return _tracer() is not None


@contextlib.contextmanager
def use_provider(provider: trace.TracerProvider | None) -> Iterator[None]:
    """DSPex's spans go to ``provider`` inside the block (tests: an in-memory exporter).

    The global provider can be set only once per process; this can be set again.
    """
    before = _State.override
    _State.override = provider
    try:
        yield
    finally:
        _State.override = before


def configure(settings: Settings | None, service_name: str) -> bool:
    """Install an exporting tracer provider from the ``OTEL_*`` variables; True when exporting.

    Call once at process start (the agent processes and the ``dspex`` command do).
    When no exporter is configured nothing is installed and the SDK is not even
    imported. A bad configuration raises ``ConfigError``.
    """
    traces_file = settings.traces_file if settings is not None else None
    if traces_file is None and not any(os.environ.get(name) for name in _SWITCHES):
        return False
    try:
        from dspex.streams.tracing_export import install_from_environment
    except ImportError as exc:  # a client-only install: the API without the SDK
        raise ConfigError(
            f"exporting spans needs the OpenTelemetry SDK ({exc.name} is missing): "
            "pip install opentelemetry-sdk, or 'dspex[server]'"
        ) from exc
    return install_from_environment(service_name, traces_file)


# -- context in headers -------------------------------------------------------------------


class _HeaderGetter(Getter[Sequence[Header]]):
    def get(self, carrier: Sequence[Header], key: str) -> list[str] | None:
        found = [_text(v) for k, v in carrier if k == key and v is not None]
        return found or None

    def keys(self, carrier: Sequence[Header]) -> list[str]:
        return [k for k, _ in carrier]


_GETTER = _HeaderGetter()


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def extract(headers: Sequence[Header]) -> otel_context.Context:
    """The trace context a record's headers carry (an empty context when none)."""
    return propagate.extract(headers, getter=_GETTER)


def inject(headers: Iterable[tuple[str, V]]) -> list[tuple[str, V | bytes]]:
    """``headers`` with the current span's ``traceparent`` (and ``tracestate``) replacing any.

    Unchanged while tracing is off or no span is current, so a forwarded record
    keeps the context it arrived with.
    """
    kept: list[tuple[str, V | bytes]] = list(headers)
    if _tracer() is None:
        return kept
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    if not carrier:
        return kept
    fields = set(carrier) | set(propagate.get_global_textmap().fields)
    kept = [(k, v) for k, v in kept if k not in fields]
    return kept + [(k, v.encode()) for k, v in carrier.items()]


# -- spans ----------------------------------------------------------------------------------


def span(
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, AttributeValue | None] | None = None,
) -> AbstractContextManager[trace.Span | None]:
    """A child span of the current one, current inside the block (None while tracing is off)."""
    tracer = _tracer()
    if tracer is None:
        return _NOOP
    return tracer.start_as_current_span(name, kind=kind, attributes=_clean(attributes))


def producing(
    topic: str, attributes: Mapping[str, AttributeValue | None] | None = None
) -> AbstractContextManager[trace.Span | None]:
    """A ``send <topic>`` PRODUCER span: records produced inside it carry its context."""
    if _tracer() is None:
        return _NOOP
    messaging = {**_messaging(topic, "send"), **(attributes or {})}
    return span(f"send {topic}", kind=SpanKind.PRODUCER, attributes=messaging)


def processing(
    record: ConsumedRecord, *, group: str | None = None
) -> AbstractContextManager[trace.Span | None]:
    """A ``process <topic>`` CONSUMER span continuing the trace in ``record``'s headers.

    Its time in Kafka (the record's timestamp to now) becomes a ``queue <topic>``
    span beside it and the ``dspex.queue.wait_ms`` attribute.
    """
    tracer = _tracer()
    if tracer is None:
        return _NOOP
    return _processing(tracer, record, group)


@contextlib.contextmanager
def _processing(
    tracer: trace.Tracer, record: ConsumedRecord, group: str | None
) -> Iterator[trace.Span]:
    parent = extract(record.headers)
    now = time.time_ns()
    attributes = {
        **_messaging(record.topic, "process"),
        "messaging.destination.partition.id": str(record.partition),
        "messaging.kafka.offset": record.offset,
        "messaging.consumer.group.name": group,
    }
    if record.timestamp_ms is not None:
        queued = min(record.timestamp_ms * 1_000_000, now)  # another host's clock may be ahead
        attributes["dspex.queue.wait_ms"] = (now - queued) / 1e6
        wait = tracer.start_span(
            f"queue {record.topic}", parent, attributes=_clean(attributes), start_time=queued
        )
        wait.end(end_time=now)
    with tracer.start_as_current_span(
        f"process {record.topic}",
        parent,
        kind=SpanKind.CONSUMER,
        attributes=_clean(attributes),
        start_time=now,
    ) as current:
        yield current


def annotate(attributes: Mapping[str, AttributeValue | None]) -> None:
    """Set ``attributes`` (None values left out) on the current span."""
    if _tracer() is None:
        return
    trace.get_current_span().set_attributes(_clean(attributes))


class ErrorLike(Protocol):
    """What :func:`outcome` reads of an error (the agents' ``ErrorInfo`` is one)."""

    @property
    def error_class(self) -> str: ...
    @property
    def message(self) -> str: ...


def outcome(status: str, error: ErrorLike | None = None) -> None:
    """Record a request's final status on the current span (``dspex.status``).

    Any status but ``ok`` marks the span failed: status ERROR and ``error.type``.
    """
    if _tracer() is None:
        return
    current = trace.get_current_span()
    current.set_attribute("dspex.status", status)
    if status != "ok":
        current.set_attribute("error.type", error.error_class if error else status)
        current.set_status(Status(StatusCode.ERROR, error.message if error else status))


class OpenSpan:
    """A span made current until :meth:`close`, for callbacks that start and end in two calls."""

    def __init__(self, opened: trace.Span) -> None:
        self.span = opened
        self._token = otel_context.attach(trace.set_span_in_context(opened))

    def close(self, error: BaseException | None = None) -> None:
        """End the span (failed with ``error`` when given) and restore the previous context."""
        if error is not None:
            self.span.record_exception(error)
            self.span.set_attribute("error.type", type(error).__name__)
            self.span.set_status(Status(StatusCode.ERROR, str(error) or type(error).__name__))
        self.span.end()
        with contextlib.suppress(ValueError):  # closed from another context: nothing to restore
            otel_context.detach(self._token)


def open_span(
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, AttributeValue | None] | None = None,
) -> OpenSpan | None:
    """A child of the current span, current until its :meth:`OpenSpan.close`; None when off."""
    tracer = _tracer()
    if tracer is None:
        return None
    return OpenSpan(tracer.start_span(name, kind=kind, attributes=_clean(attributes)))


# -- semantic conventions -------------------------------------------------------------------


def gen_ai_attributes(
    model: str,
    *,
    operation: str | None = None,
    input_tokens: int | None = None,
    output_tokens: int | None = None,
    **extra: AttributeValue | None,
) -> dict[str, AttributeValue]:
    """OpenTelemetry's ``gen_ai.*`` attributes for a model call or an execution.

    The provider is the LiteLLM-style prefix of the model string (``openai/gpt-4o``
    -> ``openai``; DSPex's own backends -> ``dspex``); ``gen_ai.system`` repeats it
    for back ends that read the older name.
    """
    provider = model.split("/", 1)[0] if "/" in model else None
    return _clean(
        {
            "gen_ai.operation.name": operation,
            "gen_ai.request.model": model,
            "gen_ai.provider.name": provider,
            "gen_ai.system": provider,
            "gen_ai.usage.input_tokens": input_tokens,
            "gen_ai.usage.output_tokens": output_tokens,
            **{f"gen_ai.{key}": value for key, value in extra.items()},
        }
    )


def _messaging(topic: str, operation: str) -> dict[str, AttributeValue]:
    return {
        "messaging.system": "kafka",
        "messaging.operation.name": operation,
        "messaging.operation.type": operation,
        "messaging.destination.name": topic,
    }


def _clean(attributes: Mapping[str, AttributeValue | None] | None) -> dict[str, AttributeValue]:
    return {k: v for k, v in (attributes or {}).items() if v is not None}
