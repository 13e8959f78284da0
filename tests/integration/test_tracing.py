"""One request, one trace, across real processes on a real broker.

The router and a general-pool worker run as ``python -m dspex.agents`` processes
(:mod:`tests.integration.stack`) configured only through the environment:
``OTEL_TRACES_EXPORTER=jsonl`` and ``DSPEX_TRACES_FILE`` (each process appends its
spans to one JSON-lines file), ``OTEL_BSP_SCHEDULE_DELAY`` so they flush quickly.
This test process is the application: it records its own spans (the client's
``send``) with the SDK's in-memory exporter. The worker runs a ReAct program on
the echo **simulation**, so one request makes several LM calls.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from dspex.streams import tracing
from dspex.streams.client.client import AsyncClient, Client, Program
from dspex.streams.ops.admin import TopicReport
from dspex.streams.settings import Settings, load_settings
from dspex.streams.tracing_export import span_record
from tests.integration.stack import Stack

SPANS_TIMEOUT_S = 90.0  # generous: a busy shared machine
StartStack = Callable[[Settings, Sequence[str]], Stack]


@pytest.fixture
def start_stack(
    create_topics: Callable[[], list[TopicReport]], tmp_path: Path
) -> Iterator[StartStack]:
    stacks: list[Stack] = []

    def start(settings: Settings, pools: Sequence[str]) -> Stack:
        create_topics()
        stacks.append(Stack(settings, pools, tmp_path))
        stacks[-1].start()
        return stacks[-1]

    yield start
    for stack in stacks:
        stack.stop()
    assert all(code == 0 for s in stacks for code in s.exit_codes.values())


def _echo(settings: Settings, **more: Any) -> Settings:
    """The test's broker and prefix, every pool on the echo simulation."""
    return load_settings(
        kafka={"bootstrap_servers": settings.kafka.bootstrap_servers},
        topics={"prefix": settings.topics.prefix},
        lm={"pool_variants": {}},
        **more,
    )


def _application() -> tuple[InMemorySpanExporter, TracerProvider]:
    """The application's own tracing (service ``shop``): its spans kept in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource({SERVICE_NAME: "shop"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter, provider


def _read_spans(path: Path) -> list[dict[str, Any]]:
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.splitlines() if line]


def _wait_for(path: Path, trace_id: str, names: set[str], stack: Stack) -> list[dict[str, Any]]:
    """The file's spans of ``trace_id`` once every name in ``names`` is among them."""
    deadline = time.monotonic() + SPANS_TIMEOUT_S
    while True:
        spans = [s for s in _read_spans(path) if s["trace_id"] == trace_id]
        if names <= {s["name"] for s in spans}:
            return spans
        stack.check_alive()
        if time.monotonic() > deadline:
            seen = sorted(s["name"] for s in spans)
            raise AssertionError(f"spans {sorted(names)} not all written; seen {seen}")
        time.sleep(0.2)


def _one(spans: list[dict[str, Any]], name: str, service: str) -> dict[str, Any]:
    found = [s for s in spans if s["name"] == name and s["service"] == service]
    assert len(found) == 1, (name, service, [(s["name"], s["service"]) for s in spans])
    return found[0]


