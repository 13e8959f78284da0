"""Deployed modules: the allowlist, imports at start only, checks, building, the example."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import dspy
import pytest

from dspex.agents.router.routing import ProgramsResolver
from dspex.agents.runtime.lms.simulations import SimulatedLM
from dspex.agents.runtime.modules import DeployedModules
from dspex.agents.runtime.programs import ProgramBuilder, ProgramSpec, run, validate
from dspex.agents.runtime.tools import deployed_tools
from dspex.agents.worker.execution import DSPyExecutor
from dspex.schemas.samples import sample
from dspex.streams.errors import ConfigError, InvalidRequest, ProgramError
from dspex.streams.programs import check_program
from dspex.streams.settings import Settings, load_settings

MULTIHOP = "dspex_examples.multihop:MultiHop"
SEARCH = "dspex_examples.multihop:search_corpus"
QUESTION = "In which city was the engineer whose company built the Eiffel Tower born?"


@pytest.fixture(autouse=True)
def _no_dspy_cache() -> None:
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)


def _settings(**changes: Any) -> Settings:
    return load_settings(
        modules=changes.pop("modules", {"multihop": MULTIHOP}),
        tools=changes.pop("tools", {"search_corpus": SEARCH}),
        **changes,
    )


def _spec(**changes: Any) -> ProgramSpec:
    base: dict[str, Any] = {
        "signature": "question -> answer",
        "module_type": "multihop",
        "tools": ("search_corpus",),
    }
    return ProgramSpec(**{**base, **changes})


# --- settings ---------------------------------------------------------------------------


def test_the_allowlist_is_set_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSPEX_MODULES", json.dumps({"multihop": MULTIHOP}))
    monkeypatch.setenv("DSPEX_TOOLS__search_corpus", SEARCH)
    settings = load_settings()
    assert settings.modules == {"multihop": MULTIHOP}
    assert settings.tools == {"search_corpus": SEARCH}


@pytest.mark.parametrize(
    ("modules", "message"),
    [
        ({"Predict": MULTIHOP}, "modules.Predict: a built-in module type cannot be replaced"),
        ({"multihop": "dspex_examples.multihop"}, "is not 'package.module:Attribute'"),
        ({"multihop": "os:system; rm"}, "is not 'package.module:Attribute'"),
        ({"multi-hop": MULTIHOP}, "'multi-hop' is not an identifier"),
    ],
)
def test_a_bad_allowlist_entry_is_refused_naming_it(modules: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match="invalid settings") as excinfo:
        load_settings(modules=modules)
    assert message in str(excinfo.value)


# --- imported at worker start, and only there -------------------------------------------


def test_a_worker_fails_fast_on_a_path_that_does_not_import() -> None:
    settings = _settings(modules={"multihop": "dspex_examples.nosuch:MultiHop"})
    with pytest.raises(ConfigError) as excinfo:
        DSPyExecutor(settings)
    message = str(excinfo.value)
    assert "settings modules.multihop" in message and "dspex_examples.nosuch" in message
    assert "ModuleNotFoundError" in message


@pytest.mark.parametrize(
    ("allowlist", "reason"),
    [
        ({"x": "dspex_examples.multihop:search_corpus"}, "is not a dspy.Module subclass"),
        ({"x": "dspex_examples.multihop:NoSuchClass"}, "AttributeError"),
    ],
)
def test_a_path_that_is_not_a_module_class_is_refused(
    allowlist: dict[str, str], reason: str
) -> None:
    with pytest.raises(ConfigError, match=reason):
        DeployedModules.load(allowlist)


def test_a_tool_path_that_does_not_import_fails_fast() -> None:
    with pytest.raises(ConfigError, match=r"settings tools.search: cannot import"):
        DSPyExecutor(_settings(tools={"search": "dspex_examples.multihop:nosuch"}))


def test_a_tool_cannot_replace_a_built_in_one() -> None:
    with pytest.raises(ConfigError, match="tool already registered: 'calculator'"):
        deployed_tools({"calculator": SEARCH})


def test_a_router_knows_names_only_and_imports_nothing() -> None:
    for name in [n for n in sys.modules if n.startswith("dspex_examples")]:
        del sys.modules[name]
    resolver = ProgramsResolver.for_settings(_settings())
    request: dict[str, Any] = {"signature": "question -> answer", "module_type": "multihop"}
    request |= {"tools": ["search_corpus"], "inputs": {"question": json.dumps(QUESTION)}}
    fields = resolver.resolve(request, None)
    assert fields["module_type"] == "multihop" and fields["tools"] == ["search_corpus"]
    assert not [n for n in sys.modules if n.startswith("dspex_examples")]


def test_a_module_type_from_a_topic_is_never_imported() -> None:
    before = set(sys.modules)
    resolver = ProgramsResolver.for_settings(_settings())
    for hostile in ["json:loads", "os", "dspex_examples.multihop:MultiHop", "subprocess"]:
        request: dict[str, Any] = {"signature": "question -> answer", "module_type": hostile}
        request |= {"inputs": {"question": json.dumps("q")}}
        with pytest.raises(InvalidRequest) as excinfo:
            resolver.resolve(request, None)
        assert excinfo.value.field == "module_type"
        assert "deployed: multihop" in excinfo.value.reason
    assert set(sys.modules) - before == set()


# --- the same checks in the client and the runtime --------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"module_type": "Foo"}, "module_type"),
        ({"module_type": "multihop", "module_config_json": "[1]"}, "module_config_json"),
        ({"adapter": "YAMLAdapter"}, "adapter"),
        ({"signature": "question -> -> answer"}, "signature"),
        ({"module_type": "ReAct", "module_config_json": '{"api_base": "x"}'}, "module_config_json"),
    ],
)
def test_client_and_router_refuse_the_same_program(changes: dict[str, Any], field: str) -> None:
    spec = _spec(**changes)
    with pytest.raises(InvalidRequest) as client:
        check_program(
            spec.signature,
            module_type=spec.module_type,
            module_config_json=spec.module_config_json,
            adapter=spec.adapter,
            deployed={"multihop"},
        )
    with pytest.raises(InvalidRequest) as router:
        validate(spec, {"question": '"q"'}, tools={"search_corpus"}, modules={"multihop"})
    assert client.value.field == router.value.field == field
    assert client.value.reason == router.value.reason


def test_a_worker_refuses_config_keys_the_constructor_does_not_take() -> None:
    modules = DeployedModules.load({"multihop": MULTIHOP})
    tools = deployed_tools({"search_corpus": SEARCH})
    spec = _spec(module_config_json='{"hops": 1, "api_base": "http://evil"}')
    with pytest.raises(InvalidRequest) as excinfo:
        validate(spec, {"question": '"q"'}, tools=tools, modules=modules)
    assert excinfo.value.field == "module_config_json"
    assert "unknown key 'api_base' for multihop (allowed: hops, k)" in excinfo.value.reason


def test_a_bad_config_value_is_a_build_error_naming_the_module() -> None:
    builder = _builder()
    with pytest.raises(ProgramError, match="cannot build multihop: hops must be an integer"):
        builder.build(_spec(module_config_json='{"hops": 99}'))
    with pytest.raises(ProgramError, match="needs a retriever tool"):
        builder.build(_spec(tools=()))


def test_state_loads_into_the_modules_predictors_and_unknown_keys_are_refused() -> None:
    builder = _builder()
    demo = {"question": "q", "context": [], "query": "a demo query"}
    state = {"write_query[0]": {"demos": [demo]}}
    module = builder.build(_spec(state_json=json.dumps(state)))
    assert module.write_query[0].demos[0]["query"] == "a demo query"
    with pytest.raises(ProgramError, match="no predictor named 'retrieve'"):
        builder.build(_spec(state_json=json.dumps({"retrieve": {"demos": []}})))
    lm_state = {"answer": {"demos": [], "lm": {"model": "x", "api_base": "http://evil"}}}
    module = builder.build(_spec(state_json=json.dumps(lm_state)))
    assert module.answer.lm is None  # LM state is never loaded


# --- the example: multi-hop QA over the shipped corpus ----------------------------------


def test_the_bm25_tool_finds_each_hops_passage() -> None:
    from dspex_examples.multihop import load_corpus, search_corpus

    assert len(load_corpus().passages) >= 30
    first = search_corpus("Who built the Eiffel Tower?", k=1)
    assert first and first[0].startswith("Eiffel Tower | ")
    second = search_corpus("Where was Gustave Eiffel born?", k=1)
    assert second and "born in Dijon" in second[0]
    assert search_corpus("the of and") == []


async def test_the_multihop_module_retrieves_then_answers_on_a_simulated_lm() -> None:
    module = _builder().build(_spec(module_config_json='{"hops": 2, "k": 2}'))
    lm = SimulatedLM("dspex/sim?task=echo")  # SIMULATED: str outputs echo the first input
    chunks: list[str] = []

    async def on_chunk(text: str) -> None:
        chunks.append(text)

    result = await run(module, {"question": QUESTION}, lm=lm, on_chunk=on_chunk)
    context = result.outputs["context"]
    assert result.outputs["queries"] == [QUESTION, QUESTION]  # echoed by the simulation
    assert any(p.startswith("Eiffel Tower | ") for p in context)
    assert any("born in Dijon" in p for p in context)
    # the answer step's first input is the passages: the echoing simulation repeats them
    assert "born in Dijon" in result.outputs["answer"]
    assert "".join(chunks) == result.outputs["answer"]
    assert [t["predictor"] for t in result.trace] == [
        "write_query[0]",
        "write_query[1]",
        "answer",
    ]


async def test_a_worker_runs_the_deployed_module_from_a_request() -> None:
    settings = _settings(lm={"backends": {"sim": {"model": "dspex/sim?task=echo"}}})
    executor = DSPyExecutor(settings)
    request = sample("Request")
    request.update(
        request_id=str(uuid.uuid4()),
        program_id=None,
        signature="question -> answer",
        module_type="multihop",
        module_config_json=None,
        state_json=None,
        tools=["search_corpus"],
        inputs={"question": json.dumps(QUESTION)},
        variables={},
        adapter=None,
        deadline_at=datetime.now(UTC) + timedelta(seconds=60),
    )
    request["route"].update(pool="general", variant="sim")
    outcome = await executor.execute(request, None)
    assert any("born in Dijon" in p for p in outcome.outputs["context"])
    assert outcome.variant == "sim" and len(outcome.trace) == 3


def _builder() -> ProgramBuilder:
    tools = deployed_tools({"search_corpus": SEARCH})
    return ProgramBuilder(tools, modules=DeployedModules.load({"multihop": MULTIHOP}))


def test_a_worker_process_stops_at_start_with_one_line_naming_the_setting() -> None:
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",  # never reached: the import fails first
        "DSPEX_MODULES": json.dumps({"multihop": "dspex_examples.nosuch:MultiHop"}),
    }
    cmd = [sys.executable, "-m", "dspex.agents", "worker", "--pool", "general"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 1
    lines = [line for line in run.stderr.splitlines() if "level=" in line]
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert "worker cannot start pool=general: settings modules.multihop: cannot import" in lines[0]


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["question -> -> answer"], "error: field=signature: expected exactly one '->'"),
        (["q -> a", "--module", "Foo"], "error: field=module_type: unknown module type 'Foo'"),
        (["q -> a", "--adapter", "YAML"], "error: field=adapter: unknown adapter 'YAML'"),
        (["q -> a", "--module", "multihop", "--config", "[]"], "error: field=module_config_json"),
    ],
)
def test_programs_put_refuses_before_contacting_any_broker(args: list[str], line: str) -> None:
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",  # nothing listens: a produce would hang
        "DSPEX_MODULES": json.dumps({"multihop": MULTIHOP}),
        "COLUMNS": "80",
    }
    cmd = [sys.executable, "-m", "dspex.streams", "programs", "put", "bad", *args]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 1 and run.stdout == ""
    assert len(run.stderr.splitlines()) == 1 and run.stderr.startswith(line), run.stderr
