"""A pipeline spec turned once into what running it needs: the execution plan.

A ``PipelineVersion`` record is read once, into the frozen spec
(:class:`~dspex.streams.pipelines.spec.Pipeline`, what
:func:`~dspex.streams.pipelines.validate.check` validates), and the plan is built from
that spec (:meth:`Plan.from_spec`): the router validates the spec and runs the plan of
the same spec, once per pipeline version (it caches both), and checks each run's inputs
with :meth:`Plan.check_run_inputs`; the pipeline agent schedules stages from
:class:`StagePlan`. References are parsed with :mod:`dspex.streams.pipelines.refs` and
condition values decoded from JSON; nothing is evaluated. Building a plan still refuses
what execution cannot run (an unknown reference target, a cycle, a bad reference) with
the path named, for a spec that reaches it unvalidated; the full validation (field types
against stage signatures, unknown keys) is :mod:`~dspex.streams.pipelines.validate`'s.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dspex.streams.errors import InvalidRequest
from dspex.streams.pipelines.refs import Ref, parse_ref
from dspex.streams.pipelines.spec import Condition as SpecCondition
from dspex.streams.pipelines.spec import Pipeline, Stage
from dspex.streams.signatures import Field, decode_value, parse_field_list

__all__ = ["Condition", "Plan", "StagePlan", "json_equal"]


@dataclass(frozen=True)
class Condition:
    """A stage's ``when``: run only if the value ``ref`` names equals one of ``values``."""

    ref: Ref
    values: tuple[Any, ...]

    def holds(self, value: Any) -> bool:
        """Whether ``value`` (decoded JSON) equals one of the accepted values."""
        return any(json_equal(value, accepted) for accepted in self.values)


@dataclass(frozen=True)
class StagePlan:
    """One stage as the agent runs it."""

    name: str
    program_id: str | None
    program_version: int | None
    signature: str | None
    module_type: str | None
    inputs: Mapping[str, Ref]
    map_over: Ref | None
    map_concurrency: int
    when: Condition | None
    optional: bool
    defaults: Mapping[str, Any]
    pool_hint: str | None

    def refs(self) -> list[Ref]:
        """Every reference the stage reads: its inputs, its map list and its condition."""
        found = list(self.inputs.values())
        if self.map_over is not None:
            found.append(self.map_over)
        if self.when is not None:
            found.append(self.when.ref)
        return found

    def after(self) -> set[str]:
        """The stages whose outputs this one reads (it starts once they are done)."""
        return {ref.stage for ref in self.refs() if ref.kind == "stage" and ref.stage}


@dataclass(frozen=True)
class Plan:
    """A pipeline version ready to run."""

    pipeline_id: str
    version: int
    inputs: tuple[Field, ...]
    stages: tuple[StagePlan, ...]
    outputs: Mapping[str, Ref]

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Plan:
        """The plan of a decoded PipelineVersion (through its spec); errors name the path."""
        return cls.from_spec(Pipeline.from_record(record), int(record["version"]))

    @classmethod
    def from_spec(cls, pipeline: Pipeline, version: int) -> Plan:
        """The plan of ``pipeline`` as ``version``; :class:`InvalidRequest` names the path."""
        fields = parse_field_list(pipeline.inputs, field="inputs")
        stages = tuple(_stage(stage) for stage in pipeline.stages)
        names = [stage.name for stage in stages]
        if len(set(names)) != len(names):
            raise InvalidRequest("stages", f"stage names must be unique: {names}")
        outputs = {
            name: parse_ref(text, where=f"outputs.{name}")
            for name, text in pipeline.outputs.items()
        }
        plan = cls(pipeline.pipeline_id, version, fields, stages, outputs)
        plan._check_targets()
        plan.order()
        return plan

    def stage(self, name: str) -> StagePlan:
        """The stage called ``name`` (KeyError when there is none)."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def order(self) -> list[str]:
        """Stage names with every stage after those it reads; a cycle is refused."""
        done: list[str] = []
        waiting = {stage.name: stage.after() for stage in self.stages}
        while waiting:
            ready = sorted(name for name, after in waiting.items() if after <= set(done))
            if not ready:
                raise InvalidRequest("stages", f"cycle between stages {sorted(waiting)}")
            done += ready
            for name in ready:
                del waiting[name]
        return done

    def check_run_inputs(self, inputs: Mapping[str, str]) -> dict[str, Any]:
        """A run's JSON-encoded inputs decoded and type-checked; errors name ``inputs.<field>``."""
        declared = dict(self.inputs)
        for name in inputs:
            if name not in declared:
                raise InvalidRequest(
                    f"inputs.{name}",
                    f"not an input of pipeline {self.pipeline_id!r} v{self.version} "
                    f"(inputs: {', '.join(declared)})",
                )
        decoded: dict[str, Any] = {}
        for name, annotation in declared.items():
            if name not in inputs:
                raise InvalidRequest(
                    f"inputs.{name}", f"missing: pipeline {self.pipeline_id!r} needs it"
                )
            decoded[name] = decode_value(f"inputs.{name}", inputs[name], annotation)
        return decoded

    def _check_targets(self) -> None:
        inputs = {name for name, _ in self.inputs}
        stages = {stage.name for stage in self.stages}
        for stage in self.stages:
            for ref in stage.refs():
                _check_target(ref, inputs, stages, f"stages.{stage.name}", stage)
        for name, ref in self.outputs.items():
            _check_target(ref, inputs, stages, f"outputs.{name}", None)