async def test_one_request_is_one_connected_trace_across_client_router_and_worker(
    settings: Settings,
    start_stack: StartStack,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spans_file = tmp_path / "spans.jsonl"
    settings = _echo(settings, traces_file=spans_file)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "jsonl")  # the processes inherit these
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    stack = start_stack(settings, ["general"])
    prefix = settings.topics.prefix

    exporter, provider = _application()
    program = Program.inline("question -> answer", module_type="ReAct", tools=("word_count",))
    question = f"Who traced it? {uuid.uuid4().hex[:6]}"
    with tracing.use_provider(provider):
        async with AsyncClient(settings) as client:
            with tracing.span("checkout"):  # the application's own span
                result = await client.submit(program, {"question": question}, deadline_s=60)
    assert result.outputs["answer"] == f"echo: {question}"

    local = [span_record(s) for s in exporter.get_finished_spans()]
    app = _one(local, "checkout", "shop")
    send = _one(local, f"send {prefix}requests", "shop")
    trace_id = app["trace_id"]
    expected = {
        f"process {prefix}requests",
        f"queue {prefix}requests",
        f"process {prefix}pool.general",
        f"queue {prefix}pool.general",
        f"send {prefix}responses",
        "chat dspex/echo",
    }
    remote = _wait_for(spans_file, trace_id, expected, stack)
    spans = local + remote

    route = _one(spans, f"process {prefix}requests", "dspex-router")
    route_wait = _one(spans, f"queue {prefix}requests", "dspex-router")
    execute = _one(spans, f"process {prefix}pool.general", "dspex-worker")
    pool_wait = _one(spans, f"queue {prefix}pool.general", "dspex-worker")
    answer = _one(spans, f"send {prefix}responses", "dspex-worker")
    chats = [s for s in spans if s["name"] == "chat dspex/echo"]
    services = Counter(s["service"] for s in spans)
    print(
        f"\ntrace {trace_id}: {len(spans)} spans {dict(services)}; queue wait "
        f"router {route_wait['attributes']['dspex.queue.wait_ms']:.1f} ms, "
        f"pool {pool_wait['attributes']['dspex.queue.wait_ms']:.1f} ms; "
        f"{len(chats)} LM calls"
    )

    assert {s["trace_id"] for s in spans} == {trace_id}
    parent = {s["span_id"]: s["parent_span_id"] for s in spans}
    assert [s["name"] for s in spans if s["parent_span_id"] not in parent] == ["checkout"]
    assert app["parent_span_id"] is None  # one root: every other span hangs from it
    assert send["parent_span_id"] == app["span_id"] and send["kind"] == "PRODUCER"
    assert route["parent_span_id"] == route_wait["parent_span_id"] == send["span_id"]
    assert execute["parent_span_id"] == pool_wait["parent_span_id"] == route["span_id"]
    assert len(chats) >= 2  # ReAct: a step, then the extraction
    assert {c["parent_span_id"] for c in chats} == {execute["span_id"]}
    assert answer["parent_span_id"] == execute["span_id"] and answer["kind"] == "PRODUCER"

    assert route["attributes"]["dspex.pool"] == "general"
    assert route["kind"] == execute["kind"] == "CONSUMER"
    worker = execute["attributes"]
    assert worker["gen_ai.request.model"] == "dspex/echo"
    assert worker["gen_ai.provider.name"] == worker["gen_ai.system"] == "dspex"
    assert worker["dspex.status"] == "ok" and execute["status"] != "ERROR"
    per_call = [c["attributes"] for c in chats]
    assert all(c["gen_ai.usage.input_tokens"] > 0 for c in per_call)
    assert worker["gen_ai.usage.input_tokens"] == sum(
        c["gen_ai.usage.input_tokens"] for c in per_call
    )
    assert worker["gen_ai.usage.output_tokens"] == sum(
        c["gen_ai.usage.output_tokens"] for c in per_call
    )

    # the blocking Client runs the AsyncClient on its own thread: the caller's span still leads
    other = f"Who else? {uuid.uuid4().hex[:6]}"
    with tracing.use_provider(provider), Client(settings) as blocking:
        with tracing.span("checkout-blocking") as outer:
            assert outer is not None
            blocking.submit(program, {"question": other}, deadline_s=60)
    second = [span_record(s) for s in exporter.get_finished_spans()]
    root = _one(second, "checkout-blocking", "shop")
    (sent,) = [
        s
        for s in second
        if s["name"] == f"send {prefix}requests" and s["trace_id"] == root["trace_id"]
    ]
    assert sent["parent_span_id"] == root["span_id"]
    spans = _wait_for(spans_file, root["trace_id"], expected, stack)
    assert (
        _one(spans, f"process {prefix}requests", "dspex-router")["parent_span_id"]
        == sent["span_id"]
    )


class _Collector(ThreadingHTTPServer):
    """A minimal OTLP/HTTP trace receiver on loopback: keeps every span it is sent."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _CollectorHandler)
        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def received(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.spans)


class _CollectorHandler(BaseHTTPRequestHandler):
    server: _Collector

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        request = ExportTraceServiceRequest.FromString(body)
        with self.server.lock:
            self.server.spans += list(_otlp_spans(request)) if self.path == "/v1/traces" else []
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return None


def _otlp_spans(request: ExportTraceServiceRequest) -> Iterator[dict[str, Any]]:
    for resource_spans in request.resource_spans:
        resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                yield {
                    "name": span.name,
                    "trace_id": span.trace_id.hex(),
                    "span_id": span.span_id.hex(),
                    "parent_span_id": span.parent_span_id.hex() or None,
                    "service": resource.get("service.name"),
                    "attributes": {a.key: a.value for a in span.attributes},
                }


@pytest.fixture
def collector() -> Iterator[_Collector]:
    server = _Collector()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


async def test_with_an_otlp_endpoint_the_processes_export_the_trace_over_otlp(
    settings: Settings,
    start_stack: StartStack,
    collector: _Collector,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = _echo(settings)
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint)  # this alone: OTLP
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    stack = start_stack(settings, ["general"])
    prefix = settings.topics.prefix

    exporter, provider = _application()
    question = f"Who sent it? {uuid.uuid4().hex[:6]}"
    with tracing.use_provider(provider):
        async with AsyncClient(settings) as client:
            await client.submit(Program.inline("question -> answer"), {"question": question})
    (send,) = [span_record(s) for s in exporter.get_finished_spans()]

    names = {f"process {prefix}requests", f"process {prefix}pool.general", "chat dspex/echo"}
    deadline = time.monotonic() + SPANS_TIMEOUT_S
    while True:
        spans = [s for s in collector.received() if s["trace_id"] == send["trace_id"]]
        if names <= {s["name"] for s in spans}:
            break
        stack.check_alive()
        assert time.monotonic() < deadline, f"not received over OTLP: {collector.received()}"
        time.sleep(0.2)
    print(f"\nOTLP: {len(collector.received())} spans received, {len(spans)} in the trace")
    route = _one(spans, f"process {prefix}requests", "dspex-router")
    execute = _one(spans, f"process {prefix}pool.general", "dspex-worker")
    chat = _one(spans, "chat dspex/echo", "dspex-worker")
    assert route["parent_span_id"] == send["span_id"]
    assert execute["parent_span_id"] == route["span_id"]
    assert chat["parent_span_id"] == execute["span_id"]
    assert execute["attributes"]["gen_ai.request.model"].string_value == "dspex/echo"
    assert chat["attributes"]["gen_ai.usage.input_tokens"].int_value > 0
