"""A pipeline as frozen data: :class:`Pipeline`, its :class:`Stage` s and :class:`Condition` s.

The same value comes from three places and goes back to each: the Python builder
(``Pipeline("support", inputs="question").stage(...).output(...)``), a YAML/JSON
file (:mod:`dspex.streams.pipelines.files`) and a ``PipelineVersion`` record
(:meth:`Pipeline.to_record` / :meth:`Pipeline.from_record`). Values compared by
``when`` and stage ``defaults`` are held JSON-encoded, as in the record, so a
record read from the topic is checked as it is, not as it was meant.

Building checks shapes only (a default must be JSON); what the stages mean is
checked by :func:`dspex.streams.pipelines.validate.validate`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any

from dspex.schemas import records
from dspex.schemas.records import Record
from dspex.schemas.times import now
from dspex.streams.errors import InvalidRequest
from dspex.streams.pipelines.problems import Problems
from dspex.streams.pipelines.refs import parse_ref

__all__ = [
    "DEFAULT_CONCURRENCY",
    "Condition",
    "Pipeline",
    "PublishedPipeline",
    "Stage",
    "condition_from",
    "encode_json",
    "stage_read",
]

DEFAULT_CONCURRENCY = 4
"""Map items run at once when a stage does not say (the record's default)."""

_EMPTY: Mapping[str, str] = MappingProxyType({})


def _frozen(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class Condition:
    """Run a stage only when the value at ``ref`` equals one of ``values`` (JSON-encoded)."""

    ref: str
    values: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", tuple(self.values))

    @classmethod
    def equals(cls, ref: str, *values: Any) -> Condition:
        """A condition on plain Python values (each JSON-encoded here)."""
        problems = Problems()
        encoded = [
            encode_json(value, f"when.values[{i}]", problems) for i, value in enumerate(values)
        ]
        problems.raise_if_any("?")
        return cls(ref, tuple(text for text in encoded if text is not None))

    def decoded(self) -> list[Any]:
        """The values as Python values (for display; raises ``ValueError`` on bad JSON)."""
        return [json.loads(value) for value in self.values]


@dataclass(frozen=True)
class Stage:
    """One stage: a registered program (``program_id``) or an inline ``signature``.

    Field names and defaults are the ``PipelineStage`` record's; ``inputs`` maps each
    of the program's input fields to a reference, ``defaults`` each output to JSON.
    """

    name: str
    program_id: str | None = None
    program_version: int | None = None
    signature: str | None = None
    module_type: str | None = None
    inputs: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    map_over: str | None = None
    map_concurrency: int = DEFAULT_CONCURRENCY
    when: Condition | None = None
    optional: bool = False
    defaults: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    pool_hint: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", _frozen(self.inputs))
        object.__setattr__(self, "defaults", _frozen(self.defaults))

    @property
    def is_map(self) -> bool:
        """Whether the stage runs once per item of ``map_over``."""
        return self.map_over is not None

    def references(self) -> tuple[tuple[str, str], ...]:
        """Every reference the stage reads, with its path in the stage: ``("inputs.q",
        "$input.q")``, ``("map.over", ...)``, ``("when.ref", ...)``."""
        found = [(f"inputs.{name}", text) for name, text in self.inputs.items()]
        if self.map_over is not None:
            found.append(("map.over", self.map_over))
        if self.when is not None:
            found.append(("when.ref", self.when.ref))
        return tuple(found)

    def upstream(self) -> frozenset[str]:
        """The stages this one reads (the outputs it waits for); malformed references aside."""
        names = (stage_read(text) for _, text in self.references())
        return frozenset(name for name in names if name is not None)

    def to_record(self) -> Record:
        """The ``PipelineStage`` record."""
        when = self.when
        return records.pipeline_stage(
            name=self.name,
            program_id=self.program_id,
            program_version=self.program_version,
            signature=self.signature,
            module_type=self.module_type,
            inputs=dict(self.inputs),
            map_over=self.map_over,
            map_concurrency=self.map_concurrency,
            when=records.stage_condition(ref=when.ref, values=list(when.values)) if when else None,
            optional=self.optional,
            defaults=dict(self.defaults),
            pool_hint=self.pool_hint,
        )

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Stage:
        """The stage of a decoded ``PipelineStage`` record."""
        when = record.get("when")
        return cls(
            name=record["name"],
            program_id=record.get("program_id"),
            program_version=record.get("program_version"),
            signature=record.get("signature"),
            module_type=record.get("module_type"),
            inputs=record.get("inputs") or {},
            map_over=record.get("map_over"),
            map_concurrency=int(record.get("map_concurrency", DEFAULT_CONCURRENCY)),
            when=Condition(when["ref"], tuple(when["values"])) if when else None,
            optional=bool(record.get("optional", False)),
            defaults=record.get("defaults") or {},
            pool_hint=record.get("pool_hint"),
        )


@dataclass(frozen=True)
class Pipeline:
    """A pipeline: run inputs (signature field syntax), stages, and output references.

    Also the builder: :meth:`stage` and :meth:`output` return a new pipeline::

        support = (
            Pipeline("support", inputs="question")
            .stage("retrieve", program="search", inputs={"query": "$input.question"})
            .stage("answer", signature="question, passages: list[str] -> answer",
                   inputs={"question": "$input.question",
                           "passages": "$stage.retrieve.passages"})
            .output(answer="$stage.answer.answer")
        )
    """

    pipeline_id: str
    inputs: str = ""
    stages: tuple[Stage, ...] = ()
    outputs: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        object.__setattr__(self, "outputs", _frozen(self.outputs))

    def stage(
        self,
        name: str,
        *,
        program: str | None = None,
        version: int | None = None,
        signature: str | None = None,
        module: str | None = None,
        inputs: Mapping[str, str] | None = None,
        map_over: str | None = None,
        concurrency: int | None = None,
        when: Condition | Mapping[str, Any] | None = None,
        optional: bool = False,
        defaults: Mapping[str, Any] | None = None,
        pool: str | None = None,
    ) -> Pipeline:
        """This pipeline with one more stage (see :class:`Stage`; ``defaults`` are plain values).

        ``when``: a :class:`Condition`, or ``{"ref": ..., "equals": value}`` /
        ``{"ref": ..., "values": [...]}`` as in a file. Raises :class:`InvalidPipeline`
        when a default or compared value is not JSON.
        """
        problems = Problems()
        path = f"stages.{name}"
        stage = Stage(
            name=name,
            program_id=program,
            program_version=version,
            signature=signature,
            module_type=module,
            inputs=inputs or {},
            map_over=map_over,
            map_concurrency=DEFAULT_CONCURRENCY if concurrency is None else concurrency,
            when=condition_from(when, f"{path}.when", problems),
            optional=optional,
            defaults=encode_defaults(defaults or {}, f"{path}.defaults", problems),
            pool_hint=pool,
        )
        problems.raise_if_any(self.pipeline_id)
        return dataclasses.replace(self, stages=(*self.stages, stage))

    def output(self, **refs: str) -> Pipeline:
        """This pipeline with more run outputs: ``answer="$stage.answer.answer"``."""
        return dataclasses.replace(self, outputs={**self.outputs, **refs})

    def stage_named(self, name: str) -> Stage | None:
        """The (first) stage called ``name``."""
        return next((stage for stage in self.stages if stage.name == name), None)

    def to_record(
        self, *, version: int, created_at: datetime | None = None, created_by: str = ""
    ) -> Record:
        """The ``PipelineVersion`` record of this pipeline as version ``version``."""
        return records.pipeline_version(
            pipeline_id=self.pipeline_id,
            version=version,
            inputs=self.inputs,
            stages=[stage.to_record() for stage in self.stages],
            outputs=dict(self.outputs),
            description=self.description,
            created_at=created_at or now(),
            created_by=created_by,
        )

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Pipeline:
        """The pipeline of a decoded ``PipelineVersion`` record (its version aside)."""
        return cls(
            pipeline_id=record["pipeline_id"],
            inputs=record["inputs"],
            stages=tuple(Stage.from_record(stage) for stage in record["stages"]),
            outputs=record["outputs"],
            description=record.get("description") or "",
        )


@dataclass(frozen=True)
class PublishedPipeline:
    """One version of a pipeline as the topic holds it."""

    pipeline: Pipeline
    version: int
    created_at: datetime
    created_by: str = ""

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> PublishedPipeline:
        """From a decoded ``PipelineVersion`` record."""
        return cls(
            pipeline=Pipeline.from_record(record),
            version=int(record["version"]),
            created_at=record["created_at"],
            created_by=record.get("created_by") or "",
        )


def stage_read(text: str) -> str | None:
    """The stage a reference reads (``$stage.<name>.<field>``); ``None`` for other or
    malformed references."""
    try:
        ref = parse_ref(text)
    except InvalidRequest:
        return None
    return ref.stage if ref.kind == "stage" else None


def encode_json(value: Any, path: str, problems: Problems) -> str | None:
    """``value`` JSON-encoded (compact), or ``None`` with a problem at ``path``."""
    try:
        return json.dumps(value, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        problems.add(path, f"not a JSON value: {exc}")
        return None


def encode_defaults(values: Mapping[str, Any], path: str, problems: Problems) -> dict[str, str]:
    """Each default JSON-encoded; those that cannot be are reported and left out."""
    encoded = {
        name: encode_json(value, f"{path}.{name}", problems) for name, value in values.items()
    }
    return {name: text for name, text in encoded.items() if text is not None}


_CONDITION_KEYS = ("ref", "equals", "values")


def condition_from(
    value: Condition | Mapping[str, Any] | None, path: str, problems: Problems
) -> Condition | None:
    """A :class:`Condition` from ``{"ref": R, "equals": V}`` or ``{"ref": R, "values": [...]}``."""
    if value is None or isinstance(value, Condition):
        return value
    if not isinstance(value, Mapping):
        problems.add(path, "expected a mapping with ref and equals (or values)")
        return None
    for key in value:
        if key not in _CONDITION_KEYS:
            problems.add(f"{path}.{key}", "unknown key (known: ref, equals, values)")
    ref = value.get("ref")
    if not isinstance(ref, str):
        problems.add(f"{path}.ref", "missing: a reference such as $stage.classify.label")
    if ("equals" in value) == ("values" in value):
        problems.add(path, "give exactly one of equals (one value) or values (a list)")
        return None
    plain = [value["equals"]] if "equals" in value else value["values"]
    if not isinstance(plain, list) or not plain:
        problems.add(f"{path}.values", "expected a non-empty list of values")
        return None
    encoded = [encode_json(item, f"{path}.values[{i}]", problems) for i, item in enumerate(plain)]
    texts = tuple(text for text in encoded if text is not None)
    return Condition(ref, texts) if isinstance(ref, str) and len(texts) == len(plain) else None
