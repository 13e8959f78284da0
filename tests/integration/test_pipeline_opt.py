"""A whole pipeline optimized by one job, published atomically, then run on the new versions.

Real broker; the router, a general-pool worker, the pipeline agent and a job runner run
as ``python -m dspex.agents`` processes. Every LM is the ``dspex/sim`` SIMULATION
"reverse the first input, right only with demonstrations in the prompt" (typed outputs
are always right), so the pipeline answers ``"I do not know"`` until its stage programs
carry demos. The pipeline (tests/unit/test_pipeline_opt.py): ``first`` (registered) ->
``final`` (registered, run only ``when`` the inline ``check`` says true) and ``spell``
(registered, a ``map`` over the parts). Run with ``-s`` to see the printed figures.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dspex.agents.runtime.lms.simulations import WRONG
from dspex.streams.client.client import AsyncClient, PipelineRef, RequestFailed, Result
from dspex.streams.client.jobs import JobProgress, pipeline_job_target
from dspex.streams.reader import read_to_end
from dspex.streams.serde import make_serde
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics
from tests.integration.test_end_to_end import (  # noqa: F401 - the fixture is used by name
    StartStack,
    start_stack,
)
from tests.integration.test_optimizer import FEWSHOT, JobRunners, _dspex, sim_settings
from tests.integration.test_pipelines import publish
from tests.unit.test_pipeline_opt import SIGNATURES, example_pipeline

WORDS = ["kafka", "stream", "topic", "broker", "offset", "record", "schema", "program"]


def labelled(word: str) -> dict[str, Any]:
    parts = [word[:3], word[3:]]
    return {"word": word, "parts": parts, "answer": word[::-1], "spelled": [p[::-1] for p in parts]}


@pytest.fixture
def pipeline_stack(
    settings: Settings,
    start_stack: StartStack,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> Iterator[Settings]:
    """Router, general worker, pipeline agent and one job runner on the simulation."""
    settings = sim_settings(settings, FEWSHOT)
    start_stack(settings, ["general"], pipeline=True)
    runners = JobRunners(settings, tmp_path)
    runners.start(1)
    yield settings
    codes = runners.stop()
    assert set(codes.values()) == {0}, (codes, runners.log_tails())


async def _run(client: AsyncClient, inputs: dict[str, Any], version: int | None) -> Result:
    """One run of pipeline ``po``, retried until the router knows the version."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return await client.submit(
                PipelineRef("po", version), inputs, deadline_s=120, cache=False
            )
        except RequestFailed as exc:
            if exc.field not in ("pipeline_id", "pipeline_version") or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.3)


async def test_a_pipeline_job_compiles_every_stage_publishes_atomically_and_the_run_answers(
    pipeline_stack: Settings,
) -> None:
    settings = pipeline_stack
    serde = make_serde(settings)
    topics = Topics(settings.topics)
    async with AsyncClient(settings) as client:
        for program_id, signature in SIGNATURES.items():
            assert await client.publish_program(program_id, signature) == 1
        publish(settings, example_pipeline().to_record(version=1))
        inputs = {"word": "kafka", "parts": ["kaf", "ka"]}
        before = await _run(client, inputs, None)
        assert before.outputs["answer"] == WRONG, before.outputs  # the simulation needs demos

        progress: list[JobProgress] = []
        result = await client.optimize(
            pipeline_job_target("po"),
            optimizer="BootstrapFewShot",
            optimizer_config={"metric_threshold": 1.0},
            dataset=[labelled(word) for word in WORDS],
            metric="exact_match",
            on_progress=progress.append,
            timeout_s=300,
        )
        # the final Response came read-committed: everything in its transaction is visible now
        programs = read_to_end(settings, serde, topics.name("programs"), "ProgramVersion")
        pipelines = read_to_end(settings, serde, topics.name("pipelines"), "PipelineVersion")
        print(
            f"\npipeline BootstrapFewShot: exact_match {result.score_before} -> "
            f"{result.score_after}; {result.outputs.get('program_versions')} "
            f"pipeline v{result.outputs.get('pipeline_version')}"
        )
        assert result.ok, result.error
        assert result.score_before is not None and result.score_before < 0.5
        assert result.score_after == 1.0
        assert result.outputs["pipeline_version"] == 2
        assert result.outputs["program_versions"] == {pid: 2 for pid in SIGNATURES}
        assert {p.phase for p in progress} >= {"baseline", "compile"}

        new = {r["program_id"]: r for _, r in programs if r and r["created_by"] == result.job_id}
        assert {pid: r["version"] for pid, r in new.items()} == {pid: 2 for pid in SIGNATURES}
        assert all('"demos": [{' in r["state_json"] for r in new.values()), new
        assert {r["parent_version"] for r in new.values()} == {1}
        (pinned,) = [r for _, r in pipelines if r and r["created_by"] == result.job_id]
        assert pinned["version"] == 2
        stages = {s["name"]: s for s in pinned["stages"]}
        assert {n: s["program_version"] for n, s in stages.items() if s["program_id"]} == {
            "first": 2,
            "spell": 2,
            "final": 2,
        }
        assert stages["check"]["signature"] == "word -> ok: bool"

        after = await _run(client, inputs, 2)
        latest = await _run(client, {"word": "stream", "parts": ["st", "ream"]}, None)
    assert after.outputs == {"answer": "akfak", "spelled": ["fak", "ak"]}, after.outputs
    assert latest.outputs == {"answer": "maerts", "spelled": ["ts", "maer"]}, latest.outputs


def test_the_cli_names_a_pipeline_and_refuses_what_a_pipeline_job_cannot_run(
    settings: Settings, create_topics: Callable[[], object], tmp_path: Path
) -> None:
    settings = sim_settings(settings, FEWSHOT)
    create_topics()
    publish(settings, example_pipeline().to_record(version=1))
    dataset = tmp_path / "po.jsonl"
    dataset.write_text("\n".join(json.dumps(labelled(w)) for w in WORDS))
    common = ("--optimizer", "BootstrapFewShot", "--metric", "exact_match")
    unknown = _dspex(
        settings, "optimize", "run", "nope", "--pipeline", *common, "--dataset", str(dataset)
    )
    assert unknown.returncode == 1 and "no pipeline 'nope'" in unknown.stderr, unknown.stderr
    searched = _dspex(
        settings,
        *("optimize", "run", "po", "--pipeline", *common, "--dataset", str(dataset)),
        *("--search", "temperature=0:1:2"),
    )
    assert searched.returncode == 1 and "search_json" in searched.stderr, searched.stderr
    pinned = _dspex(
        settings,
        *("optimize", "run", "po", "--pipeline", *common, "--dataset", str(dataset)),
        *("--version", "7"),
    )
    assert pinned.returncode == 1 and "not 7" in pinned.stderr, pinned.stderr
