"""Traces without a broker: off by default, context through headers, spans per hop and LM call.

Spans go to the SDK's in-memory exporter through :func:`tracing.use_provider`
(the global provider can be set only once per process). The cross-process
trace is proven in ``tests/integration/test_tracing.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dspy
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from dspex.agents.plumbing.catalog import ProgramCatalog, RoutingCatalog
from dspex.agents.plumbing.messages import Consumed
from dspex.agents.plumbing.publisher import Publisher, serve_deliveries
from dspex.agents.router.cache import ResultCache
from dspex.agents.router.router import RouterApp, RouterHandler
from dspex.agents.runtime import lmtrace
from dspex.agents.runtime.lms import build_lm
from dspex.agents.runtime.lms.base import AsyncEngine, StatelessEngine
from dspex.agents.runtime.runner import run
from dspex.agents.worker.execution import DSPyExecutor
from dspex.agents.worker.handler import Destinations, WorkerHandler
from dspex.schemas.samples import sample
from dspex.streams import tracing, tracing_export
from dspex.streams.errors import ConfigError
from dspex.streams.serde import SingleObjectSerde
from dspex.streams.settings import LMBackend, load_settings
from tests.fakes import FakeProducer, FakeResolver

SERDE = SingleObjectSerde()
POOL_TOPIC = "dspex.pool.general"
TO = Destinations("dspex.responses", "dspex.executions", "dspex.telemetry", "dspex.dlq")
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01".encode()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """DSPex's spans, finished, in memory (tracing on for the test)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with tracing.use_provider(provider):
        yield exporter


def _request(**changes: Any) -> dict[str, Any]:
    request = sample("Request")
    request.update(
        program_id=None,
        signature="question -> answer",
        module_type="ChainOfThought",
        state_json=None,
        module_config_json="{}",
        tools=[],
        stream=False,
        session_id="user-42",
        inputs={"question": json.dumps("What is 2 + 2?")},
        variables={},
    )
    request["route"].update(pool="general", variant="echo")
    request.update(changes)
    return request


def _origin(request: dict[str, Any], headers: tuple[tuple[str, bytes], ...]) -> Consumed:
    value = SERDE.encode("Request", request, topic=POOL_TOPIC)
    return Consumed(POOL_TOPIC, 2, 41, b"key", value, headers, 1_700_000_000_000)


async def _answer(origin: Consumed, producer: FakeProducer) -> None:
    """The worker's handler on ``origin`` inside the consumer loop's span, as in production."""
    settings = load_settings(lm={"default_variant": "echo", "pool_variants": {}})
    publisher = Publisher(producer, SERDE, asyncio.get_running_loop())
    handler = WorkerHandler(
        executor=DSPyExecutor(settings),
        publisher=publisher,
        serde=SERDE,
        destinations=TO,
        pool="general",
        worker_id="w1",
        in_flight=4,
    )
    server = asyncio.create_task(serve_deliveries(publisher))
    try:
        with tracing.processing(origin, group="dspex.pool.general"):
            await asyncio.wait_for(handler.handle(origin), 30)
    finally:
        server.cancel()


def _traceparent(headers: list[tuple[str, Any]]) -> tuple[str, str]:
    (value,) = [v for k, v in headers if k == "traceparent"]
    _, trace_id, span_id, _ = value.decode().split("-")
    return trace_id, span_id


def _hex(span: ReadableSpan) -> tuple[str, str, str | None]:
    """(trace id, span id, parent span id) of a finished span, as hex."""
    context = span.get_span_context()
    assert context is not None
    parent = f"{span.parent.span_id:016x}" if span.parent else None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}", parent


# -- off by default ---------------------------------------------------------------------------


def test_without_otel_variables_no_exporter_and_no_provider_is_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tracing_export, "_installed", [])
    quiet = {"OTEL_SERVICE_NAME": "x", "OTEL_BSP_SCHEDULE_DELAY": "10", "PATH": "/bin"}
    assert tracing_export.make_exporters(quiet, None) == []
    assert tracing_export.install_from_environment("dspex-test", None, environ=quiet) is False
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    assert not tracing.enabled()


