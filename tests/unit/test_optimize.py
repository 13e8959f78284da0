"""Optimizer jobs without a broker: job checks, the simulated LMs, compile, search, records.

Evaluations run in-process here (:class:`LocalEvaluator`: the program through
``dspex.agents.runtime.runner.run`` with a simulated LM); on the real pipeline they go through
the router to the general pool (tests/integration/test_optimizer.py).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dspy
import pytest

from dspex.agents.jobs import jobrecords as jr
from dspex.agents.jobs.datasets import examples_from_json, split
from dspex.agents.jobs.jobs import JobRunner
from dspex.agents.jobs.jobspec import OPTIMIZERS, REQUIRES, JobSpec, available_optimizers, parse_job
from dspex.agents.jobs.optimize import (
    Evaluation,
    JobCancelled,
    Optimization,
    OptimizationResult,
    Progress,
    Trial,
    best_trial,
    build_optimizer,
)
from dspex.agents.runtime.lms import build_lm
from dspex.agents.runtime.lms.simulations import WRONG, SimOptions
from dspex.agents.runtime.programs import ProgramBuilder, ProgramSpec, parse_signature, run
from dspex.agents.runtime.scoring import metric_names
from dspex.agents.runtime.tools import default_tools
from dspex.schemas.samples import sample
from dspex.streams.cli.optimize import parse_search, read_dataset
from dspex.streams.client._replies import Chunk
from dspex.streams.client.jobs import JobInbox, JobProgress, job_record
from dspex.streams.errors import ConfigError, InvalidRequest
from dspex.streams.optimizers import METRIC_NAMES, check_job
from dspex.streams.serde import make_serde
from dspex.streams.settings import LMBackend, Settings, load_settings
from dspex.streams.variables import VariableStore, validate_update

WORDS = ["kafka", "stream", "topic", "broker", "offset", "record", "schema", "program"]
DATASET = json.dumps([{"word": w, "answer": w[::-1]} for w in WORDS])
BASE = ProgramSpec("word -> answer", program_id="toy", version=1)
FEWSHOT = LMBackend(model="dspex/sim?task=reverse&needs=demos")
LOWTEMP = LMBackend(model="dspex/sim?task=reverse&max_temperature=0.4", temperature=0.8)


@pytest.fixture(autouse=True)
def _no_dspy_cache() -> None:
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)


def job(**overrides: Any) -> dict[str, Any]:
    record = sample("OptimizationJob")
    record.update(
        program_id="toy",
        program_version=None,
        optimizer="BootstrapFewShot",
        optimizer_config_json="{}",
        dataset_json=DATASET,
        metric="exact_match",
        search_json="{}",
    )
    record.update(overrides)
    return record


def spec_of(**overrides: Any) -> JobSpec:
    return parse_job(job(**overrides), backends=["echo", "good", "bad"], max_trials=20)


class LocalEvaluator:
    """Runs the program in-process with ``backend`` (variables override its settings)."""

    def __init__(
        self, backend: LMBackend, spec: JobSpec, models: Mapping[str, LMBackend] | None = None
    ) -> None:
        self.backend = backend
        self.models = dict(models or {})
        self.metric = spec.metric
        self.calls: list[dict[str, Any]] = []

    async def evaluate(
        self, program: ProgramSpec, variables: Mapping[str, Any], examples: Sequence[dspy.Example]
    ) -> Evaluation:
        self.calls.append(dict(variables))
        lm_settings = {k: v for k, v in variables.items() if k in ("temperature", "max_tokens")}
        backend = self.models.get(variables.get("model", ""), self.backend)
        lm = build_lm(backend.model_copy(update=lm_settings))
        module = ProgramBuilder(default_tools()).build(program)
        results = await asyncio.gather(
            *(run(module, dict(ex.inputs().items()), lm=lm) for ex in examples)
        )
        scores = [
            self.metric(ex, dspy.Prediction(**r.outputs))
            for ex, r in zip(examples, results, strict=True)
        ]
        return Evaluation(sum(scores) / len(scores), len(scores), 0)


class MemoryCheckpoint:
    """A checkpoint kept in memory, round-tripped through JSON as the topic's would be."""

    def __init__(self) -> None:
        self.saved: str | None = None
        self.phases: list[str] = []

    def load(self) -> dict[str, Any] | None:
        return json.loads(self.saved) if self.saved is not None else None

    def save(self, phase: str, state: Mapping[str, Any]) -> None:
        self.phases.append(phase)
        self.saved = json.dumps(state, allow_nan=False)


