"""Optimizing a whole pipeline: its stages as one in-process ``dspy.Module``, compiled at once.

A job whose ``program_id`` is ``pipeline:<id>`` (:func:`dspex.streams.optimizers.pipeline_target`;
``program_version`` pins the pipeline version) runs here instead of
:class:`~dspex.agents.jobs.optimize.Optimization`:

1. the pipeline version is read into a :class:`~dspex.streams.pipelines.plan.Plan`, and each
   stage gets its program: a registered one from its ProgramVersion (JSON state, module type,
   adapter; a deployed module from the ``modules`` allowlist), an inline signature as its
   module type (Predict by default). Stages that name the same program share one module;
   :class:`PipelineModule` holds them as sub-modules and runs them in the plan's order
   (a ``map`` stage loops over its items, a ``when`` stage runs only when its condition holds,
   an optional stage that fails yields its defaults) — so DSPy's optimizers see an ordinary
   multi-predictor program;
2. **baseline** and **after** are scored in the runner on the held-out examples (run inputs
   and labelled run outputs) with the job's metric on the pipeline's final outputs: the
   candidates are not published yet, and a pipeline run names published versions only;
3. **compile**: DSPy's optimizer (BootstrapFewShot, MIPROv2, ...) on the training examples,
   with the compile LM; proposed instructions stay only if they score higher (as for programs);
4. on improvement, every registered stage program whose state changed becomes its next
   ProgramVersion, and a new PipelineVersion pins every registered stage to its version —
   all returned as records for the runner's one Kafka transaction.

Inline stages are compiled with the rest but their state has nowhere to go (a
``PipelineStage`` holds no state): their demos are cleared before the final score, so the
score is that of what is published. Register a stage's program to have it optimized.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dspy

from dspex.agents.jobs.datasets import examples_from_json, examples_from_topic, split
from dspex.agents.jobs.jobspec import JobSpec
from dspex.agents.jobs.optimize import (
    JobCancelled,
    Progress,
    _Watch,
    build_optimizer,
    export_state,
)
from dspex.agents.plumbing.messages import Outgoing
from dspex.agents.runtime.adapters import adapter_name, make_adapter
from dspex.agents.runtime.modules import DeployedModules
from dspex.agents.runtime.programs import ProgramBuilder, ProgramSpec, spec_from_version
from dspex.agents.runtime.scoring import Metric
from dspex.agents.runtime.signatures import parse_signature
from dspex.agents.runtime.tools import deployed_tools
from dspex.schemas.records import Record
from dspex.streams.client.programs import program_version_record, read_versions
from dspex.streams.errors import InvalidRequest
from dspex.streams.optimizers import pipeline_target
from dspex.streams.pipelines.plan import Plan, StagePlan
from dspex.streams.pipelines.refs import Ref, resolve
from dspex.streams.pipelines.spec import Pipeline
from dspex.streams.reader import read_to_end
from dspex.streams.serde import Serde
from dspex.streams.settings import Settings
from dspex.streams.signatures import type_name
from dspex.streams.topics import Topics

logger = logging.getLogger(__name__)

__all__ = ["PipelineJob", "PipelineModule", "PipelineResult", "is_pipeline_job"]


def is_pipeline_job(spec: JobSpec) -> bool:
    """Whether the job optimizes a whole pipeline (``program_id`` = ``pipeline:<id>``)."""
    return pipeline_target(spec.program_id) is not None


class _Missing(Exception):
    """A reference a skipped stage never produced (the stages reading it are skipped too)."""


class PipelineModule(dspy.Module):  # type: ignore[misc]
    """A pipeline version run in-process: one sub-module per stage program, in plan order.

    The same semantics as the pipeline agent's :class:`~dspex.agents.pipeline.run.Run`,
    without Kafka: references resolve against the run inputs and earlier stages' outputs;
    a map stage's outputs are lists in item order; a false ``when`` (or a missing input)
    skips a stage, its defaults standing for its outputs; an optional stage's failure
    yields its defaults. Stages naming the same program share one module.
    """

    def __init__(
        self, plan: Plan, modules: Mapping[str, dspy.Module], specs: Mapping[str, ProgramSpec]
    ):
        super().__init__()
        self.plan = plan
        self.specs = dict(specs)
        for name in plan.order():
            setattr(self, stage_attr(name), modules[name])

    def stage_module(self, name: str) -> dspy.Module:
        """The module stage ``name`` runs."""
        module: dspy.Module = getattr(self, stage_attr(name))
        return module

    def forward(self, **inputs: Any) -> dspy.Prediction:
        results: dict[str, dict[str, Any]] = {}
        for name in self.plan.order():
            stage = self.plan.stage(name)
            try:
                results[name] = self._stage(stage, inputs, results)
            except _Missing:
                results[name] = dict(stage.defaults)
            except Exception:
                if not stage.optional:
                    raise
                logger.info("optional stage failed stage=%s: defaults used", name, exc_info=True)
                results[name] = dict(stage.defaults)
        outputs = {}
        for field, ref in self.plan.outputs.items():
            try:
                outputs[field] = _value(ref, inputs, results)
            except _Missing:
                outputs[field] = None  # its stage was skipped (the agent answers null too)
        return dspy.Prediction(**outputs)

    def _stage(
        self, stage: StagePlan, inputs: Mapping[str, Any], results: Mapping[str, Any]
    ) -> dict[str, Any]:
        if stage.when is not None and not stage.when.holds(_value(stage.when.ref, inputs, results)):
            return dict(stage.defaults)
        if stage.map_over is None:
            return self._call(stage, inputs, results, None)
        items = _value(stage.map_over, inputs, results)
        if not isinstance(items, list):
            raise TypeError(f"stage {stage.name}: {stage.map_over} is not a list")
        each = [self._call(stage, inputs, results, item) for item in items]
        fields = sorted({name for outputs in each for name in outputs})
        return {field: [outputs.get(field) for outputs in each] for field in fields}

    def _call(
        self, stage: StagePlan, inputs: Mapping[str, Any], results: Mapping[str, Any], item: Any
    ) -> dict[str, Any]:
        kwargs = {name: _value(ref, inputs, results, item) for name, ref in stage.inputs.items()}
        spec = self.specs[stage.name]
        signature = parse_signature(spec.signature)  # the program's, as the worker runs it
        for name, field in signature.input_fields.items():  # no session here: empty History
            if field.annotation is dspy.History and name not in kwargs:
                kwargs[name] = dspy.History(messages=[])
        adapter = make_adapter(adapter_name(spec.adapter, {}), dspy.settings.lm, signature)
        with dspy.context(adapter=adapter):
            return _fields(self.stage_module(stage.name)(**kwargs))


def _fields(prediction: dspy.Prediction) -> dict[str, Any]:
    return {name: prediction[name] for name in prediction.keys()}


def stage_attr(name: str) -> str:
    """The attribute a stage's module is held under (predictor names start with it)."""
    return f"stage_{name}"


