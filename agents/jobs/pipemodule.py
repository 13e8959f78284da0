"""A pipeline version as one in-process ``dspy.Module``: what a pipeline job compiles.

:func:`stage_programs` gives each stage its program — a registered one from its
ProgramVersion (JSON state, module type and config, tools, adapter; a deployed module from
the ``modules`` allowlist), an inline signature as its module type (Predict by default) —
and :class:`PipelineModule` holds them as sub-modules (stages naming one program share one
module) and runs them in the plan's order with the pipeline agent's semantics, so DSPy's
optimizers see an ordinary multi-predictor program (:mod:`dspex.agents.jobs.pipeline_opt`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import dspy

from dspex.agents.runtime.adapters import adapter_name, make_adapter
from dspex.agents.runtime.modules import DeployedModules
from dspex.agents.runtime.programs import ProgramBuilder, ProgramSpec, spec_from_version
from dspex.agents.runtime.signatures import parse_signature
from dspex.agents.runtime.tools import deployed_tools
from dspex.schemas.records import Record
from dspex.streams.errors import InvalidRequest
from dspex.streams.pipelines.plan import Plan, StagePlan
from dspex.streams.pipelines.refs import Ref, resolve
from dspex.streams.settings import Settings

logger = logging.getLogger(__name__)

__all__ = ["PipelineModule", "StagePrograms", "stage_attr", "stage_programs"]


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
        if not known:
            raise InvalidRequest(where, f"no program {stage.program_id!r} is registered")
        wanted = stage.program_version or max(known)
        if wanted not in known:
            raise InvalidRequest(where, f"program {stage.program_id} has no version {wanted}")
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
