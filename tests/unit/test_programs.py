"""Programs as data: signature parsing, validation, building, safe state and running."""

from __future__ import annotations

import json
from typing import Any

import dspy
import pytest

from dspex.agents.runtime.lms.echo import EchoLM
from dspex.agents.runtime.programs import (
    MODULE_TYPES,
    ProgramBuilder,
    ProgramSpec,
    parse_signature,
    run,
    spec_from_request,
    spec_from_version,
    validate,
)
from dspex.agents.runtime.tools import ToolRegistry, calculator, default_tools
from dspex.streams.errors import InvalidRequest, ProgramError

QUESTION = {"question": json.dumps("what is the capital of France")}


@pytest.fixture(autouse=True)
def _no_dspy_cache() -> None:
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)


@pytest.fixture
def tools() -> ToolRegistry:
    return default_tools()


@pytest.fixture
def builder(tools: ToolRegistry) -> ProgramBuilder:
    return ProgramBuilder(tools)


def _invalid(excinfo: pytest.ExceptionInfo[InvalidRequest], field: str) -> str:
    assert excinfo.value.field == field
    return excinfo.value.reason


# --- signatures -------------------------------------------------------------------------


def test_parse_signature_typed_fields() -> None:
    sig = parse_signature("question, n: int -> answer, confidence: float, ideas: list[str]")
    assert list(sig.input_fields) == ["question", "n"]
    assert sig.input_fields["n"].annotation is int
    assert sig.output_fields["confidence"].annotation is float
    assert sig.output_fields["ideas"].annotation == list[str]


def test_parse_signature_is_cached() -> None:
    assert parse_signature("q -> a") is parse_signature("q -> a")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("question answer", "'->'"),
        ("a -> b -> c", "'->'"),
        (" -> answer", "no input"),
        ("question -> ", "no output"),
        ("question, -> answer", "empty input field"),
        ("question -> answer: tuple", "unsupported type 'tuple'"),
        ("question -> answer: os.system", "unsupported type"),
        ("question -> answer: list[object]", "unsupported type"),
        ("question -> answer: list[str", "unbalanced"),
        ("2fast -> answer", "not an identifier"),
        ("my-q -> answer", "not an identifier"),
        ("_secret -> answer", "start with '_'"),
        ("question -> question", "duplicate"),
        ("json -> answer", "reserved"),
        ("q" * 4100 + " -> answer", "longer than 4096"),
    ],
)
def test_parse_signature_refuses(text: str, reason: str) -> None:
    with pytest.raises(InvalidRequest) as excinfo:
        parse_signature(text)
    assert reason in _invalid(excinfo, "signature")


# --- specs from records -----------------------------------------------------------------


def test_spec_from_version_and_key() -> None:
    record: dict[str, Any] = {
        "program_id": "qa",
        "version": 2,
        "signature": "question -> answer",
        "module_type": "ChainOfThought",
        "module_config_json": "{}",
        "state_json": "{}",
        "tools": [],
    }
    spec = spec_from_version(record)
    assert (spec.program_id, spec.version, spec.state_json) == ("qa", 2, None)
    other = spec_from_version({**record, "program_id": "other", "version": 9})
    assert spec.key() == other.key()
    assert spec.key() != spec_from_version({**record, "module_type": "Predict"}).key()


def test_spec_from_request_overrides_registered() -> None:
    registered = ProgramSpec("question -> answer", "Predict", program_id="qa", version=1)
    record = {"program_id": "qa", "module_type": "BestOfN", "module_config_json": '{"N": 2}'}
    spec = spec_from_request(record, registered)
    assert (spec.signature, spec.module_type, spec.module_config_json) == (
        "question -> answer",
        "BestOfN",
        '{"N": 2}',
    )


def test_spec_from_request_unknown_program_and_inline() -> None:
    with pytest.raises(InvalidRequest) as excinfo:
        spec_from_request({"request_id": "r1", "program_id": "nope"}, None)
    assert "unknown program 'nope'" in _invalid(excinfo, "program_id")
    assert excinfo.value.request_id == "r1"
    inline = spec_from_request({"signature": "q -> a", "tools": ["calculator"]}, None)
    assert (inline.module_type, inline.tools) == ("Predict", ("calculator",))
    with pytest.raises(InvalidRequest) as excinfo:
        spec_from_request({}, None)
    _invalid(excinfo, "signature")


# --- validate ---------------------------------------------------------------------------