async def test_tracing_off_leaves_headers_as_they_came_and_records_nothing() -> None:
    assert not tracing.enabled()
    headers = (("dspex-request-id", b"r1"), ("traceparent", TRACEPARENT))
    assert tracing.inject(headers) == list(headers)
    assert tracing.inject(()) == []
    with tracing.processing(_origin(_request(), headers)) as current:
        assert current is None
    assert tracing.open_span("chat x") is None

    producer = FakeProducer()
    await _answer(_origin(_request(), headers), producer)
    (response,) = producer.raw(TO.responses)
    assert producer.records(TO.responses)[0]["status"] == "ok"
    assert response.headers == []  # nothing added: no traceparent of a span never made
    assert all(p.headers == [] for p in producer.produced)


# -- on ---------------------------------------------------------------------------------------


def test_inject_replaces_a_stale_traceparent_with_the_current_span(
    spans: InMemorySpanExporter,
) -> None:
    headers = [("dspex-request-id", b"r1"), ("traceparent", TRACEPARENT), ("tracestate", b"a=b")]
    with tracing.span("route") as current:
        assert current is not None
        injected = tracing.inject(headers)
    assert injected[0] == ("dspex-request-id", b"r1")
    assert [k for k, _ in injected].count("traceparent") == 1
    assert "tracestate" not in [k for k, _ in injected]  # the stale one is not carried on
    trace_id, span_id = _traceparent(injected)
    (route,) = spans.get_finished_spans()
    assert (trace_id, span_id, None) == _hex(route)
    assert tracing.inject(headers) == headers  # no current span: forwarded as it came


@pytest.mark.parametrize(
    "value", [b"garbage", b"\xff\xfe", None, b"00-" + b"0" * 32 + b"-" + b"0" * 16 + b"-01"]
)
def test_a_malformed_traceparent_starts_a_new_trace_and_never_fails_the_record(
    spans: InMemorySpanExporter, value: bytes | None
) -> None:
    record = Consumed("dspex.requests", 0, 1, b"k", b"v", (("traceparent", value),), None)
    with tracing.processing(record) as current:
        assert current is not None
    (process,) = spans.get_finished_spans()  # no queue span without a timestamp
    assert process.parent is None and process.name == "process dspex.requests"


async def test_a_worker_continues_the_trace_in_its_pool_record(
    spans: InMemorySpanExporter,
) -> None:
    producer = FakeProducer()
    await _answer(_origin(_request(), (("traceparent", TRACEPARENT),)), producer)
    finished = {s.name: s for s in spans.get_finished_spans()}
    process, queue = finished[f"process {POOL_TOPIC}"], finished[f"queue {POOL_TOPIC}"]
    send = finished[f"send {TO.responses}"]
    chats = [s for s in spans.get_finished_spans() if s.name == "chat dspex/echo"]

    assert _hex(process)[0] == CLIENT_TRACE and _hex(process)[2] == CLIENT_SPAN
    assert _hex(queue)[2] == CLIENT_SPAN  # the time in Kafka, beside the processing
    assert queue.start_time == 1_700_000_000_000 * 1_000_000
    assert chats and all(_hex(c)[2] == _hex(process)[1] for c in chats)
    assert _hex(send)[2] == _hex(process)[1]
    assert process.kind == trace.SpanKind.CONSUMER and send.kind == trace.SpanKind.PRODUCER

    attributes: dict[str, Any] = dict(process.attributes or {})
    assert attributes["gen_ai.request.model"] == "dspex/echo"
    assert attributes["gen_ai.provider.name"] == "dspex"
    assert attributes["gen_ai.conversation.id"] == "user-42"
    chat_tokens = [int(str((c.attributes or {})["gen_ai.usage.input_tokens"])) for c in chats]
    assert attributes["gen_ai.usage.input_tokens"] == sum(chat_tokens) > 0
    assert attributes["gen_ai.usage.output_tokens"] > 0
    assert attributes["dspex.status"] == "ok" and attributes["dspex.queue.wait_ms"] > 0
    assert attributes["messaging.destination.name"] == POOL_TOPIC

    (response,) = producer.raw(TO.responses)
    assert _traceparent(response.headers) == _hex(send)[:2]
    (execution,) = producer.raw(TO.executions)
    assert _traceparent(execution.headers) == _hex(process)[:2]


async def test_a_failed_execution_marks_the_worker_span_failed(
    spans: InMemorySpanExporter,
) -> None:
    bad = _request(inputs={"nope": json.dumps(1)})
    await _answer(_origin(bad, (("traceparent", TRACEPARENT),)), FakeProducer())
    (process,) = [s for s in spans.get_finished_spans() if s.name.startswith("process ")]
    assert process.status.status_code == trace.StatusCode.ERROR
    assert dict(process.attributes or {})["error.type"] == "InvalidRequest"