def optimize(
    spec: JobSpec,
    backend: LMBackend,
    *,
    cancel: threading.Event | None = None,
    models: Mapping[str, LMBackend] | None = None,
    checkpoint: MemoryCheckpoint | None = None,
    evaluator: LocalEvaluator | None = None,
) -> tuple[OptimizationResult, list[Progress]]:
    examples = examples_from_json(DATASET, parse_signature(BASE.signature))
    train, val = split(examples, spec.val_fraction, spec.job_id)
    events: list[Progress] = []
    optimization = Optimization(
        spec,
        BASE,
        evaluator or LocalEvaluator(backend, spec, models),
        compile_lm=build_lm(backend),
        current={},
        cancel=cancel or threading.Event(),
        progress=events.append,
        checkpoint=checkpoint,
    )
    return asyncio.run(optimization.run(train, val)), events


# -- the simulated LMs ------------------------------------------------------------------------


def test_simulation_answers_right_only_with_demos() -> None:
    predict = dspy.Predict("word -> answer")
    with dspy.context(lm=build_lm(FEWSHOT)):
        assert predict(word="kafka").answer == WRONG
        predict.demos = [dspy.Example(word="abc", answer="cba")]
        assert predict(word="kafka").answer == "akfak"


def test_simulation_answers_right_only_at_low_temperature() -> None:
    predict = dspy.Predict("word -> answer, letters: int")
    with dspy.context(lm=build_lm(LOWTEMP)):
        hot = predict(word="kafka")
        assert (hot.answer, hot.letters) == (WRONG, 5)
    with dspy.context(lm=build_lm(LOWTEMP.model_copy(update={"temperature": 0.2}))):
        assert predict(word="kafka").answer == "akfak"


@pytest.mark.parametrize(
    "model",
    ["dspex/sim?task=rot13", "dspex/sim?needs=luck", "dspex/sim?colour=red", "dspex/sim?delay=x"],
)
def test_simulation_options_are_checked(model: str) -> None:
    with pytest.raises(ConfigError, match="dspex/sim"):
        SimOptions.parse(model)


# -- checking a job ---------------------------------------------------------------------------


def test_a_valid_job_is_parsed() -> None:
    spec = spec_of(
        optimizer_config_json=json.dumps({"max_bootstrapped_demos": 2, "max_rounds": 1}),
        search_json=json.dumps(
            {"temperature": {"min": 0, "max": 1, "steps": 3}, "model": {"choices": ["good", "bad"]}}
        ),
    )
    assert spec.init_config == {"max_bootstrapped_demos": 2, "max_rounds": 1}
    assert [v.name for v in spec.search] == ["temperature", "model"]
    assert spec.search[0].values == (0.0, 0.5, 1.0)
    assert len(spec.trials()) == 6
    assert spec.trials()[0] == {"temperature": 0.0, "model": "good"}


def test_every_optimizer_of_the_installed_dspy_is_available_and_built() -> None:
    installed = {name for name, package in REQUIRES.items() if importlib.util.find_spec(package)}
    assert available_optimizers() == sorted(set(OPTIMIZERS) - set(REQUIRES) | installed)
    assert "BootstrapFewShot" in available_optimizers() and "SIMBA" in available_optimizers()
    lm = build_lm(FEWSHOT)
    for name in available_optimizers():
        with dspy.context(lm=lm):
            optimizer, _ = build_optimizer(spec_of(optimizer=name), lm, 4)
        assert type(optimizer).__name__ == name
    for name in set(REQUIRES) - installed:  # e.g. MIPROv2 without optuna
        with pytest.raises(InvalidRequest, match=f"needs the '{REQUIRES[name]}' package"):
            spec_of(optimizer=name)


RUNNABLE = [
    ("SIMBA", {"bsize": 2, "num_candidates": 2, "max_steps": 1, "max_demos": 2}),
    ("GEPA", {"max_metric_calls": 20, "reflection_minibatch_size": 2}),
    (
        "MIPROv2",
        {
            "auto": None,
            "num_candidates": 2,
            "num_trials": 2,
            "max_bootstrapped_demos": 1,
            "max_labeled_demos": 2,
            "minibatch": False,
            "seed": 7,
        },
    ),
]


