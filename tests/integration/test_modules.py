"""Deployed modules and adapters on a real broker, through the real CLI, router and pool workers.

The workers import the multi-hop example (``deploy/examples/multihop``, put on their
``PYTHONPATH`` as an operator's ``pip install`` would) because settings allowlist it;
the router knows its name only. The general pool runs a SIMULATED LM (labelled: echo
or ``dspex/sim``), the gpu pool the local model (Gemma 3 270M on llama.cpp) — the
product's own small real model, slow on a busy 2-core machine, so one test uses it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from typing import Any

import pytest

from dspex.schemas import records
from dspex.schemas.times import now
from dspex.streams import kafka
from dspex.streams.client.client import AsyncClient, Program, RequestFailed, Result
from dspex.streams.programs import ADAPTERS
from dspex.streams.serde import make_serde
from dspex.streams.settings import Settings, load_settings
from dspex.streams.topics import Topics
from tests.integration.stack import REPO, cli_env, run_dspex
from tests.integration.tail import OpenTail, Tail, end_offsets
from tests.integration.test_end_to_end import (  # noqa: F401 - the fixture is used by name
    StartStack,
    start_stack,
)

EXAMPLE = REPO / "deploy" / "examples" / "multihop"
DEPLOYED = {
    "modules": {"multihop": "dspex_examples.multihop:MultiHop"},
    "tools": {"search_corpus": "dspex_examples.multihop:search_corpus"},
}
QUESTION = "In which city was the engineer whose company built the Eiffel Tower born?"
TYPED = "question -> answer: str, confidence: float, tags: list[str]"


@pytest.fixture(autouse=True)
def _example_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The workers can import the operator's package, as after ``pip install`` of it."""
    monkeypatch.setenv("PYTHONPATH", str(EXAMPLE))


def _settings(settings: Settings, lm: dict[str, Any] | None = None) -> Settings:
    """The test's broker and prefix, the example allowlisted, ``lm`` (default: the suite's:
    the echo simulation, the local model on the gpu pool)."""
    return load_settings(
        kafka={"bootstrap_servers": settings.kafka.bootstrap_servers},
        topics={"prefix": settings.topics.prefix},
        lm=lm or {"pool_variants": {"gpu": "local"}},
        modules=DEPLOYED["modules"],
        tools=DEPLOYED["tools"],
    )


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = cli_env(
        settings, DSPEX_MODULES=json.dumps(settings.modules), DSPEX_TOOLS=json.dumps(settings.tools)
    )
    return run_dspex(env, *args)


def _refused(run: subprocess.CompletedProcess[str]) -> str:
    """The one error line of a refused command (exit 1, nothing else on stderr)."""
    assert run.returncode == 1, (run.stdout, run.stderr)
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    return lines[0]


async def _submit_once_known(
    client: AsyncClient, program: Program | str, inputs: dict[str, Any], **options: Any
) -> tuple[Result, int]:
    """Submit until the router knows the program (it follows the programs topic)."""
    deadline = time.monotonic() + 60
    for tries in range(1, 1000):
        try:
            return await client.submit(program, inputs, **options), tries
        except RequestFailed as exc:
            if exc.field != "program_id" or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.3)
    raise AssertionError("unreachable")


@pytest.mark.timeout(900)  # the local model: 75 s for three steps here, more under load
async def test_the_deployed_multihop_module_answers_through_pool_workers(
    settings: Settings,
    start_stack: StartStack,  # noqa: F811 - the fixture imported above
) -> None:
    """general: the echo SIMULATION (exact answers); gpu: the local model (a real one)."""
    settings = _settings(settings)
    assert settings.lm.variant_for_pool("general") == "echo"
    assert settings.lm.variant_for_pool("gpu") == "local"
    start_stack(settings, ["general", "gpu"])
    put = _cli(
        settings,
        *("programs", "put", "hotpot", "question -> answer", "--module", "multihop"),
        *("--tool", "search_corpus", "--config", '{"hops": 2, "k": 2}'),
    )
    assert put.returncode == 0 and "published hotpot v1" in put.stdout, put.stderr
    async with AsyncClient(settings) as client:
        simulated, tries = await _submit_once_known(
            client, "hotpot", {"question": QUESTION}, deadline_s=60, cache=False
        )
        chunks = [
            c
            async for c in client.stream(
                "hotpot", {"question": QUESTION}, deadline_s=60, cache=False
            )
        ]
        started = time.monotonic()
        local = await client.submit(
            "hotpot", {"question": QUESTION}, pool_hint="gpu", deadline_s=600, cache=False
        )
        local_s = time.monotonic() - started
    context = simulated.outputs["context"]
    print(
        f"\nmultihop, echo simulation ({tries} tries until the router knew it): "
        f"queries={simulated.outputs['queries']} context={context}"
        f"\nmultihop, local model in {local_s:.1f}s: answer={local.outputs['answer']!r} "
        f"queries={local.outputs['queries']} context={local.outputs['context']}"
    )
    assert simulated.pool == "general" and simulated.program_version == 1
    # two hops of real BM25 retrieval found both passages the question needs
    assert any(p.startswith("Eiffel Tower | ") for p in context)
    assert any("born in Dijon" in p for p in context)
    # the SIMULATION echoes its first input: the query step's is the question, the
    # answer step's the passages — so the answer shows what the answer step was given
    assert simulated.outputs["queries"] == [f"echo: {QUESTION}"] * 2
    assert (
        simulated.outputs["answer"].startswith("echo: ") and "Dijon" in simulated.outputs["answer"]
    )
    final = chunks[-1]
    assert final.final and final.status == "ok" and final.outputs is not None
    assert "".join(c.delta for c in chunks) == final.outputs["answer"]
    # the local model: a real (tiny) model ran all three steps on the gpu pool
    assert local.pool == "gpu"
    assert isinstance(local.outputs["answer"], str) and local.outputs["answer"].strip()
    assert len(local.outputs["queries"]) == 2 and local.outputs["context"]
    corpus = set(_corpus())
    assert set(local.outputs["context"]) <= corpus