async def test_one_chat_span_per_lm_call_with_its_tokens(spans: InMemorySpanExporter) -> None:
    lm = build_lm(LMBackend(model="dspex/echo"))
    program = dspy.ReAct("question -> answer", tools=[], max_iters=2)
    with tracing.span("execute") as parent:
        assert parent is not None
        result = await run(program, {"question": "hi"}, lm=lm)
    chats = [s for s in spans.get_finished_spans() if s.name == "chat dspex/echo"]
    (execute,) = [s for s in spans.get_finished_spans() if s.name == "execute"]
    assert len(chats) >= 2  # ReAct: a step, then the extraction
    assert all(_hex(c)[2] == _hex(execute)[1] for c in chats)
    tokens = [dict(c.attributes or {}) for c in chats]
    assert sum(int(str(t["gen_ai.usage.input_tokens"])) for t in tokens) == result.usage[0]
    assert {t["gen_ai.operation.name"] for t in tokens} == {"chat"}
    assert all(isinstance(t["gen_ai.request.max_tokens"], int) for t in tokens)


async def test_a_streamed_run_has_its_lm_span_too(spans: InMemorySpanExporter) -> None:
    chunks: list[str] = []

    async def on_chunk(delta: str) -> None:
        chunks.append(delta)

    lm = build_lm(LMBackend(model="dspex/echo"))
    with tracing.span("execute"):
        result = await run(
            dspy.Predict("question -> answer"), {"question": "a b c"}, lm=lm, on_chunk=on_chunk
        )
    execute = next(s for s in spans.get_finished_spans() if s.name == "execute")
    (chat,) = [s for s in spans.get_finished_spans() if s.name == "chat dspex/echo"]
    assert "".join(chunks) == "echo: a b c"  # DSPy's stream ran in its own task
    assert _hex(chat)[2] == _hex(execute)[1]
    tokens = dict(chat.attributes or {})["gen_ai.usage.output_tokens"]
    assert tokens == result.usage.completion_tokens > 0


async def test_a_failing_lm_call_ends_its_span_failed(spans: InMemorySpanExporter) -> None:
    class Down(StatelessEngine):
        def complete(self, request: Any) -> Any:
            raise RuntimeError("backend down")

    class AsyncDown(AsyncEngine[Down]):
        async def complete(self, request: Any) -> Any:
            return self.sync.complete(request)

    engine = Down()
    broken = dspy.LM("x/broken", engine=engine, async_engine=AsyncDown(engine), num_retries=0)
    with pytest.raises(Exception, match="backend down"):
        await run(dspy.Predict("question -> answer"), {"question": "hi"}, lm=broken)
    (chat,) = [s for s in spans.get_finished_spans() if s.name == "chat x/broken"]
    assert chat.status.status_code == trace.StatusCode.ERROR
    assert "backend down" in str(chat.status.description)
    assert dict(chat.attributes or {})["error.type"]  # DSPy's class for it (LMUnexpectedError)


def test_without_tracing_track_usage_adds_no_dspy_callback() -> None:
    before = list(dspy.settings.get("callbacks") or [])
    with lmtrace.track_usage():
        assert list(dspy.settings.get("callbacks") or []) == before


async def _route(
    record: Consumed, producer: FakeProducer, cache: ResultCache | None = None
) -> None:
    """The router's handling of ``record`` inside the consumer loop's span (its sending parts)."""
    settings = load_settings(lm={"default_variant": "echo", "pool_variants": {}})
    router = RouterApp.__new__(RouterApp)  # no broker: the handler and the sending parts
    router.handler = RouterHandler(
        settings,
        SERDE,
        programs=ProgramCatalog(),
        routing=RoutingCatalog(),
        resolver=FakeResolver(),
        cache=cache if cache is not None else ResultCache(),
    )
    router._retry_topic, router._own_topics = "dspex.retry", frozenset({"dspex.pool.general"})
    router._publisher = Publisher(producer, SERDE, asyncio.get_running_loop())
    server = asyncio.create_task(serve_deliveries(router._publisher))
    try:
        with tracing.processing(record, group="dspex.router"):
            await asyncio.wait_for(router.handle(record), 10)
    finally:
        server.cancel()


def _request_bytes(request_id: str, question: str) -> bytes:
    """A client's Request record, as the router consumes it."""
    request = {
        "request_id": request_id,
        "created_at": int(time.time() * 1000),
        "signature": "question -> answer",
        "inputs": {"question": json.dumps(question)},
    }
    return SERDE.encode("Request", request, topic="dspex.requests")