@pytest.mark.parametrize(
    ("name", "config"), [case for case in RUNNABLE if case[0] in available_optimizers()]
)
def test_simba_and_gepa_run_to_completion_on_the_simulation(
    name: str, config: dict[str, Any]
) -> None:
    result, events = optimize(
        spec_of(optimizer=name, optimizer_config_json=json.dumps(config)), FEWSHOT
    )
    # the toy task needs demos and neither adds any from all-failing trajectories here:
    # what is checked is that each runs through DSPex's compile path and exports state
    assert json.loads(result.candidate.state_json or "{}")["self"]["signature"]
    assert any(e.phase == "compile" for e in events)


def test_miprov2_raises_the_metric_on_the_simulation() -> None:
    config = dict(RUNNABLE)["MIPROv2"]
    spec = spec_of(optimizer="MIPROv2", optimizer_config_json=json.dumps(config))
    result, events = optimize(spec, FEWSHOT)
    # its few-shot candidates carry demonstrations, which the simulation needs
    assert (result.score_before, result.score_after, result.improved) == (0.0, 1.0, True)
    # the simulation proposes "I do not know" as instructions; they score no better than
    # the original ones (only the demos matter to it), so the original ones are published
    state = json.loads(result.candidate.state_json or "{}")
    original = ProgramBuilder(default_tools()).build(BASE).signature.instructions
    assert state["self"]["signature"]["instructions"] == original
    assert state["self"]["demos"]
    assert any("instructions dropped" in e.message for e in events), [e.message for e in events]


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"optimizer": "COPRO"}, "optimizer", "unknown optimizer 'COPRO'"),
        ({"optimizer": None}, "optimizer", "an optimizer, a search_json"),
        (
            {"optimizer_config_json": '{"log_dir": "/tmp"}'},
            "optimizer_config_json.log_dir",
            "not a",
        ),
        (
            {"optimizer_config_json": '{"max_rounds": 0}'},
            "optimizer_config_json.max_rounds",
            "between",
        ),
        (
            {"optimizer_config_json": '{"max_rounds": 1.5}'},
            "optimizer_config_json.max_rounds",
            "integer",
        ),
        ({"optimizer_config_json": "[]"}, "optimizer_config_json", "JSON object"),
        ({"metric": "accuracy"}, "metric", "unknown metric"),
        ({"search_json": '{"top_p": {"min": 0, "max": 1}}'}, "search_json.top_p", "cannot search"),
        (
            {"search_json": '{"temperature": {"min": 0, "max": 9}}'},
            "search_json.temperature",
            "between",
        ),
        (
            {"search_json": '{"model": {"choices": ["gpt-5"]}}'},
            "search_json.model",
            "unknown choice",
        ),
        (
            {"search_json": '{"temperature": {"min": 0, "max": 1, "steps": 50}}'},
            "search_json",
            "max_trials",
        ),
        ({"dataset_json": None}, "dataset_json", "exactly one"),
        ({"dataset_topic": "examples"}, "dataset_json", "exactly one"),
        ({"val_fraction": 1.0}, "val_fraction", "[0, 1)"),
        ({"canary_weight": 0.0}, "canary_weight", "(0, 1]"),
    ],
)
def test_a_bad_job_is_refused_naming_the_field(
    overrides: dict[str, Any], field: str, words: str
) -> None:
    with pytest.raises(InvalidRequest, match=re.escape(words)) as caught:
        spec_of(**overrides)
    assert caught.value.field == field


def test_examples_need_their_inputs_and_a_label() -> None:
    signature = parse_signature("word -> answer")
    with pytest.raises(InvalidRequest, match="missing input") as caught:
        examples_from_json('[{"answer": "x"}]', signature)
    assert caught.value.field == "dataset_json[0].word"
    with pytest.raises(InvalidRequest, match="no labelled output"):
        examples_from_json('[{"word": "x"}]', signature)
    with pytest.raises(InvalidRequest, match="non-empty JSON array"):
        examples_from_json("[]", signature)


def test_split_is_deterministic_per_job_and_holds_out_the_fraction() -> None:
    examples = examples_from_json(DATASET, parse_signature("word -> answer"))
    train, val = split(examples, 0.25, "job-1")
    assert (len(train), len(val)) == (6, 2)
    assert split(examples, 0.25, "job-1") == (train, val)
    assert split(examples[:1], 0.5, "job-1") == (examples[:1], examples[:1])
    assert split(examples, 0.0, "job-1")[0] == split(examples, 0.0, "job-1")[1]


