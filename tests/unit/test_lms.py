"""LM backends: build_lm and the EchoLM simulation (deterministic, typed, streaming)."""

from __future__ import annotations

import dspy
import pytest
from pydantic import SecretStr

from dspex.agents.runtime.lms import build_lm
from dspex.agents.runtime.lms.echo import EchoEngine, EchoLM, echo_reply
from dspex.streams.settings import LMBackend


@pytest.fixture(autouse=True)
def _no_dspy_cache() -> None:
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)


def test_build_lm_echo_and_llama_cpp() -> None:
    assert isinstance(build_lm(LMBackend(model="dspex/echo")), EchoLM)
    local = build_lm(LMBackend(model="dspex/llama-cpp"))
    assert type(local).__name__ == "LlamaCppLM"  # built lazily: no model loaded yet


def test_build_lm_litellm_model_gets_settings() -> None:
    backend = LMBackend(
        model="openai/gpt-4o-mini",
        api_base="http://127.0.0.1:1/v1",
        api_key=SecretStr("sk-test"),
        temperature=0.3,
        max_tokens=64,
    )
    lm = build_lm(backend)
    assert isinstance(lm, dspy.LM) and not isinstance(lm, EchoLM)
    assert lm.kwargs["api_base"] == "http://127.0.0.1:1/v1"
    assert lm.kwargs["api_key"] == "sk-test"
    assert (lm.kwargs["temperature"], lm.kwargs["max_tokens"], lm.cache) == (0.3, 64, False)


def test_echo_lm_is_a_base_lm_without_cache() -> None:
    lm = EchoLM()
    assert isinstance(lm, dspy.BaseLM)
    assert lm.cache is False


def test_echo_lm_typed_outputs() -> None:
    predict = dspy.Predict(
        "question, n: int -> answer, score: float, size: int, ok: bool, tags: list[str]"
    )
    with dspy.context(lm=EchoLM()):
        pred = predict(question="blue sky", n=2)
    assert pred.answer == "echo: blue sky"
    assert (pred.score, pred.size, pred.ok, pred.tags) == (0.5, 8, True, ["blue sky"])


def test_echo_lm_chain_of_thought_and_react() -> None:
    def lookup(term: str) -> str:
        """Look a term up."""
        return term

    with dspy.context(lm=EchoLM()):
        cot = dspy.ChainOfThought("question -> answer")(question="why")
        react = dspy.ReAct("question -> answer", tools=[lookup], max_iters=3)(question="why")
    assert (cot.reasoning, cot.answer) == ("echoing", "echo: why")
    assert react.answer == "echo: why"
    assert react.trajectory["tool_name_0"] == "finish"


def test_echo_lm_is_deterministic() -> None:
    predict = dspy.Predict("question -> answer, ideas: list[str]")
    with dspy.context(lm=EchoLM()):
        first = predict(question="same input")
    with dspy.context(lm=EchoLM()):
        second = predict(question="same input")
    assert first.toDict() == second.toDict()
    system = "Your output fields are:\n1. `answer` (str): \nAll interactions will be structured"
    assert echo_reply(system, "[[ ## q ## ]]\nx") == echo_reply(system, "[[ ## q ## ]]\nx")


def test_echo_lm_reports_word_count_usage() -> None:
    lm = EchoLM()
    with dspy.context(lm=lm), dspy.track_usage() as tracker:
        dspy.Predict("question -> answer")(question="one two three")
    usage = tracker.get_total_tokens()["dspex/echo"]
    reply = lm.history[-1]["outputs"][0]
    prompt = "\n".join(m["content"] for m in lm.history[-1]["messages"])
    assert usage["completion_tokens"] == len(reply.split())
    assert usage["prompt_tokens"] == len(prompt.split())
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_echo_engine_streams_word_deltas() -> None:
    request = dspy.lm15.Request(
        model="dspex/echo",
        system="Your output fields are:\n1. `answer` (str): \nAll interactions will be structured",
        messages=(dspy.lm15.Message.user("[[ ## question ## ]]\nhello big world"),),
    )
    events = list(EchoEngine().stream(request))
    kinds = [event.type for event in events]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("delta") > 3
    text = "".join(event.delta.text for event in events if event.type == "delta")
    assert text == EchoEngine().complete(request).text


async def test_echo_lm_streams_through_dspy_streamify() -> None:
    program = dspy.streamify(
        dspy.Predict("question -> answer"),
        stream_listeners=[dspy.streaming.StreamListener(signature_field_name="answer")],
        is_async_program=True,
    )
    chunks = []
    with dspy.context(lm=EchoLM()):
        async for value in program(question="a b c d"):
            if isinstance(value, dspy.streaming.StreamResponse):
                chunks.append(value.chunk)
    assert len([c for c in chunks if c]) > 1
    assert "".join(chunks) == "echo: a b c d"