def _corpus() -> list[str]:
    lines = (EXAMPLE / "dspex_examples" / "corpus.jsonl").read_text().splitlines()
    return [f"{p['title']} | {p['text']}" for p in map(json.loads, lines)]


async def test_a_module_not_on_the_allowlist_is_refused_at_put_and_by_the_router(
    settings: Settings,
    start_stack: StartStack,  # noqa: F811 - the fixture imported above
    tails: OpenTail,
) -> None:
    settings = _settings(settings)
    start_stack(settings, [])  # the router alone: nothing reaches a pool
    refusals = {
        "module": _cli(settings, "programs", "put", "bad", "question -> answer", "--module", "Foo"),
        "signature": _cli(settings, "programs", "put", "bad", "question -> -> answer"),
        "adapter": _cli(settings, "programs", "put", "bad", "q -> a", "--adapter", "YAML"),
        "config": _cli(settings, "programs", "put", "bad", "q -> a", "--config", '{"N": 3}'),
    }
    lines = {what: _refused(run) for what, run in refusals.items()}
    print("\nrefused at put:\n" + "\n".join(lines.values()))
    assert lines["module"] == (
        "error: field=module_type: unknown module type 'Foo' (built in: BestOfN, "
        "ChainOfThought, Predict, ReAct, Refine; deployed: multihop)"
    )
    assert lines["signature"].startswith("error: field=signature: expected exactly one '->'")
    assert lines["adapter"].startswith("error: field=adapter: unknown adapter 'YAML'")
    assert lines["config"].startswith("error: field=module_config_json: unknown key 'N'")
    assert end_offsets(settings, ["programs"]) == {"programs": 0}  # nothing was produced

    # a version written past the client's checks (another tool, an old client) and an
    # inline request are refused by the router, naming the field
    _produce_version(settings, "sneaky", module_type="os:system")
    tail = tails(["dlq"], settings=settings)
    async with AsyncClient(settings) as client:
        with pytest.raises(RequestFailed) as inline:
            await client.submit(Program.inline("question -> answer", "Foo"), {"question": "q"})
        with pytest.raises(RequestFailed) as registered:
            for _ in range(200):  # until the router has read the version
                try:
                    await client.submit("sneaky", {"question": "q"})
                except RequestFailed as exc:
                    if exc.field != "program_id":
                        raise
                await asyncio.sleep(0.3)
    for failed in (inline.value, registered.value):
        assert (failed.field, failed.stage) == ("module_type", "validate")
        assert "deployed: multihop" in str(failed)
    letters = tail.wait(_module_type_letters, 30, "two dead letters naming module_type")
    assert {letter["component"] for letter in letters} == {"router"}


def _module_type_letters(tail: Tail) -> list[dict[str, Any]] | None:
    letters = [r for r in tail.of("dlq") if "unknown module type" in r["error_message"]]
    return letters if len(letters) >= 2 else None


def _produce_version(settings: Settings, program_id: str, *, module_type: str) -> None:
    topic = Topics(settings.topics).name("programs")
    record = records.program_version(
        program_id=program_id,
        version=1,
        signature="question -> answer",
        module_type=module_type,
        created_at=now(),
    )
    producer = kafka.producer(settings)
    value = make_serde(settings).encode("ProgramVersion", record, topic=topic)
    producer.produce(topic, key=program_id.encode(), value=value)
    assert producer.flush(30) == 0


async def test_a_typed_program_answers_under_each_adapter_through_a_pool_worker(
    settings: Settings,
    start_stack: StartStack,  # noqa: F811 - the fixture imported above
) -> None:
    """The SIMULATION answers in the format each adapter asks for (auto: JSON here, as
    tests/unit/test_adapters.py shows in the executor), streamed or not."""
    lm = {
        "backends": {"sim": {"model": "dspex/sim?task=upper"}},
        "default_variant": "sim",
        "pool_variants": {},
    }
    settings = _settings(settings, lm)
    start_stack(settings, ["general"])
    put = _cli(settings, "programs", "put", "typed", TYPED, "--adapter", "XMLAdapter")
    assert put.returncode == 0, put.stderr
    question = "name three colours"
    expected = {"answer": question.upper(), "confidence": 0.5, "tags": [question]}
    answers: dict[str, dict[str, Any]] = {}
    async with AsyncClient(settings) as client:
        registered, _ = await _submit_once_known(client, "typed", {"question": question})
        for adapter in ADAPTERS:
            program = Program.inline(TYPED, adapter=adapter)
            result = await client.submit(program, {"question": question}, cache=False)
            chunks = [c async for c in client.stream(program, {"question": question}, cache=False)]
            assert "".join(c.delta for c in chunks).strip() == question.upper(), adapter
            answers[adapter] = result.outputs
        overridden = await client.submit(
            Program.registered("typed", adapter="TwoStepAdapter"), {"question": question}
        )
        with pytest.raises(RequestFailed) as unknown:
            await client.submit(
                Program.inline(TYPED, adapter="YAMLAdapter"), {"question": question}
            )
    print(f"\nanswers per adapter: {answers}")
    for adapter, outputs in answers.items():
        assert outputs == expected, adapter
    assert registered.outputs == expected and overridden.outputs == expected
    assert (unknown.value.field, unknown.value.stage) == ("adapter", "validate")