# -- optimizing -------------------------------------------------------------------------------


def test_bootstrap_few_shot_raises_the_metric_and_exports_loadable_state() -> None:
    result, events = optimize(spec_of(), FEWSHOT)
    print(f"exact_match {result.score_before} -> {result.score_after}")
    assert (result.score_before, result.score_after, result.improved) == (0.0, 1.0, True)
    state = json.loads(result.candidate.state_json or "{}")
    assert state["self"]["demos"] and "lm" not in state["self"]
    module = ProgramBuilder(default_tools()).build(
        result.candidate
    )  # dspex.agents.runtime.state loads it
    with dspy.context(lm=build_lm(FEWSHOT)):
        assert module(word="offset").answer == "tesffo"
    assert events[0].phase == "baseline"
    assert "compile" in {e.phase for e in events} and events[-1].phase == "search"


def test_variable_search_picks_the_low_temperature() -> None:
    search = {"temperature": {"min": 0, "max": 1, "steps": 3}}
    spec = spec_of(optimizer=None, search_json=json.dumps(search))
    result, events = optimize(spec, LOWTEMP)
    scores = {t.variables["temperature"]: t.evaluation.score for t in result.trials}
    print(f"scores by temperature: {scores}")
    assert scores == {0.0: 1.0, 0.5: 0.0, 1.0: 0.0}
    assert result.best.variables == {"temperature": 0.0}
    assert result.changed_variables() == {"temperature": 0.0}
    assert (result.score_before, result.score_after, result.compiled) == (0.0, 1.0, False)
    assert [(e.trial, e.trials) for e in events if e.phase == "search"] == [(1, 3), (2, 3), (3, 3)]


def test_a_job_resumed_from_its_checkpoint_skips_the_steps_done() -> None:
    search = {"temperature": {"min": 0, "max": 1, "steps": 3}}
    spec = spec_of(search_json=json.dumps(search))
    checkpoint = MemoryCheckpoint()
    first, _ = optimize(spec, FEWSHOT, checkpoint=checkpoint)
    assert checkpoint.phases == ["baseline", "compile", "search", "search", "search"]
    state = json.loads(checkpoint.saved or "{}")
    state["trials"] = state["trials"][:1]  # as if the runner died during the second trial
    checkpoint.saved = json.dumps(state)
    evaluator = LocalEvaluator(FEWSHOT, spec)
    resumed, events = optimize(spec, FEWSHOT, checkpoint=checkpoint, evaluator=evaluator)
    assert evaluator.calls == [{"temperature": 0.5}, {"temperature": 1.0}]  # trials 2 and 3 only
    assert events[0].phase == "resume" and "1 trial(s) done" in events[0].message
    assert [e.trial for e in events if e.phase == "search"] == [2, 3]
    assert resumed.candidate.state_json == first.candidate.state_json
    assert (resumed.score_before, resumed.trials) == (first.score_before, first.trials)


def test_model_search_picks_the_backend_that_knows_the_task() -> None:
    models = {
        "good": LMBackend(model="dspex/sim?task=reverse"),
        "bad": LMBackend(model="dspex/sim?task=upper"),
    }
    search = {"model": {"choices": ["bad", "good"]}}
    spec = spec_of(optimizer=None, search_json=json.dumps(search))
    result, _ = optimize(spec, models["bad"], models=models)
    assert [(t.variables["model"], t.evaluation.score) for t in result.trials] == [
        ("bad", 0.0),
        ("good", 1.0),
    ]
    assert result.changed_variables() == {"model": "good"}
    assert spec.search[0].constraints == {"choices": ["bad", "echo", "good"]}


def test_ties_keep_the_value_in_force_then_the_grid_order() -> None:
    def trial(index: int, temperature: float, score: float) -> Trial:
        return Trial(index, {"temperature": temperature}, Evaluation(score, 1, 0))

    trials = [trial(0, 0.0, 1.0), trial(1, 0.5, 1.0), trial(2, 1.0, 0.5)]
    assert best_trial(trials, {"temperature": 0.5}).index == 1
    assert best_trial(trials, {}).index == 0