def test_validate_decodes_inputs(tools: ToolRegistry) -> None:
    spec = ProgramSpec("question, n: int, x: float, flags: list[bool], meta: dict -> answer")
    inputs = {
        "question": '"hi"',
        "n": "3",
        "x": "2",
        "flags": "[true, false]",
        "meta": '{"k": [1]}',
    }
    decoded = validate(spec, inputs, tools=tools)
    assert decoded == {
        "question": "hi",
        "n": 3,
        "x": 2.0,
        "flags": [True, False],
        "meta": {"k": [1]},
    }
    assert isinstance(decoded["x"], float)


@pytest.mark.parametrize(
    ("spec", "inputs", "field", "reason"),
    [
        (ProgramSpec("question -> answer"), {}, "inputs.question", "missing"),
        (ProgramSpec("n: int -> answer"), {"n": '"three"'}, "inputs.n", "expected int"),
        (ProgramSpec("n: int -> answer"), {"n": "true"}, "inputs.n", "expected int"),
        (ProgramSpec("x: float -> answer"), {"x": "NaN"}, "inputs.x", "NaN"),
        (ProgramSpec("x: float -> answer"), {"x": "Infinity"}, "inputs.x", "Infinity"),
        (ProgramSpec("xs: list[str] -> answer"), {"xs": "[1]"}, "inputs.xs", "list[str]"),
        (ProgramSpec("question -> answer"), {"question": "not json"}, "inputs.question", "JSON"),
        (ProgramSpec("q -> a"), {"q": '"x"', "extra": '"y"'}, "inputs.extra", "not an input"),
        (ProgramSpec("q -> a", "Telepathy"), {"q": '"x"'}, "module_type", "unknown module"),
        (ProgramSpec("q -> a", tools=("rm_rf",)), {"q": '"x"'}, "tools", "unknown tool"),
        (ProgramSpec("q -> a", "ReAct"), {"q": '"x"'}, "tools", "at least one tool"),
        (ProgramSpec("q -> a", module_config_json="{"), {"q": '"x"'}, "module_config_json", "JSON"),
        (
            ProgramSpec("q -> a", module_config_json="[]"),
            {"q": '"x"'},
            "module_config_json",
            "object",
        ),
        (
            ProgramSpec("q -> a", module_config_json='{"api_base": "http://x"}'),
            {"q": '"x"'},
            "module_config_json",
            "unknown key 'api_base'",
        ),
        (
            ProgramSpec("q -> a", "BestOfN", module_config_json='{"N": 0}'),
            {"q": '"x"'},
            "module_config_json",
            "between",
        ),
        (ProgramSpec("q" * 4097 + " -> a"), {}, "signature", "4096"),
        (ProgramSpec("q -> reasoning", "ChainOfThought"), {"q": '"x"'}, "signature", "reserved"),
    ],
)
def test_validate_refuses(
    tools: ToolRegistry, spec: ProgramSpec, inputs: dict[str, str], field: str, reason: str
) -> None:
    with pytest.raises(InvalidRequest) as excinfo:
        validate(spec, inputs, tools=tools)
    assert reason in _invalid(excinfo, field)


def test_module_types_cover_dspy() -> None:
    assert {"Predict", "ChainOfThought", "ReAct", "BestOfN", "Refine"} <= MODULE_TYPES


# --- building and state -----------------------------------------------------------------


def _state(instructions: str, demos: list[dict[str, Any]], **extra: Any) -> str:
    predict = dspy.Predict("question -> answer")
    predict.signature = predict.signature.with_instructions(instructions)
    predict.demos = [dspy.Example(**demo) for demo in demos]
    state = predict.dump_state()
    state.update(extra)
    return json.dumps({"self": state})


def test_builder_caches_by_definition(builder: ProgramBuilder) -> None:
    spec = ProgramSpec("question -> answer", program_id="a", version=1)
    assert builder.build(spec) is builder.build(ProgramSpec("question -> answer", version=2))
    with_state = ProgramSpec("question -> answer", state_json=_state("Be brief.", []))
    assert builder.build(with_state) is not builder.build(spec)


def test_builder_refuses_bad_specs(builder: ProgramBuilder) -> None:
    with pytest.raises(ProgramError, match="unknown module type"):
        builder.build(ProgramSpec("q -> a", "Telepathy"))
    with pytest.raises(ProgramError, match="invalid JSON"):
        builder.build(ProgramSpec("q -> a", state_json="{nope"))
    with pytest.raises(ProgramError, match="no predictor named 'other'"):
        builder.build(ProgramSpec("q -> a", state_json='{"other": {}}'))