def _value(
    ref: Ref, inputs: Mapping[str, Any], results: Mapping[str, Any], item: Any = None
) -> Any:
    try:
        return resolve(ref, inputs, results, item)
    except KeyError:
        raise _Missing(str(ref)) from None


@dataclass(frozen=True)
class StagePrograms:
    """The programs of a pipeline's stages: registered ones by id, and each stage's spec."""

    specs: Mapping[str, ProgramSpec]
    """Stage name -> the program it runs (registered: the resolved version)."""
    registered: Mapping[str, ProgramSpec]
    """Program id -> the version the stages run (one per program)."""

    def build(self, settings: Settings) -> tuple[dict[str, dspy.Module], Mapping[str, ProgramSpec]]:
        """Fresh modules per stage (one per program id), and each stage's program spec."""
        tools = deployed_tools(settings.tools)
        deployed = DeployedModules.load(settings.modules)
        shared: dict[str, dspy.Module] = {}
        modules: dict[str, dspy.Module] = {}
        for name, spec in self.specs.items():
            key = spec.program_id or f"inline:{name}"
            if key not in shared:  # a builder per module: its cache must not share instances
                shared[key] = ProgramBuilder(tools, modules=deployed, max_size=1).build(spec)
            modules[name] = shared[key]
        return modules, self.specs