def test_a_tied_search_publishes_nothing_for_the_variable() -> None:
    def result(scores: list[float]) -> OptimizationResult:
        trials = [
            Trial(i, {"temperature": t}, Evaluation(score, 1, 0))
            for i, (t, score) in enumerate(zip([0.0, 0.5, 1.0], scores, strict=True))
        ]
        best = best_trial(trials, {})
        base = ProgramSpec("word -> answer", program_id="toy")
        return OptimizationResult(base, base, False, 0.0, trials, best, {})

    assert result([1.0, 1.0, 1.0]).changed_variables() == {}
    assert result([1.0, 1.0, 0.0]).changed_variables() == {}
    assert result([0.0, 1.0, 0.0]).changed_variables() == {"temperature": 0.5}


def test_a_cancelled_compile_stops_at_the_next_lm_call() -> None:
    cancel = threading.Event()
    calls = 0

    def cancel_on_compile(event: Progress) -> None:
        nonlocal calls
        calls += 1
        if event.phase == "compile":
            cancel.set()

    examples = examples_from_json(DATASET, parse_signature(BASE.signature))
    optimization = Optimization(
        spec_of(),
        BASE,
        LocalEvaluator(FEWSHOT, spec_of()),
        compile_lm=build_lm(FEWSHOT),
        current={},
        cancel=cancel,
        progress=cancel_on_compile,
    )
    with pytest.raises(JobCancelled):
        asyncio.run(optimization.run(examples, examples))
    assert calls == 2  # baseline, then "compile started": no trial ran


# -- records ----------------------------------------------------------------------------------


def test_job_records_match_the_contract() -> None:
    serde = make_serde(Settings())
    result, _ = optimize(spec_of(), FEWSHOT)
    head = jr.JobHead("job-1", "toy", 1, "jobs-test:1")
    progress = jr.progress_response(head, 0, Progress("search", 1, 3, 0.5, 0.75, "temperature=0"))
    assert progress["delta"] == "search trial 1/3 temperature=0 score=0.5000 best=0.7500\n"
    outputs = jr.result_outputs(
        result, optimizer="BootstrapFewShot", metric="exact_match", version=2
    )
    final = jr.final_response(head, 1, "ok", outputs=outputs, version=2)
    version = jr.result_version(
        result, job_id="job-1", metric="exact_match", optimizer="BootstrapFewShot", latest=1
    )
    assert (version["version"], version["parent_version"], version["created_by"]) == (2, 1, "job-1")
    assert version["score"] == 1.0
    for schema, record in [
        ("Response", progress),
        ("Response", final),
        ("ProgramVersion", version),
        ("Telemetry", jr.telemetry(head, 1.5, 0.75)),
    ]:
        assert serde.decode(serde.encode(schema, record, topic="t"), topic="t").record == record


def test_variable_updates_are_program_scoped_versioned_and_valid() -> None:
    search = {"temperature": {"min": 0, "max": 1, "steps": 3}}
    result, _ = optimize(spec_of(optimizer=None, search_json=json.dumps(search)), LOWTEMP)
    types = {"temperature": ("float", {"min": 0.0, "max": 2.0})}
    store = VariableStore()
    first = jr.variable_updates(result, types=types, store=store, job_id="j", metric="exact_match")
    assert len(first) == 1 and first[0]["scope_ref"] == "toy" and first[0]["version"] == 1
    assert (first[0]["source"], first[0]["updated_by"], first[0]["value_json"]) == (
        "optimizer",
        "j",
        "0.0",
    )
    validate_update(first[0])
    assert store.apply("program/toy/temperature", first[0]) is None
    again = jr.variable_updates(result, types=types, store=store, job_id="k", metric="exact_match")
    assert again[0]["version"] == 2 and again[0]["previous_value_json"] == "0.0"


# -- the client side --------------------------------------------------------------------------


def test_job_record_needs_a_metric_and_exactly_one_dataset() -> None:
    record = job_record(
        "toy", {"metric": "f1", "dataset": [{"word": "a", "answer": "a"}]}, reply_topic=None
    )
    assert record["program_id"] == "toy" and json.loads(record["dataset_json"])[0]["word"] == "a"
    with pytest.raises(InvalidRequest, match="exactly one"):
        job_record("toy", {"metric": "f1"}, reply_topic=None)
    with pytest.raises(InvalidRequest) as caught:
        job_record("toy", {"dataset_topic": "x"}, reply_topic=None)
    assert caught.value.field == "metric"
    with pytest.raises(TypeError, match="unknown job option"):
        # the unknown key is the point: what a caller without mypy can pass at run time
        job_record(
            "toy",
            {"metric": "f1", "dataset_topic": "x", "colour": 1},  # type: ignore[typeddict-unknown-key]
            reply_topic=None,
        )


