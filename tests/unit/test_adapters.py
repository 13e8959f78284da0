"""Adapters per program: names, ``auto``, the variable, and SIMULATED LMs in every format."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import dspy
import pytest
from dspy.lm15 import Request, Response

from dspex.agents.runtime.adapters import adapter_name, make_adapter
from dspex.agents.runtime.lms import build_lm
from dspex.agents.runtime.lms.echo import EchoLM
from dspex.agents.runtime.lms.simulations import SimEngine, SimulatedLM
from dspex.agents.runtime.programs import ProgramBuilder, ProgramSpec, parse_signature, run
from dspex.agents.runtime.tools import default_tools
from dspex.agents.worker.execution import DSPyExecutor
from dspex.schemas.samples import sample
from dspex.streams.errors import InvalidRequest
from dspex.streams.programs import ADAPTERS
from dspex.streams.settings import LMBackend, load_settings

TYPED = "question -> answer: str, confidence: float, tags: list[str]"
QUESTION = "what is up"
EXPECTED = {"answer": QUESTION.upper(), "confidence": 0.5, "tags": [QUESTION]}


@pytest.fixture(autouse=True)
def _no_dspy_cache() -> None:
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> list[Request]:
    """Every request DSPy sends the SIMULATION's engine, in order."""
    requests: list[Request] = []
    answer = SimEngine.answer

    def recording(self: SimEngine, request: Request) -> Response:
        requests.append(request)
        return answer(self, request)

    monkeypatch.setattr(SimEngine, "answer", recording)
    return requests


@pytest.mark.parametrize("name", ADAPTERS)
@pytest.mark.parametrize("module_type", ["Predict", "ChainOfThought"])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_typed_program_answers_under_every_adapter(
    name: str, module_type: str, stream: bool
) -> None:
    module = ProgramBuilder(default_tools()).build(ProgramSpec(TYPED, module_type=module_type))
    lm = SimulatedLM("dspex/sim?task=upper")
    adapter = make_adapter(name, lm, parse_signature(TYPED))
    chunks: list[str] = []

    async def on_chunk(text: str) -> None:
        chunks.append(text)

    callback = on_chunk if stream else None
    result = await run(module, {"question": QUESTION}, lm=lm, adapter=adapter, on_chunk=callback)
    assert {k: result.outputs[k] for k in EXPECTED} == EXPECTED
    if stream:
        assert "".join(chunks).strip() == QUESTION.upper()


@pytest.mark.parametrize(
    ("name", "asks"),
    [
        ("ChatAdapter", "[[ ## answer ## ]]"),
        ("JSONAdapter", "Respond with a JSON object"),
        ("XMLAdapter", "wrapped in XML tags"),
        ("TwoStepAdapter", "You are a helpful assistant"),
    ],
)
async def test_each_adapter_asks_in_its_own_format(
    name: str, asks: str, seen: list[Request]
) -> None:
    lm = SimulatedLM("dspex/sim?task=upper")
    module = ProgramBuilder(default_tools()).build(ProgramSpec(TYPED))
    await run(module, {"question": QUESTION}, lm=lm, adapter=make_adapter(name, lm, _sig()))
    first = seen[0]
    prompt = str(first.system) + "".join(m.text or "" for m in first.messages)
    assert asks in prompt
    if name == "TwoStepAdapter":  # a second call extracts the fields from the first reply
        assert len(seen) == 2


async def test_json_adapter_uses_the_backends_structured_output_mode(seen: list[Request]) -> None:
    lm = SimulatedLM("dspex/sim?task=upper")
    module = ProgramBuilder(default_tools()).build(ProgramSpec(TYPED))
    await run(
        module, {"question": QUESTION}, lm=lm, adapter=make_adapter("JSONAdapter", lm, _sig())
    )
    response_format = seen[0].config.response_format
    assert response_format is not None, seen[0].config
    assert "json" in json.dumps(response_format, default=str).lower()


def test_auto_picks_json_for_typed_outputs_where_the_backend_supports_it() -> None:
    sim = SimulatedLM("dspex/sim")
    assert isinstance(make_adapter("auto", sim, _sig()), dspy.JSONAdapter)
    assert isinstance(make_adapter("auto", EchoLM(), _sig()), dspy.JSONAdapter)
    # only str outputs: Chat
    chat = make_adapter("auto", sim, parse_signature("question -> answer"))
    assert type(chat) is dspy.ChatAdapter
    # the local model has no structured-output mode: Chat even for typed outputs
    local = build_lm(LMBackend(model="dspex/llama-cpp"))
    assert type(make_adapter("auto", local, _sig())) is dspy.ChatAdapter


def test_the_adapter_variable_wins_over_the_programs_adapter() -> None:
    assert adapter_name(None, {}) == "auto"
    assert adapter_name("XMLAdapter", {}) == "XMLAdapter"
    assert adapter_name("XMLAdapter", {"adapter": '"ChatAdapter"'}) == "ChatAdapter"
    for bad in ['"YAMLAdapter"', "7", "not json"]:
        with pytest.raises(InvalidRequest) as excinfo:
            adapter_name(None, {"adapter": bad})
        assert excinfo.value.field == "variables.adapter"


async def test_a_worker_runs_auto_as_json_for_a_typed_program(seen: list[Request]) -> None:
    lm = SimulatedLM("dspex/sim?task=upper")
    settings = load_settings(lm={"backends": {"sim": {"model": "dspex/sim?task=upper"}}})
    executor = DSPyExecutor(settings, lms={"sim": lm})
    outcome = await executor.execute(_request(adapter=None), None)
    assert {k: outcome.outputs[k] for k in EXPECTED} == EXPECTED
    assert "Respond with a JSON object" in (seen[-1].messages[-1].text or "")
    await executor.execute(_request(adapter="XMLAdapter"), None)
    assert "wrapped in XML tags" in (seen[-1].messages[-1].text or "")
    await executor.execute(
        _request(adapter="XMLAdapter", variables={"adapter": '"ChatAdapter"'}), None
    )
    assert "[[ ## answer ## ]]" in (seen[-1].messages[-1].text or "")


def _sig() -> type[dspy.Signature]:
    return parse_signature(TYPED)


def _request(**changes: Any) -> dict[str, Any]:
    request = sample("Request")
    request.update(
        request_id=str(uuid.uuid4()),
        program_id=None,
        signature=TYPED,
        module_type="Predict",
        module_config_json=None,
        state_json=None,
        tools=[],
        inputs={"question": json.dumps(QUESTION)},
        variables={},
        deadline_at=datetime.now(UTC) + timedelta(seconds=60),
    )
    request["route"].update(pool="general", variant="sim")
    request.update(changes)
    return request