def stage_programs(plan: Plan, versions: Mapping[str, list[Record]]) -> StagePrograms:
    """Each stage's program; ``InvalidRequest`` names the stage when one cannot be had."""
    specs: dict[str, ProgramSpec] = {}
    registered: dict[str, ProgramSpec] = {}
    for stage in plan.stages:
        where = f"stages.{stage.name}"
        if stage.program_id is None:
            specs[stage.name] = ProgramSpec(str(stage.signature), stage.module_type or "Predict")
            continue
        known = {int(r["version"]): r for r in versions.get(stage.program_id, [])}
        wanted = stage.program_version or max(known, default=0)
        if wanted not in known:
            raise InvalidRequest(where, f"program {stage.program_id} v{wanted} is not registered")
        spec = spec_from_version(known[wanted])
        held = registered.setdefault(stage.program_id, spec)
        if held.version != spec.version:
            raise InvalidRequest(
                where,
                f"program {stage.program_id} runs as v{held.version} and v{spec.version} in "
                "this pipeline: a pipeline job optimizes one version of each program",
            )
        specs[stage.name] = spec
    return StagePrograms(specs, registered)


@dataclass(frozen=True)
class PipelineResult:
    """What a pipeline job found and the records that publish it (empty without improvement)."""

    score_before: float
    score_after: float
    records: list[tuple[str, str, str, Record]]
    """``(topic, key, schema, record)``: the ProgramVersions, then the PipelineVersion."""
    programs: dict[str, int]
    """Program id -> the version the new pipeline version pins."""
    pipeline_version: int | None

    @property
    def improved(self) -> bool:
        return self.score_after > self.score_before

    def summary(self, spec: JobSpec) -> str:
        """One log line: the scores and the pipeline version published."""
        scores = f"{self.score_before:.4f} -> {self.score_after:.4f}"
        return f"{spec.metric_name} {scores} pipeline_version={self.pipeline_version}"

    def outputs(self, spec: JobSpec) -> dict[str, Any]:
        """The final Response's outputs (as a program job's, plus what the pipeline pins)."""
        return {
            "score_before": self.score_before,
            "score_after": self.score_after,
            "improved": self.improved,
            "optimizer": spec.optimizer,
            "metric": spec.metric_name,
            "pipeline_id": pipeline_target(spec.program_id),
            "pipeline_version": self.pipeline_version,
            "program_versions": self.programs if self.improved else {},
            "program_version": None,
            "variables": {},
        }