def test_cli_search_syntax() -> None:
    assert parse_search(["temperature=0:1:3", "model=good,bad", "max_tokens=64,128"]) == {
        "temperature": {"min": 0, "max": 1, "steps": 3},
        "model": {"choices": ["good", "bad"]},
        "max_tokens": {"choices": [64, 128]},
    }
    with pytest.raises(ConfigError):
        parse_search(["temperature"])


def test_job_inbox_keeps_arrival_order_across_a_restart_and_stops_at_the_final_chunk() -> None:
    async def scenario() -> list[tuple[int, bool]]:
        from datetime import UTC, datetime

        inbox = JobInbox("job", datetime.now(UTC), asyncio.get_running_loop().time() + 5, 0.0)
        for seq, final in [(0, False), (1, False), (0, False), (1, True), (2, True)]:
            inbox.put(Chunk("job", seq, final, "progress", "", None, None, False, "optimizer"))
        received = []
        while True:
            chunk = await inbox.next()
            received.append((chunk.seq, chunk.final))
            if chunk.final:
                return received

    # the second attempt restarts at seq 0: nothing is dropped, nothing after the final
    assert asyncio.run(scenario()) == [(0, False), (1, False), (0, False), (1, True)]


def test_a_runner_refuses_a_poll_interval_below_the_session_timeout() -> None:
    settings = load_settings(jobs={"max_poll_interval_s": 5}, reliability={"session_timeout_s": 10})
    with pytest.raises(ConfigError, match=r"max_poll_interval_s=5 must be at least"):
        JobRunner(settings)


def test_the_client_knows_the_metrics_the_runner_registers() -> None:
    assert sorted(METRIC_NAMES) == metric_names()


def test_the_client_check_refuses_what_the_runner_refuses_without_dspy() -> None:
    def record(**fields: Any) -> dict[str, Any]:
        base = job_record("toy", {"metric": "f1", "dataset": [{"q": "a"}]}, reply_topic=None)
        return {**base, **fields}

    cases = {
        "optimizer": record(optimizer="Foo"),
        "metric": record(optimizer="BootstrapFewShot", metric="nope"),
        "val_fraction": record(optimizer="BootstrapFewShot", val_fraction=1.5),
        "optimizer_config_json.max_rounds": record(
            optimizer="BootstrapFewShot", optimizer_config_json='{"max_rounds": 0}'
        ),
        "search_json.colour": record(search_json='{"colour": {"choices": [1]}}'),
    }
    for field, bad in cases.items():
        with pytest.raises(InvalidRequest) as caught:
            check_job(bad, backends=["sim"], max_trials=8)
        assert caught.value.field == field
    ok = check_job(record(optimizer="BootstrapFewShot"), backends=["sim"], max_trials=8)
    assert ok.optimizer == "BootstrapFewShot" and ok.trial_count == 1


def test_a_dataset_error_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"q": 1}\n\n{"q": 2}\n{"q": 3}\n{"q": 4, oops}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"train.jsonl line 5: .*\(column 10\)"):
        read_dataset(path)
    path.write_text('{"q": 1}\n[1]\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="line 2: an example must be a JSON object"):
        read_dataset(path)


def test_a_piped_follow_prints_a_line_per_progress_without_repeating_the_phase() -> None:
    from dspex.streams.cli import optimize as cli

    def progress(phase: str, message: str, best: float | None, trials: int = 0) -> JobProgress:
        return JobProgress("j", phase, 1 if trials else 0, trials, None, best, message, None, "")

    assert cli._headline(progress("compile", "compile finished: 9 LM calls", None)) == (
        "compile finished: 9 LM calls"
    )
    baseline = progress("baseline", "4 train / 4 val", None)
    assert cli._headline(baseline) == "baseline 4 train / 4 val"
    seen = cli._Seen()
    for step in (progress("baseline", "", 0.25), progress("compile", "started", None, 3)):
        seen.update(step)
    assert (seen.best_text(), seen.trials) == ("0.2500", 3)
