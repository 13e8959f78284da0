"""Pipeline jobs without a broker: the in-process pipeline module, its compile, its checks.

The LM is a ``dspex/sim`` SIMULATION (reverse the first input, right only with demos in
the prompt; typed outputs are always right). On the real broker, with publication and a
run through the pipeline agent: tests/integration/test_pipeline_opt.py.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import dspy
import pytest

from dspex.agents.jobs.jobspec import available_optimizers, parse_job
from dspex.agents.jobs.optimize import JobCancelled, Progress
from dspex.agents.jobs.pipeline_opt import PipelineJob, is_pipeline_job
from dspex.agents.jobs.pipemodule import PipelineModule, StagePrograms, stage_programs
from dspex.agents.runtime.lms import build_lm
from dspex.agents.runtime.lms.simulations import WRONG
from dspex.agents.runtime.scoring import get_metric
from dspex.schemas.samples import sample
from dspex.streams.client.programs import program_version_record
from dspex.streams.errors import InvalidRequest
from dspex.streams.optimizers import check_job, pipeline_target
from dspex.streams.pipelines import files
from dspex.streams.pipelines.plan import Plan
from dspex.streams.pipelines.spec import Pipeline
from dspex.streams.settings import LMBackend, load_settings

FEWSHOT = LMBackend(model="dspex/sim?task=reverse&needs=demos")
WORDS = ["kafka", "stream", "topic", "broker", "offset", "record"]


def example_pipeline() -> Pipeline:
    """Four stages: a chain (first -> final), a map (spell), an inline bool (check), a when."""
    return (
        Pipeline("po", inputs="word, parts: list[str]")
        .stage("first", program="po.first", inputs={"word": "$input.word"})
        .stage("check", signature="word -> ok: bool", inputs={"word": "$input.word"})
        .stage("spell", program="po.spell", inputs={"word": "$item"}, map_over="$input.parts")
        .stage(
            "final",
            program="po.final",
            inputs={"word": "$input.word", "hint": "$stage.first.answer"},
            when={"ref": "$stage.check.ok", "equals": True},
        )
        .output(answer="$stage.final.answer", spelled="$stage.spell.spelled")
    )


SIGNATURES = {
    "po.first": "word -> answer",
    "po.spell": "word -> spelled",
    "po.final": "word, hint -> answer",
}


def versions() -> dict[str, list[dict[str, Any]]]:
    return {
        pid: [
            program_version_record(
                pid,
                signature,
                version=1,
                parent_version=None,
                module_type="Predict",
                state_json=None,
                module_config_json="{}",
                tools=(),
                metric=None,
                description="",
                created_by="test",
            )
        ]
        for pid, signature in SIGNATURES.items()
    }


def example(word: str) -> dspy.Example:
    parts = [word[:3], word[3:]]
    return dspy.Example(
        word=word, parts=parts, answer=word[::-1], spelled=[p[::-1] for p in parts]
    ).with_inputs("word", "parts")


def plan() -> Plan:
    return Plan.from_record(example_pipeline().to_record(version=1))


def module(programs: StagePrograms | None = None) -> PipelineModule:
    programs = programs or stage_programs(plan(), versions())
    return PipelineModule(plan(), *programs.build(load_settings()))


@pytest.fixture(autouse=True)
def _no_dspy_cache() -> None:
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)


def test_the_pipeline_module_runs_stages_in_order_with_map_and_when() -> None:
    with dspy.context(lm=build_lm(LMBackend(model="dspex/sim?task=reverse"))):
        prediction = module()(word="kafka", parts=["ka", "fka"])
    assert prediction.answer == "akfak"
    assert prediction.spelled == ["ak", "akf"]
    names = [name for name, _ in module().named_predictors()]
    assert sorted(names) == ["stage_check", "stage_final", "stage_first", "stage_spell"]


def test_a_false_when_skips_the_stage_and_its_output_is_null() -> None:
    record = example_pipeline().to_record(version=1)
    record["stages"][3]["when"]["values"] = ["false"]
    skipping = Plan.from_record(record)
    built = PipelineModule(skipping, *stage_programs(skipping, versions()).build(load_settings()))
    with dspy.context(lm=build_lm(LMBackend(model="dspex/sim?task=reverse"))):
        prediction = built(word="kafka", parts=[])
    assert (prediction.answer, prediction.spelled) == (None, None)


def test_stages_naming_one_program_share_one_module() -> None:
    shared = (
        Pipeline("twice", inputs="word")
        .stage("a", program="po.first", inputs={"word": "$input.word"})
        .stage("b", program="po.first", inputs={"word": "$stage.a.answer"})
        .output(answer="$stage.b.answer")
    )
    twice = Plan.from_record(shared.to_record(version=1))
    built = PipelineModule(twice, *stage_programs(twice, versions()).build(load_settings()))
    assert built.stage_module("a") is built.stage_module("b")
    assert len(built.named_predictors()) == 1


def test_one_program_at_two_versions_is_refused_naming_the_stage() -> None:
    pinned = (
        Pipeline("two", inputs="word")
        .stage("a", program="po.first", version=1, inputs={"word": "$input.word"})
        .stage("b", program="po.first", version=2, inputs={"word": "$stage.a.answer"})
        .output(answer="$stage.b.answer")
    )
    held = versions()
    held["po.first"].append({**held["po.first"][0], "version": 2})
    with pytest.raises(InvalidRequest) as refused:
        stage_programs(Plan.from_record(pinned.to_record(version=1)), held)
    assert refused.value.field == "stages.b" and "one version of each program" in str(refused.value)


def test_bootstrap_few_shot_compiles_every_stage_and_raises_the_pipeline_metric() -> None:
    lm = build_lm(FEWSHOT)
    metric = get_metric("exact_match")
    base = module()
    examples = [example(w) for w in WORDS]
    with dspy.context(lm=lm):
        before = [metric(e, base(**e.inputs())) for e in examples]
        optimizer = dspy.BootstrapFewShot(metric=metric, metric_threshold=1.0)
        compiled = optimizer.compile(base, trainset=examples[:4])
        after = [metric(e, compiled(**e.inputs())) for e in examples]
    assert sum(before) / len(before) < 0.5, before
    assert after == [1.0] * len(examples)
    for name in ("first", "spell", "final", "check"):
        assert compiled.stage_module(name).demos, name
    assert WRONG not in json.dumps(compiled.stage_module("final").demos[0].toDict())


def test_pipeline_job_checks_refuse_what_a_pipeline_job_cannot_do() -> None:
    record = sample("OptimizationJob")
    record.update(
        program_id="pipeline:po",
        optimizer="BootstrapFewShot",
        optimizer_config_json="{}",
        dataset_json="[]",
        metric="exact_match",
        search_json="{}",
        canary_weight=None,
    )
    assert pipeline_target(record["program_id"]) == "po"
    spec = parse_job(record, backends=["sim"], max_trials=4)
    assert is_pipeline_job(spec)
    for field, value in (
        ("optimizer", None),
        ("search_json", '{"temperature": {"min": 0, "max": 1, "steps": 2}}'),
        ("canary_weight", 0.5),
    ):
        bad = {**record, field: value}
        with pytest.raises(InvalidRequest) as refused:
            check_job(bad, backends=["sim"], max_trials=4)
        assert refused.value.field == field


def test_cancelling_stops_the_scoring_at_the_next_lm_call() -> None:
    record = sample("OptimizationJob")
    record.update(program_id="pipeline:po", optimizer="BootstrapFewShot", metric="exact_match")
    record.update(
        optimizer_config_json="{}", search_json="{}", dataset_json="[]", canary_weight=None
    )
    cancel = threading.Event()
    cancel.set()
    events: list[Progress] = []
    job = PipelineJob(
        load_settings(),
        None,  # type: ignore[arg-type]  # nothing is read from a topic here
        parse_job(record, backends=[], max_trials=1),
        compile_lm=build_lm(FEWSHOT),
        cancel=cancel,
        progress=events.append,
    )
    with pytest.raises(JobCancelled):
        job._score(module(), [example("kafka")])


def test_deployed_modules_are_stages_like_any_program(monkeypatch: pytest.MonkeyPatch) -> None:
    """The multi-hop example: two stages run the deployed Search module (BM25, no LM)."""
    example = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "multihop"
    monkeypatch.syspath_prepend(str(example))
    settings = load_settings(
        modules={"search": "dspex_examples.multihop:Search"},
        tools={"search_corpus": "dspex_examples.multihop:search_corpus"},
    )
    search = program_version_record(
        "search",
        "query -> passages: list[str]",
        version=1,
        parent_version=None,
        module_type="search",
        state_json=None,
        module_config_json='{"k": 2}',
        tools=("search_corpus",),
        metric=None,
        description="",
        created_by="test",
    )
    multihop = Plan.from_record(files.load(example / "pipeline.yaml").to_record(version=1))
    built = PipelineModule(
        multihop, *stage_programs(multihop, {"search": [search]}).build(settings)
    )
    # the LM stages are what an optimizer compiles; the deployed Search has no predictor
    assert sorted(n for n, _ in built.named_predictors()) == ["stage_answer", "stage_next_query"]
    with dspy.context(lm=build_lm(LMBackend(model="dspex/echo"))):
        prediction = built(question="Where was the engineer of the Eiffel Tower born?")
    assert len(prediction.passages) == 2 and len(prediction.more) == 2
    assert any(p.startswith("Eiffel Tower | ") for p in prediction.passages)
    assert prediction.answer.startswith("echo")


@pytest.mark.skipif("MIPROv2" not in available_optimizers(), reason="optuna is not installed")
async def test_miprov2_compiles_a_pipeline_and_drops_the_simulations_instructions() -> None:
    config = {
        "auto": None,
        "num_candidates": 2,
        "num_trials": 2,
        "max_bootstrapped_demos": 1,
        "max_labeled_demos": 2,
        "minibatch": False,
        "seed": 7,
    }
    record = sample("OptimizationJob")
    record.update(program_id="pipeline:po", optimizer="MIPROv2", metric="exact_match")
    record.update(optimizer_config_json=json.dumps(config), search_json="{}", canary_weight=None)
    record.update(dataset_json="[]")
    events: list[Progress] = []
    job = PipelineJob(
        load_settings(),
        None,  # type: ignore[arg-type]  # nothing is read from a topic here
        parse_job(record, backends=[], max_trials=1),
        compile_lm=build_lm(FEWSHOT),
        cancel=threading.Event(),
        progress=events.append,
    )
    base, examples = module(), [example(w) for w in WORDS]
    before = job._score(base, examples)
    compiled = job._compile(base, examples[:4])
    after = job._score(compiled, examples)
    kept, score = await job._earned_instructions(compiled, base, examples, after)
    assert before < 0.5 and score == 1.0, (before, after, score)
    # the simulation proposes "I do not know" as instructions: they earn nothing, so the
    # originals are what would be published
    originals = {name: p.signature.instructions for name, p in base.named_predictors()}
    assert {name: p.signature.instructions for name, p in kept.named_predictors()} == originals
    demos = {n: len(kept.stage_module(n).demos) for n in ("first", "spell", "final", "check")}
    # the stages the outputs depend on carry demos (final's answer does not need first's hint)
    assert demos["spell"] and demos["final"], demos


def test_a_stage_program_that_is_not_registered_is_named() -> None:
    held = versions()
    del held["po.spell"]
    with pytest.raises(InvalidRequest) as refused:
        stage_programs(plan(), held)
    assert refused.value.field == "stages.spell" and "'po.spell'" in str(refused.value)