async def test_the_router_forwards_its_decision_span_and_a_retry_continues_the_trace(
    spans: InMemorySpanExporter,
) -> None:
    value = _request_bytes("r-1", "hi")
    client = (("dspex-request-id", b"r-1"), ("traceparent", TRACEPARENT))
    producer = FakeProducer()
    await _route(Consumed("dspex.requests", 0, 7, b"r-1", value, client, None), producer)
    (route,) = spans.get_finished_spans()
    (forwarded,) = producer.raw("dspex.pool.general")
    assert _hex(route)[0::2] == (CLIENT_TRACE, CLIENT_SPAN)
    assert dict(route.attributes or {})["dspex.pool"] == "general"
    assert _traceparent(forwarded.headers) == _hex(route)[:2]  # the client's is replaced
    assert ("dspex-request-id", b"r-1") in forwarded.headers

    worker_span = "b7ad6b7169203331"
    retry = (
        ("traceparent", f"00-{CLIENT_TRACE}-{worker_span}-01".encode()),
        ("dspex-attempt", b"2"),
        ("dspex-retry-pool", b"general"),
        ("dspex-not-before", b"0"),
    )
    await _route(Consumed("dspex.retry", 0, 3, b"r-1", value, retry, None), producer)
    retried = producer.raw("dspex.pool.general")[-1]
    (retrier,) = [s for s in spans.get_finished_spans() if s.name == "process dspex.retry"]
    assert _hex(retrier)[0::2] == (CLIENT_TRACE, worker_span)
    assert _traceparent(retried.headers) == _hex(retrier)[:2]


async def test_a_cache_hit_is_answered_under_the_routers_span(
    spans: InMemorySpanExporter,
) -> None:
    value = _request_bytes("r-3", "2+2?")
    client = (("traceparent", TRACEPARENT),)
    cache, producer = ResultCache(), FakeProducer()
    await _route(Consumed("dspex.requests", 0, 1, b"r-3", value, client, None), producer, cache)
    key = producer.records("dspex.pool.general")[0]["route"]["cache_key"]
    answer = {"request_id": "r-3", "status": "ok", "outputs": {"answer": '"4"'}, "produced_at": 1}
    cache.apply(key, SERDE.decode(SERDE.encode("Response", answer, topic="t"), topic="t").record)
    await _route(Consumed("dspex.requests", 0, 2, b"r-3", value, client, None), producer, cache)
    hit = spans.get_finished_spans()[-1]
    (response,) = producer.raw("dspex.responses")
    assert producer.records("dspex.responses")[0]["cached"] is True
    assert dict(hit.attributes or {})["dspex.cache_hit"] is True
    assert _hex(hit)[0::2] == (CLIENT_TRACE, CLIENT_SPAN)
    assert _traceparent(response.headers) == _hex(hit)[:2]


async def test_a_rejected_request_fails_the_routers_span(spans: InMemorySpanExporter) -> None:
    bad = {"request_id": "r-2", "created_at": int(time.time() * 1000), "signature": "q -> -> a"}
    value = SERDE.encode("Request", bad, topic="t")
    rejected = Consumed("dspex.requests", 0, 8, b"r-2", value, (("traceparent", TRACEPARENT),))
    producer = FakeProducer()
    await _route(rejected, producer)
    (route,) = spans.get_finished_spans()
    assert route.status.status_code == trace.StatusCode.ERROR
    (response,) = producer.raw("dspex.responses")
    assert _traceparent(response.headers) == _hex(route)[:2]


# -- exporters from OTEL_* ----------------------------------------------------------------------