class PipelineJob:
    """One pipeline job (see the module doc); ``run`` returns its result or raises."""

    def __init__(
        self,
        settings: Settings,
        serde: Serde,
        spec: JobSpec,
        *,
        compile_lm: dspy.BaseLM,
        cancel: threading.Event,
        progress: Callable[[Progress], None],
    ) -> None:
        self._settings = settings
        self._serde = serde
        self._spec = spec
        self._lm = compile_lm
        self._cancel = cancel
        self._progress = progress
        self._topics = Topics(settings.topics)
        self.pipeline_id = str(pipeline_target(spec.program_id))

    async def run(self) -> PipelineResult:
        """Read, baseline, compile, score, and the records to publish on improvement."""
        record = await asyncio.to_thread(self._pipeline_record)
        plan = Plan.from_record(record)
        versions = await asyncio.to_thread(self._program_versions)
        programs = stage_programs(plan, versions)
        train, val = await asyncio.to_thread(self._examples, plan)
        self._progress(Progress("baseline", message=f"{len(train)} train / {len(val)} val"))
        base = PipelineModule(plan, *programs.build(self._settings))
        before = await asyncio.to_thread(self._score, base, val)
        self._progress(Progress("baseline", score=before, best=before))
        compiled = await asyncio.to_thread(self._compile, base, train)
        after = await asyncio.to_thread(self._score, compiled, val)
        compiled, after = await self._earned_instructions(compiled, base, val, after)
        self._progress(Progress("score", trial=1, trials=1, score=after, best=max(after, before)))
        if after <= before:
            return PipelineResult(before, after, [], {}, None)
        scores = (before, after)
        return await asyncio.to_thread(
            self._publish, record, programs, (base, compiled), scores, versions
        )

    # -- reading ------------------------------------------------------------------------

    def _pipeline_record(self) -> Record:
        topic = self._topics.name("pipelines")
        found = read_to_end(
            self._settings, self._serde, topic, "PipelineVersion", key=self.pipeline_id
        )
        known = {int(r["version"]): r for _, r in found if r is not None}
        if not known:
            raise InvalidRequest("program_id", f"no pipeline {self.pipeline_id!r} on {topic}")
        wanted = self._spec.program_version or max(known)
        if wanted not in known:
            raise InvalidRequest(
                "program_version", f"pipeline {self.pipeline_id} has no version {wanted}"
            )
        return known[wanted]

    def _program_versions(self) -> dict[str, list[Record]]:
        topic = self._topics.name("programs")
        return read_versions(self._settings, self._serde, topic)

    def _examples(self, plan: Plan) -> tuple[list[dspy.Example], list[dspy.Example]]:
        inputs = ", ".join(f"{name}: {type_name(kind)}" for name, kind in plan.inputs)
        signature = parse_signature(f"{inputs} -> {', '.join(plan.outputs)}")
        spec = self._spec
        if spec.dataset_json is not None:
            examples = examples_from_json(spec.dataset_json, signature)
        else:
            topic = str(spec.dataset_topic)
            examples = examples_from_topic(self._settings, self._serde, topic, signature)
        limit = self._settings.jobs.max_examples
        if len(examples) > limit:
            raise InvalidRequest("dataset_json", f"{len(examples)} examples, over {limit}")
        return split(examples, spec.val_fraction, spec.job_id)

    # -- scoring and compiling ----------------------------------------------------------

    def _score(self, module: PipelineModule, examples: Sequence[dspy.Example]) -> float:
        """The mean metric over ``examples``, run in-process on the compile LM (errors: 0)."""
        scores = []
        with dspy.context(lm=self._lm, callbacks=[_Watch(self._cancel, _quiet)]):
            for example in examples:
                scores.append(_scored(self._spec.metric, module, example))
        return sum(scores) / len(scores) if scores else 0.0

    def _compile(self, base: PipelineModule, train: list[dspy.Example]) -> PipelineModule:
        if self._cancel.is_set():
            raise JobCancelled
        watch = _Watch(self._cancel, self._progress)
        with dspy.context(lm=self._lm, callbacks=[watch]):
            optimizer, kwargs = build_optimizer(self._spec, self._lm, len(train))
            self._progress(Progress("compile", message=f"{self._spec.optimizer} started"))
            compiled: PipelineModule = optimizer.compile(base, trainset=train, **kwargs)
        watch.report(final=True)
        for stage in compiled.plan.stages:  # an inline stage's state has nowhere to be published
            if stage.program_id is None:
                for predictor in compiled.stage_module(stage.name).predictors():
                    predictor.demos = []
        return compiled

    async def _earned_instructions(
        self,
        compiled: PipelineModule,
        base: PipelineModule,
        val: Sequence[dspy.Example],
        after: float,
    ) -> tuple[PipelineModule, float]:
        """Proposed instructions stay only if they beat the compiled demos with the originals."""
        original = {name: p.signature.instructions for name, p in base.named_predictors()}
        plain = compiled.deepcopy()
        changed = False
        for name, predictor in plain.named_predictors():
            if predictor.signature.instructions != original.get(name):
                predictor.signature = predictor.signature.with_instructions(original[name])
                changed = True
        if not changed:
            return compiled, after
        kept = await asyncio.to_thread(self._score, plain, val)
        better = after > kept
        message = (
            f"proposed instructions {'kept' if better else 'dropped'}: {after:.4f} vs {kept:.4f}"
        )
        self._progress(Progress("compile", message=message))
        return (compiled, after) if better else (plain, kept)

    # -- publishing -----------------------------------------------------------------------

    def _publish(
        self,
        record: Record,
        programs: StagePrograms,
        modules: tuple[PipelineModule, PipelineModule],
        scores: tuple[float, float],
        versions: Mapping[str, list[Record]],
    ) -> PipelineResult:
        """Next versions of the changed stage programs and a pipeline version pinning them."""
        spec, job_id = self._spec, self._spec.job_id
        (base, compiled), (before, after) = modules, scores
        what = f"{spec.optimizer} pipeline job {job_id} ({self.pipeline_id}): {spec.metric_name}"
        description = f"{what} {before:.4f} -> {after:.4f}"
        out: list[tuple[str, str, str, Record]] = []
        pins: dict[str, int] = {}
        programs_topic = self._topics.name("programs")
        for program_id, program in programs.registered.items():
            stage = next(n for n, s in programs.specs.items() if s.program_id == program_id)
            state = export_state(compiled.stage_module(stage))
            if state == export_state(base.stage_module(stage)):  # nothing learnt for it
                pins[program_id] = int(program.version or 0)
                continue
            latest = max((int(r["version"]) for r in versions.get(program_id, [])), default=0)
            pins[program_id] = latest + 1
            new = _version(program, state, latest + 1, spec, after, description)
            out.append((programs_topic, program_id, "ProgramVersion", new))
        pipeline = Pipeline.from_record(record)
        stages = tuple(
            dataclasses.replace(s, program_version=pins[s.program_id]) if s.program_id else s
            for s in pipeline.stages
        )
        pipelines_topic = self._topics.name("pipelines")
        latest = self._latest_pipeline_version(pipelines_topic)
        pinned = dataclasses.replace(pipeline, stages=stages, description=description)
        new = pinned.to_record(version=latest + 1, created_by=job_id)
        out.append((pipelines_topic, self.pipeline_id, "PipelineVersion", new))
        return PipelineResult(before, after, out, pins, latest + 1)

    def _latest_pipeline_version(self, topic: str) -> int:
        found = read_to_end(
            self._settings, self._serde, topic, "PipelineVersion", key=self.pipeline_id
        )
        return max((int(r["version"]) for _, r in found if r is not None), default=0)


def encode_records(serde: Serde, records: Sequence[tuple[str, str, str, Record]]) -> list[Outgoing]:
    """The result's records, encoded for the runner's transaction."""
    return [
        Outgoing(topic, key.encode(), serde.encode(schema, record, topic=topic))
        for topic, key, schema, record in records
    ]


def _version(
    base: ProgramSpec, state: str, number: int, spec: JobSpec, score: float, description: str
) -> Record:
    return program_version_record(
        base.program_id or "",
        base.signature,
        version=number,
        parent_version=base.version,
        module_type=base.module_type,
        state_json=state,
        module_config_json=base.module_config_json,
        tools=base.tools,
        metric=spec.metric_name,
        description=description,
        created_by=spec.job_id,
        score=score,
        adapter=base.adapter,
    )


def _scored(metric: Metric, module: PipelineModule, example: dspy.Example) -> float:
    try:
        return float(metric(example, module(**example.inputs())))
    except JobCancelled:
        raise
    except Exception:  # a failed run (or a metric choking on it) scores 0, as a failed request
        logger.info("pipeline run failed in scoring", exc_info=True)
        return 0.0


def _quiet(_: Progress) -> None:
    """Scoring reports no compile progress."""
