"""The multi-hop example as a pipeline, beside the deployed module, on a real broker.

``deploy/examples/multihop/pipeline.yaml`` is the flow of the deployed ``MultiHop``
module written as four stages: BM25 retrieval (the deployed module ``Search``, a
registered program, no LM), a follow-up query, retrieval again, an answer. Everything
goes through the real CLI (``dspex programs put``, ``dspex pipelines put``), router,
pool worker and pipeline agent processes. The general pool answers with the echo
SIMULATION (labelled: each ``str`` output is ``"echo: <first input>"``), so the
outputs are exact; retrieval is real BM25 over the shipped corpus.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from typing import Any

import pytest

from dspex.streams.client.client import AsyncClient, Chunk, PipelineRef, RequestFailed
from dspex.streams.pipelines import files
from dspex.streams.pipelines.validate import validate
from dspex.streams.settings import Settings, load_settings
from tests.integration.tail import OpenTail
from tests.integration.test_end_to_end import (  # noqa: F401 - the fixture is used by name
    StartStack,
    start_stack,
)
from tests.integration.test_modules import EXAMPLE, QUESTION, _cli, _corpus, _submit_once_known
from tests.integration.test_pipelines import _interval

MODULES = {
    "multihop": "dspex_examples.multihop:MultiHop",
    "search": "dspex_examples.multihop:Search",
}
TOOLS = {"search_corpus": "dspex_examples.multihop:search_corpus"}
PIPELINE = EXAMPLE / "pipeline.yaml"
CHAIN = ["search1", "next_query", "search2", "answer"]  # each stage reads the one before


@pytest.fixture(autouse=True)
def _example_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The workers can import the operator's package, as after ``pip install`` of it."""
    monkeypatch.setenv("PYTHONPATH", str(EXAMPLE))


async def _stream_once_known(client: AsyncClient, inputs: dict[str, Any]) -> list[Chunk]:
    """Run the pipeline until the router knows it (it follows the pipelines topic)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            stream = client.stream(PipelineRef("multihop"), inputs, deadline_s=120, cache=False)
            return [chunk async for chunk in stream]
        except RequestFailed as exc:
            if exc.field != "pipeline_id" or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.3)


async def test_the_multihop_pipeline_runs_its_stages_in_order_and_matches_the_module(
    settings: Settings,
    start_stack: StartStack,  # noqa: F811 - the fixture imported above
    tails: OpenTail,
) -> None:
    settings = load_settings(
        kafka={"bootstrap_servers": settings.kafka.bootstrap_servers},
        topics={"prefix": settings.topics.prefix},
        modules=MODULES,
        tools=TOOLS,
    )
    assert settings.lm.variant_for_pool("general") == "echo"  # the SIMULATION
    start_stack(settings, ["general"], pipeline=True)
    search = _cli(
        settings,
        *("programs", "put", "search", "query -> passages: list[str]", "--module", "search"),
        *("--tool", "search_corpus", "--config", '{"k": 2}'),
    )
    assert search.returncode == 0 and "published search v1" in search.stdout, search.stderr
    hotpot = _cli(
        settings,
        *("programs", "put", "hotpot", "question -> answer", "--module", "multihop"),
        *("--tool", "search_corpus", "--config", '{"hops": 2, "k": 2}'),
    )
    assert hotpot.returncode == 0, hotpot.stderr
    tail = tails(["requests"], settings=settings)
    put = _cli(settings, "pipelines", "put", "multihop", str(PIPELINE))
    assert put.returncode == 0 and "published multihop v1 (4 stages)" in put.stdout, put.stderr

    async with AsyncClient(settings) as client:
        chunks = await _stream_once_known(client, {"question": QUESTION})
        module, _ = await _submit_once_known(
            client, "hotpot", {"question": QUESTION}, deadline_s=60, cache=False
        )

    final = chunks[-1]
    assert final.final and final.status == "ok" and not final.partial, final.error
    outputs = final.outputs or {}
    print(
        f"\npipeline: query={outputs['query']!r} passages={outputs['passages']} "
        f"more={outputs['more']}\nanswer={outputs['answer']!r}"
        f"\nmodule: queries={module.outputs['queries']} context={module.outputs['context']}"
    )

    # the stages ran one after another, each once its input was there
    events = [(c.stage["name"], c.stage["state"]) for c in chunks if c.stage]
    assert events == [(name, state) for name in CHAIN for state in ("started", "finished")]
    stages = {status["name"]: status for status in final.stages}
    assert [stages[name]["state"] for name in CHAIN] == ["finished"] * 4
    assert {stages[name]["pool"] for name in CHAIN} == {"general"}
    for before, after in itertools.pairwise(CHAIN):
        assert _interval(stages[before])[1] <= _interval(stages[after])[0], (before, after)

    # both hops retrieved real passages from the corpus (k=2); the first found the
    # tower, and the passage that answers the question ("born in Dijon")
    corpus = set(_corpus())
    for hop in ("passages", "more"):
        assert outputs[hop] and len(outputs[hop]) <= 2 and set(outputs[hop]) <= corpus, hop
    assert any(p.startswith("Eiffel Tower | ") for p in outputs["passages"])
    assert any("born in Dijon" in p for p in outputs["passages"] + outputs["more"])
    # each search stage was an ordinary request for the registered program, the second
    # one querying with what the query stage wrote (the module calls the tool in-process)
    tail.catch_up()
    searched = {
        r["metadata"]["dspex.pipeline.stage"]: json.loads(r["inputs"]["query"])
        for r in tail.of("requests")
        if r["program_id"] == "search" and r["metadata"].get("dspex.pipeline.id") == "multihop"
    }
    assert searched == {"search1": QUESTION, "search2": outputs["query"]}
    # the SIMULATION echoes the first input: the query step's is the question, the
    # answer step's the passages — so the answer shows what the answer stage was given
    assert outputs["query"] == f"echo: {QUESTION}"
    assert outputs["answer"].startswith("echo: ") and "Dijon" in outputs["answer"]

    # the terminal form of the same run, as the README shows it
    cli = _cli(settings, "submit", "--pipeline", "multihop", f"question={QUESTION}")
    print(f"dspex submit --pipeline multihop:\n{cli.stdout}")
    assert cli.returncode == 0 and "Dijon" in cli.stdout, (cli.stdout, cli.stderr)

    # the module form, same question, same retriever and k: the same passages
    assert module.outputs["queries"] == [outputs["query"]] * 2
    assert set(module.outputs["context"]) == set(outputs["passages"]) | set(outputs["more"])


def test_the_readme_shows_the_shipped_pipeline_file() -> None:
    """No broker: the README's YAML beside the module is ``pipeline.yaml``, and it is valid."""
    readme = (EXAMPLE.parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("**The same flow, as a pipeline**", 1)[1]
    shown = files.loads(section.split("```yaml\n", 1)[1].split("```", 1)[0], pipeline_id="multihop")
    shipped = files.load(PIPELINE)
    assert shipped.pipeline_id == "multihop"
    assert (shown.inputs, shown.stages, shown.outputs) == (
        shipped.inputs,
        shipped.stages,
        shipped.outputs,
    )
    assert validate(shipped, {"search": "query -> passages: list[str]"}) == []