def test_the_exporters_the_environment_names(tmp_path: Path) -> None:
    make = tracing_export.make_exporters
    file = tmp_path / "spans.jsonl"
    (jsonl,) = make({}, file)
    assert isinstance(jsonl, tracing_export.JsonLinesExporter) and jsonl.path == file
    (console,) = make({"OTEL_TRACES_EXPORTER": "console"}, None)
    assert isinstance(console, ConsoleSpanExporter)
    both = make({"OTEL_TRACES_EXPORTER": "jsonl, console"}, file)
    assert [type(e).__name__ for e in both] == ["JsonLinesExporter", "ConsoleSpanExporter"]
    assert make({"OTEL_TRACES_EXPORTER": "none"}, None) == []
    assert make({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}, file) == []


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OTEL_TRACES_EXPORTER": "jsonl"}, "OTEL_TRACES_EXPORTER=jsonl needs a file"),
        ({"OTEL_TRACES_EXPORTER": "zipkinx"}, "OTEL_TRACES_EXPORTER=zipkinx: unknown exporter"),
        (
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon", "OTEL_TRACES_EXPORTER": "otlp"},
            "DSPex",
        ),
    ],
)
def test_a_bad_exporter_configuration_is_refused_naming_the_variable(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        tracing_export.make_exporters(env, None)


def test_an_otlp_endpoint_alone_asks_for_otlp(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    (otlp,) = tracing_export.make_exporters(env, None)  # the otlp extra is in the dev install
    assert type(otlp).__module__ == "opentelemetry.exporter.otlp.proto.http.trace_exporter"
    monkeypatch.setattr(tracing_export, "import_module", _missing)
    with pytest.raises(ConfigError, match=r"pip install 'dspex\[otlp\]'"):
        tracing_export.make_exporters(env, None)
    exported = tracing_export.make_exporters({**env, "OTEL_TRACES_EXPORTER": "console"}, None)
    assert [type(e).__name__ for e in exported] == ["ConsoleSpanExporter"]


def _missing(name: str) -> Any:
    raise ModuleNotFoundError(f"No module named {name!r}")


def test_the_jsonl_exporter_appends_one_line_per_span(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "spans.jsonl"
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(tracing_export.JsonLinesExporter(path)))
    with tracing.use_provider(provider):
        with tracing.span("outer", attributes={"a": 1, "gone": None}):
            with tracing.producing("dspex.requests", {"dspex.request_id": "r1"}):
                pass
    inner, outer = (json.loads(line) for line in path.read_text().splitlines())
    assert (inner["name"], outer["name"]) == ("send dspex.requests", "outer")
    assert inner["trace_id"] == outer["trace_id"] and inner["parent_span_id"] == outer["span_id"]
    assert outer["parent_span_id"] is None and outer["attributes"] == {"a": 1}
    assert inner["kind"] == "PRODUCER" and inner["attributes"]["messaging.system"] == "kafka"
    assert inner["service"] == outer["service"] and inner["end_ns"] >= inner["start_ns"]


def test_an_application_that_installs_its_own_provider_turns_dspex_tracing_on() -> None:
    script = (
        "from opentelemetry import trace\n"
        "from opentelemetry.sdk.trace import TracerProvider\n"
        "from dspex.streams import tracing\n"
        "before = tracing.enabled(), tracing.inject([('k', b'v')])\n"
        "trace.set_tracer_provider(TracerProvider())\n"
        "with tracing.span('app'):\n"
        "    after = tracing.enabled(), [k for k, _ in tracing.inject([('k', b'v')])]\n"
        "print(before, after)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "(False, [('k', b'v')]) (True, ['k', 'traceparent'])"


def test_with_nothing_configured_the_sdk_is_not_even_imported() -> None:
    script = (
        "import sys\n"
        "from dspex.streams import tracing\n"
        "print(tracing.configure(None, 'dspex-x'), 'opentelemetry.sdk.trace' in sys.modules)\n"
    )
    quiet = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "DSPEX_"))}
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env=quiet,
    )
    assert done.stdout.strip() == "False False"


async def test_each_pipeline_stage_request_is_sent_in_a_stage_span_under_the_run(
    spans: InMemorySpanExporter,
) -> None:
    from dspex.agents.pipeline.agent import PipelineApp
    from tests.unit.test_pipeline_run import chain, run_of

    settings = load_settings()
    app = PipelineApp(settings, app_id="test-pipeline")
    producer = FakeProducer()
    app._publisher = Publisher(producer, SERDE, asyncio.get_running_loop())
    run = run_of(chain(), {"q": "hi", "items": ["x", "y"]})
    server = asyncio.create_task(serve_deliveries(app._publisher))
    try:
        with tracing.span("process run"):
            await asyncio.wait_for(app._issue(run, run.advance(2_000)), 10)
    finally:
        server.cancel()
    finished = {span.name: span for span in spans.get_finished_spans()}
    run_span = _hex(finished["process run"])
    stage_spans = {name: _hex(span) for name, span in finished.items() if name.startswith("stage ")}
    assert stage_spans and all(s[2] == run_span[1] for s in stage_spans.values())
    sent = [_traceparent(list(m.headers)) for m in producer.raw(app._topics.name("requests"))]
    assert sorted(span_id for _, span_id in sent) == sorted(s[1] for s in stage_spans.values())
    assert {trace_id for trace_id, _ in sent} == {run_span[0]}
