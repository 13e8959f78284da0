"""Exporting spans as the standard ``OTEL_*`` variables say (``tracing.configure``).

Exporting is on when any of these is set (else nothing is installed: the API's
no-op tracer stays, at almost no cost):

- ``OTEL_TRACES_EXPORTER``: a comma-separated list of ``otlp`` (OTLP over
  ``http/protobuf``, or ``grpc`` when ``OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL`` says so;
  needs ``pip install 'dspex[otlp]'``), ``console`` (the SDK's, to stdout), ``jsonl``
  (DSPex's: one JSON object per span, appended to the file ``traces_file`` /
  ``DSPEX_TRACES_FILE`` names), ``none``, or any ``opentelemetry_traces_exporter``
  entry point an installed package provides;
- ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` alone: ``otlp``;
- the ``traces_file`` setting alone: ``jsonl``.

``OTEL_SDK_DISABLED=true`` turns all of it off. The SDK reads the rest itself
(``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``,
``OTEL_BSP_*``, ``OTEL_EXPORTER_OTLP_*``, ``OTEL_PROPAGATORS``). Spans leave through
a ``BatchSpanProcessor``, flushed when the process exits.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from importlib import import_module
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)

from dspex.streams.errors import ConfigError

logger = logging.getLogger(__name__)

_OTLP_MODULES = {
    "http/protobuf": "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "grpc": "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
}
_installed: list[bool] = []  # configure once per process: the global provider is set once


def install_from_environment(
    service_name: str,
    traces_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> bool:
    """Install the global tracer provider the environment asks for; True when exporting."""
    if _installed:
        return _installed[0]
    env = os.environ if environ is None else environ
    exporters = make_exporters(env, traces_file)
    if exporters:
        provider = TracerProvider(resource=_resource(service_name))
        for exporter in exporters:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        names = ",".join(type(e).__name__ for e in exporters)
        logger.info("tracing on service=%s exporters=%s", service_name, names)
    _installed.append(bool(exporters))
    return bool(exporters)


def make_exporters(env: Mapping[str, str], traces_file: Path | None) -> list[SpanExporter]:
    """The exporters ``env`` (and the ``traces_file`` setting) configure; [] when none."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",")]
    names = [n for n in names if n]
    if not names:
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        names = ["otlp"] if endpoint else []
        names += ["jsonl"] if traces_file is not None else []
    return [_exporter(name, env, traces_file) for name in names if name != "none"]


def _exporter(name: str, env: Mapping[str, str], traces_file: Path | None) -> SpanExporter:
    if name == "jsonl":
        if traces_file is None:
            raise ConfigError(
                "OTEL_TRACES_EXPORTER=jsonl needs a file: set DSPEX_TRACES_FILE (traces_file)"
            )
        return JsonLinesExporter(traces_file)
    if name == "console":
        return ConsoleSpanExporter()
    if name == "otlp":
        return _otlp(env)
    found = entry_points(group="opentelemetry_traces_exporter", name=name)
    if not found:
        raise ConfigError(
            f"OTEL_TRACES_EXPORTER={name}: unknown exporter (otlp, console, jsonl, none, "
            "or an installed opentelemetry_traces_exporter entry point)"
        )
    exporter: SpanExporter = next(iter(found)).load()()
    return exporter


def _otlp(env: Mapping[str, str]) -> SpanExporter:
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    module_name = _OTLP_MODULES.get(protocol)
    if module_name is None:
        raise ConfigError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol}: DSPex exports http/protobuf or grpc"
        )
    try:
        module = import_module(module_name)
    except ImportError as exc:
        package = "opentelemetry-exporter-otlp-proto-" + protocol.partition("/")[0]
        raise ConfigError(
            f"OTEL_TRACES_EXPORTER=otlp ({protocol}) needs {package}: pip install 'dspex[otlp]'"
        ) from exc
    exporter: SpanExporter = module.OTLPSpanExporter()
    return exporter


def _resource(service_name: str) -> Resource:
    """The SDK's resource from the environment, named ``service_name`` unless it names itself."""
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    return resource


class JsonLinesExporter(SpanExporter):
    """Appends one JSON object per finished span to a file (``OTEL_TRACES_EXPORTER=jsonl``).

    Each batch is one ``write`` to a file opened for appending, so processes that
    share the file never interleave inside a line. Fields: ``name``, ``trace_id``,
    ``span_id``, ``parent_span_id`` (hex; null for a root), ``kind``, ``start_ns``,
    ``end_ns``, ``status``, ``status_message``, ``attributes``, ``events``,
    ``service`` (``service.name``) and ``resource``.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch()
        except OSError as exc:
            raise ConfigError(f"traces_file={self.path}: cannot write: {exc}") from exc

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        text = "".join(json.dumps(span_record(s), default=str) + "\n" for s in spans)
        try:
            with self._lock, self.path.open("a", encoding="utf-8") as out:
                out.write(text)
        except OSError:
            logger.warning("spans not written path=%s", self.path, exc_info=True)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


def span_record(span: ReadableSpan) -> dict[str, Any]:
    """One finished span as plain JSON data (the ``jsonl`` exporter's line)."""
    context = span.get_span_context()
    parent = span.parent
    resource = dict(span.resource.attributes)
    return {
        "name": span.name,
        "trace_id": f"{context.trace_id:032x}" if context else None,
        "span_id": f"{context.span_id:016x}" if context else None,
        "parent_span_id": f"{parent.span_id:016x}" if parent else None,
        "kind": span.kind.name,
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "status_message": span.status.description,
        "attributes": dict(span.attributes or {}),
        "events": [
            {"name": e.name, "time_ns": e.timestamp, "attributes": dict(e.attributes or {})}
            for e in span.events
        ],
        "service": resource.get(SERVICE_NAME),
        "resource": resource,
    }
