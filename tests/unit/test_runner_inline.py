"""Inline LM calls: run() on a non-blocking LM makes no thread hop and gives the same results."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import dspy
import pytest
from dspy.lm15 import Message, Request, Response, TextPart, TransportError, Usage

from dspex.agents.runtime.lms import build_lm
from dspex.agents.runtime.lms.base import ECHO_MODEL, InlineLM
from dspex.agents.runtime.lms.echo import EchoEngine, EchoLM
from dspex.agents.runtime.programs import ProgramBuilder, ProgramSpec, RunResult, run
from dspex.agents.runtime.tools import default_tools
from dspex.streams.errors import ProgramError
from dspex.streams.settings import LMBackend

SIGNATURE = "question -> answer, confidence: float, ideas: list[str]"
QUESTION = {"question": "what is the capital of France"}
ANSWER = "echo: what is the capital of France"
MODULES = [
    ("Predict", "{}", ()),
    ("ChainOfThought", "{}", ()),
    ("BestOfN", '{"N": 2}', ()),
    ("Refine", '{"N": 2}', ()),
    ("ReAct", '{"max_iters": 3}', ("calculator",)),
]


@pytest.fixture(autouse=True)
def _no_dspy_cache() -> None:
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)


@pytest.fixture
def thread_hops(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the functions DSPy sends to ``asyncio.to_thread`` (still run)."""
    hops: list[str] = []
    real = asyncio.to_thread

    async def counted(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        hops.append(getattr(func, "__name__", repr(func)))
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", counted)
    return hops


def build(module_type: str = "Predict", config: str = "{}", tools: tuple[str, ...] = ()) -> Any:
    spec = ProgramSpec(SIGNATURE, module_type, module_config_json=config, tools=tools)
    return ProgramBuilder(default_tools()).build(spec)


def awaited_echo() -> EchoLM:
    """An EchoLM that is not inline (a tiny latency): DSPy's async path, same answers."""
    return EchoLM(latency_s=1e-6)


class ScriptedLM(InlineLM):
    """A test LM on any sync engine; ``inline=False`` forces DSPy's async call."""

    def __init__(self, engine: Any, *, inline: bool = True) -> None:
        super().__init__(
            "dspex-test/scripted",
            engine=engine,
            async_engine=_AsyncOf(engine),
            cache=False,
            num_retries=0,
        )
        self.latency_s = 0.0 if inline else 1e-6


class _AsyncOf:
    def __init__(self, sync: Any) -> None:
        self.sync = sync

    async def complete(self, request: Request) -> Response:
        return self.sync.complete(request)


class CountingEngine(EchoEngine):
    """EchoLM's engine, counting its completions."""

    def __init__(self) -> None:
        self.calls = 0

    def complete(self, request: Request) -> Response:
        self.calls += 1
        return super().complete(request)


class FixedEngine:
    """Replies ``text`` to every request."""

    def __init__(self, text: str) -> None:
        self.text = text

    def complete(self, request: Request) -> Response:
        return Response(
            id=None,
            model="dspex-test/scripted",
            message=Message.assistant((TextPart(self.text),)),
            finish_reason="stop",
            usage=Usage(input_tokens=1, output_tokens=1, total_tokens=2),
        )


class FailingEngine:
    def complete(self, request: Request) -> Response:
        raise TransportError("no route to host")


# --- which LMs are inline ------------------------------------------------------------------


def test_only_non_blocking_lms_are_inline() -> None:
    assert EchoLM().dspex_inline is True
    assert EchoLM().copy(rollout_id=1, temperature=1.0).dspex_inline is True  # BestOfN's copies
    assert EchoLM(latency_s=0.1).dspex_inline is False
    assert EchoLM(cache=True).dspex_inline is False
    assert EchoLM().copy(cache=True).dspex_inline is False
    assert EchoLM().copy(num_retries=2).dspex_inline is False  # retries sleep between attempts
    assert build_lm(LMBackend(model="dspex/echo")).dspex_inline is True
    assert build_lm(LMBackend(model="dspex/sim?task=upper")).dspex_inline is True
    assert build_lm(LMBackend(model="dspex/sim?task=upper&fail=1")).dspex_inline is True
    assert build_lm(LMBackend(model="dspex/sim?delay=0.5")).dspex_inline is False
    assert getattr(build_lm(LMBackend(model="dspex/llama-cpp")), "dspex_inline", False) is False
    remote = build_lm(LMBackend(model="openai/gpt-4o-mini", api_base="http://127.0.0.1:1/v1"))
    assert getattr(remote, "dspex_inline", False) is False


class OwnEngines(EchoLM):
    """An EchoLM subclass building its own engines (whose sync and async may differ)."""

    def __init__(self) -> None:
        dspy.LM.__init__(self, ECHO_MODEL, engine=EchoEngine(), cache=False, num_retries=0)


def test_a_subclass_with_engines_of_its_own_is_not_inline() -> None:
    assert OwnEngines().dspex_inline is False


# --- which path ------------------------------------------------------------------------------


@pytest.mark.parametrize("module_type", ["Predict", "ChainOfThought", "BestOfN", "ReAct"])
async def test_inline_lm_takes_no_thread_hop(module_type: str, thread_hops: list[str]) -> None:
    tools = ("calculator",) if module_type == "ReAct" else ()
    result = await run(build(module_type, tools=tools), QUESTION, lm=EchoLM())
    assert result.outputs["answer"] == ANSWER
    assert thread_hops == []


async def test_non_inline_lm_keeps_the_async_path(thread_hops: list[str]) -> None:
    result = await run(build(), QUESTION, lm=awaited_echo())
    assert result.outputs["answer"] == ANSWER
    assert "prepare" in thread_hops


# --- same results ----------------------------------------------------------------------------


@pytest.mark.parametrize(("module_type", "config", "tools"), MODULES)
async def test_inline_matches_the_async_path(
    module_type: str, config: str, tools: tuple[str, ...]
) -> None:
    inline = await run(build(module_type, config, tools), QUESTION, lm=EchoLM())
    awaited = await run(build(module_type, config, tools), QUESTION, lm=awaited_echo())
    assert inline == awaited
    assert inline.outputs["answer"] == ANSWER and inline.outputs["confidence"] == 0.5
    assert inline.usage.total_tokens > 0 and inline.trace


# --- errors ----------------------------------------------------------------------------------


async def _raised(lm: dspy.BaseLM, module_type: str = "Predict") -> BaseException:
    with pytest.raises(Exception) as caught:
        await run(build(module_type), QUESTION, lm=lm)
    return caught.value


@pytest.mark.parametrize(
    ("engine", "expected"),
    [(FailingEngine(), dspy.LMError), (FixedEngine("no fields here"), ProgramError)],
)
@pytest.mark.parametrize("module_type", ["Predict", "BestOfN"])
async def test_errors_are_the_async_paths(
    engine: Any, expected: type[Exception], module_type: str, thread_hops: list[str]
) -> None:
    inline = await _raised(ScriptedLM(engine), module_type)
    assert thread_hops == []
    awaited = await _raised(ScriptedLM(engine, inline=False), module_type)
    assert isinstance(inline, expected)
    assert type(inline) is type(awaited) and str(inline) == str(awaited)


async def test_simulated_outage_raises_the_same_lm_error() -> None:
    inline = build_lm(LMBackend(model="dspex/sim?task=echo&fail=1000000"))
    awaited = build_lm(LMBackend(model="dspex/sim?task=echo&fail=1000000&delay=0.000001"))
    assert inline.dspex_inline and not awaited.dspex_inline
    raised = [await _raised(lm) for lm in (inline, awaited)]
    assert all(isinstance(exc, dspy.LMError) for exc in raised)
    assert type(raised[0]) is type(raised[1])


async def test_an_expired_deadline_times_out_before_the_inline_call() -> None:
    engine = CountingEngine()
    for timeout_s in (0.0, -1.0):
        with pytest.raises(TimeoutError):
            await run(build(), QUESTION, lm=ScriptedLM(engine), timeout_s=timeout_s)
    assert engine.calls == 0
    result = await run(build(), QUESTION, lm=ScriptedLM(engine), timeout_s=5.0)
    assert result.outputs["answer"] == ANSWER


# --- streaming -------------------------------------------------------------------------------


async def _streamed(module: Any, lm: dspy.BaseLM) -> tuple[RunResult, list[str]]:
    chunks: list[str] = []

    async def on_chunk(text: str) -> None:
        chunks.append(text)

    return await run(module, QUESTION, lm=lm, on_chunk=on_chunk), chunks


async def test_streaming_keeps_dspys_async_call_and_streams_the_answer() -> None:
    result, chunks = await _streamed(build(), EchoLM())
    assert len(chunks) > 1
    assert "".join(chunks) == result.outputs["answer"] == ANSWER
    assert result == await run(build(), QUESTION, lm=EchoLM())


async def test_no_text_output_runs_inline_and_streams_the_last_output_whole(
    thread_hops: list[str],
) -> None:
    spec = ProgramSpec("question -> confidence: float, ideas: list[str]")
    module = ProgramBuilder(default_tools()).build(spec)
    result, chunks = await _streamed(module, EchoLM())
    assert result.outputs["confidence"] == 0.5
    assert chunks == [json.dumps(result.outputs["ideas"])] and thread_hops == []


async def test_an_empty_required_output_is_an_error_not_a_silent_success() -> None:
    text = "[[ ## answer ## ]]\n  \n\n[[ ## confidence ## ]]\n0.5\n\n[[ ## ideas ## ]]\n[]\n"
    raised = await _raised(ScriptedLM(FixedEngine(text + "[[ ## completed ## ]]")))
    assert isinstance(raised, ProgramError)
    assert str(raised) == "the LM gave an empty 'answer' output"