def _check_target(
    ref: Ref, inputs: set[str], stages: set[str], where: str, stage: StagePlan | None
) -> None:
    if ref.kind == "input" and ref.field not in inputs:
        raise InvalidRequest(where, f"{ref} names no input of the pipeline")
    if ref.kind == "stage" and ref.stage not in stages:
        raise InvalidRequest(where, f"{ref} names no stage of the pipeline")
    if ref.kind == "stage" and stage is not None and ref.stage == stage.name:
        raise InvalidRequest(where, f"{ref}: a stage cannot read its own outputs")
    if ref.kind == "item" and (stage is None or stage.map_over is None):
        raise InvalidRequest(where, f"{ref} is only meaningful inside a map stage")


def _stage(stage: Stage) -> StagePlan:
    where = f"stages.{stage.name}"
    if bool(stage.program_id) == bool(stage.signature):
        raise InvalidRequest(where, "set exactly one of program_id and signature")
    concurrency = stage.map_concurrency
    if concurrency < 1:
        raise InvalidRequest(f"{where}.map_concurrency", f"must be >= 1, got {concurrency}")
    over = stage.map_over
    return StagePlan(
        name=stage.name,
        program_id=stage.program_id,
        program_version=stage.program_version,
        signature=stage.signature,
        module_type=stage.module_type,
        inputs={
            field: parse_ref(text, where=f"{where}.inputs.{field}")
            for field, text in stage.inputs.items()
        },
        map_over=None if over is None else parse_ref(over, where=f"{where}.map_over"),
        map_concurrency=concurrency,
        when=None if stage.when is None else _condition(stage.when, f"{where}.when"),
        optional=stage.optional,
        defaults=_json_values(stage.defaults, f"{where}.defaults"),
        pool_hint=stage.pool_hint,
    )


def _condition(when: SpecCondition, where: str) -> Condition:
    values = _json_values(dict(enumerate(when.values)), f"{where}.values")
    return Condition(parse_ref(when.ref, where=f"{where}.ref"), tuple(values.values()))


def _json_values(raw: Mapping[Any, str], where: str) -> dict[Any, Any]:
    decoded = {}
    for key, text in raw.items():
        try:
            decoded[key] = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"{where}.{key}", f"not JSON: {exc}") from exc
    return decoded


def json_equal(left: Any, right: Any) -> bool:
    """Equality of decoded JSON values: ``true`` is not ``1``, ``1`` equals ``1.0``."""
    if isinstance(left, bool) or isinstance(right, bool):
        return isinstance(left, bool) and isinstance(right, bool) and left == right
    if isinstance(left, int | float) and isinstance(right, int | float):
        return bool(left == right)
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(map(json_equal, left, right))
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(json_equal(left[k], right[k]) for k in left)
    return type(left) is type(right) and left == right