async def test_state_instructions_and_demos_reach_the_prompt(builder: ProgramBuilder) -> None:
    demo = {"question": "What is 1+1?", "answer": "two"}
    spec = ProgramSpec("question -> answer", state_json=_state("Answer like a pirate.", [demo]))
    lm = EchoLM()
    # run() keeps no DSPy history, so call the module directly to see the prompt.
    with dspy.context(lm=lm):
        await builder.build(spec).acall(question="hi")
    prompt = "\n".join(m["content"] for m in lm.history[-1]["messages"])
    assert "Answer like a pirate." in prompt
    assert "What is 1+1?" in prompt
    assert "two" in prompt


async def test_run_keeps_no_history(builder: ProgramBuilder) -> None:
    module, lm = builder.build(ProgramSpec("question -> answer")), EchoLM()
    await run(module, {"question": "hi"}, lm=lm)
    assert lm.history == [] and module.history == []


async def test_unsafe_lm_state_is_not_applied(builder: ProgramBuilder) -> None:
    evil = {"model": "openai/gpt-4o", "api_base": "http://evil.example", "base_url": "http://x"}
    spec = ProgramSpec("question -> answer", state_json=_state("Hi.", [], lm=evil))
    module = builder.build(spec)
    assert all(predictor.lm is None for predictor in module.predictors())
    result = await run(module, {"question": "hi"}, lm=EchoLM())
    assert result.outputs["answer"] == "echo: hi"


def test_state_cannot_set_other_predictor_attributes(builder: ProgramBuilder) -> None:
    spec = ProgramSpec("q -> a", state_json=_state("x", [], config={"api_base": "http://evil"}))
    with pytest.raises(ProgramError, match="unsupported key 'config'"):
        builder.build(spec)


# --- running ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module_type", "config", "tool_names"),
    [
        ("Predict", "{}", ()),
        ("ChainOfThought", "{}", ()),
        ("BestOfN", '{"N": 3}', ()),
        ("Refine", '{"N": 2}', ()),
        ("ReAct", '{"max_iters": 3}', ("calculator",)),
    ],
)
async def test_run_each_module_type(
    builder: ProgramBuilder,
    tools: ToolRegistry,
    module_type: str,
    config: str,
    tool_names: tuple[str, ...],
) -> None:
    spec = ProgramSpec(
        "question -> answer, confidence: float, ideas: list[str]",
        module_type,
        module_config_json=config,
        tools=tool_names,
    )
    inputs = validate(spec, QUESTION, tools=tools)
    result = await run(builder.build(spec), inputs, lm=EchoLM())
    assert result.outputs["answer"] == "echo: what is the capital of France"
    assert result.outputs["confidence"] == 0.5
    assert result.outputs["ideas"] == ["what is the capital of France"]
    assert result.usage.prompt_tokens > 0 and result.usage.completion_tokens > 0
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    assert result.trace and json.loads(json.dumps(result.trace)) == result.trace
    json.dumps(result.outputs)


async def test_streaming_chunks_concatenate_to_the_answer(builder: ProgramBuilder) -> None:
    module = builder.build(ProgramSpec("question -> answer, confidence: float"))
    chunks: list[str] = []

    async def on_chunk(text: str) -> None:
        chunks.append(text)

    inputs = {"question": "what is the capital of France"}
    streamed = await run(module, inputs, lm=EchoLM(), on_chunk=on_chunk)
    plain = await run(module, inputs, lm=EchoLM())
    assert len(chunks) > 1
    assert "".join(chunks) == streamed.outputs["answer"]
    assert streamed.outputs == plain.outputs


async def test_timeout_raises_builtin_timeout_error(builder: ProgramBuilder) -> None:
    module = builder.build(ProgramSpec("question -> answer"))
    with pytest.raises(TimeoutError):
        await run(module, {"question": "hi"}, lm=EchoLM(latency_s=1.0), timeout_s=0.05)


async def test_lm_errors_are_kept_and_parse_errors_mapped(builder: ProgramBuilder) -> None:
    module = builder.build(ProgramSpec("question -> answer"))
    with pytest.raises(dspy.LMError):
        await run(
            module, {"question": "hi"}, lm=dspy.LM("dspex-unknown/x", engine=_FailingEngine())
        )
    garbage = dspy.utils.DummyLM([{"nothing": "here"}] * 4)
    with pytest.raises(ProgramError, match="Predict failed"):
        await run(module, {"question": "hi"}, lm=garbage)


class _FailingEngine:
    def complete(self, request: Any) -> Any:
        raise dspy.lm15.TransportError("no route to host")


def test_calculator_is_not_eval() -> None:
    assert calculator("(1 + 2) * 3 / 2") == "4.5"
    assert calculator("__import__('os')").startswith("error")
    assert calculator("2 ** 100").startswith("error")
