"""Optimizing a whole pipeline: its stages as one in-process ``dspy.Module``, compiled at once.

A job whose ``program_id`` is ``pipeline:<id>`` (:func:`dspex.streams.optimizers.pipeline_target`;
``program_version`` pins the pipeline version) runs here instead of
:class:`~dspex.agents.jobs.optimize.Optimization`:

1. the pipeline version is read into a :class:`~dspex.streams.pipelines.plan.Plan` and built
   into one in-process module (:mod:`dspex.agents.jobs.pipemodule`: each stage's program a
   sub-module, run in the plan's order with the pipeline agent's semantics), so DSPy's
   optimizers see an ordinary multi-predictor program;
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
from dataclasses import dataclass, field
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
from dspex.agents.jobs.pipemodule import PipelineModule, StagePrograms, stage_programs
from dspex.agents.plumbing.messages import Outgoing
from dspex.agents.runtime.programs import ProgramSpec
from dspex.agents.runtime.scoring import Metric
from dspex.agents.runtime.signatures import parse_signature
from dspex.schemas.records import Record
from dspex.streams.client.programs import program_version_record, read_versions
from dspex.streams.errors import InvalidRequest
from dspex.streams.optimizers import pipeline_target
from dspex.streams.pipelines.plan import Plan
from dspex.streams.pipelines.spec import Pipeline
from dspex.streams.reader import read_to_end
from dspex.streams.serde import Serde
from dspex.streams.settings import Settings
from dspex.streams.signatures import type_name
from dspex.streams.topics import Topics

logger = logging.getLogger(__name__)

__all__ = ["PipelineJob", "PipelineResult", "encode_records", "is_pipeline_job"]


def is_pipeline_job(spec: JobSpec) -> bool:
    """Whether the job optimizes a whole pipeline (``program_id`` = ``pipeline:<id>``)."""
    return pipeline_target(spec.program_id) is not None


@dataclass(frozen=True)
class PipelineResult:
    """What a pipeline job found and the records that publish it (empty until numbered by
    :attr:`republish`, and without improvement)."""

    score_before: float
    score_after: float
    records: list[tuple[str, str, str, Record]]
    """``(topic, key, schema, record)``: the ProgramVersions, then the PipelineVersion."""
    programs: dict[str, int]
    """Program id -> the version the new pipeline version pins."""
    pipeline_version: int | None
    republish: Callable[[int], PipelineResult] | None = field(default=None, compare=False)
    """On improvement: the result numbered after the pipeline's latest version ``latest``,
    with the stage programs' versions read then (the job runner calls it inside the
    transaction fenced per pipeline)."""

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

        def republish(latest: int) -> PipelineResult:
            current = self._program_versions()
            result = self._publish(record, programs, (base, compiled), scores, current, latest)
            return dataclasses.replace(result, republish=republish)

        # numbered only when committed, inside the pipeline's fence (the job runner)
        return PipelineResult(before, after, [], {}, None, republish=republish)

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
        latest: int,
    ) -> PipelineResult:
        """Next versions of the changed stage programs and a pipeline version pinning them
        (``latest``: the pipeline's latest version)."""
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
            newest = max((int(r["version"]) for r in versions.get(program_id, [])), default=0)
            pins[program_id] = newest + 1
            new = _version(program, state, newest + 1, spec, after, description)
            out.append((programs_topic, program_id, "ProgramVersion", new))
        pipeline = Pipeline.from_record(record)
        stages = tuple(
            dataclasses.replace(s, program_version=pins[s.program_id]) if s.program_id else s
            for s in pipeline.stages
        )
        pipelines_topic = self._topics.name("pipelines")
        pinned = dataclasses.replace(pipeline, stages=stages, description=description)
        new = pinned.to_record(version=latest + 1, created_by=job_id)
        out.append((pipelines_topic, self.pipeline_id, "PipelineVersion", new))
        return PipelineResult(before, after, out, pins, latest + 1)


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
