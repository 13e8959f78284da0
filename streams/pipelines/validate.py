"""Validation of a pipeline against the programs it names: every problem, each with its path.

Pure: the programs' signatures come from a resolver, ``(program_id, version|None) ->
signature text | None`` (the client reads the programs topic; tests pass a dict),
so the client (before producing) and the agents (on every record) run the same
checks and refuse with the same words. :func:`validate` returns all problems;
:func:`check` raises them as one :class:`InvalidPipeline`.

What holds for a pipeline that passes (``docs/pipelines-spec.md``):

- names: the pipeline id, stage names (unique) and output names are well formed;
- each stage has exactly one of a registered program (which exists, at the pinned
  version if any) and an inline signature (which parses; module a known type the
  worker can build without tools or config);
- every reference parses and resolves: ``$input.f`` is a run input,
  ``$stage.s.f`` an output of another stage ``s``, ``$item[.f]`` only in a map stage
  (``.f`` only when items are objects); no stage reads itself or, through others,
  its own output (a cycle is named);
- a stage's inputs are exactly its program's input fields but a ``History`` one (the
  run's session fills that in: docs/sessions.md), each fed a value of a compatible
  type (``int`` fits ``float``; a map stage's ``f: T`` reads as ``list[T]``;
  ``$item`` has the element type of the list mapped over, which must be a list);
- ``when`` compares an upstream value with JSON values of its type; ``defaults``
  (only on optional stages) are outputs of the stage with JSON values of their type
  (per item for a map stage); ``map.concurrency >= 1``; a pool hint names a pool.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Collection, Mapping
from typing import Any

from dspex.streams._vartypes import MODULE_TYPES, NAME
from dspex.streams.errors import InvalidRequest
from dspex.streams.pipelines.graph import Deps, cycle_from, unordered
from dspex.streams.pipelines.problems import Problem, Problems
from dspex.streams.pipelines.refs import FIELD_NAME, STAGE_NAME, parse_ref
from dspex.streams.pipelines.spec import DEFAULT_CONCURRENCY, Pipeline, Stage, stage_read
from dspex.streams.settings import POOLS
from dspex.streams.signatures import (
    HISTORY,
    SignatureFields,
    decode_value,
    parse_field_list,
    parse_signature_fields,
    type_name,
)

__all__ = ["ProgramResolver", "Programs", "assignable", "check", "validate"]

ProgramResolver = Callable[[str, int | None], str | None]
"""``(program_id, version or None for the latest) -> signature text``, ``None`` if unknown."""
Programs = ProgramResolver | Mapping[str, str]
"""A resolver, or a mapping of program id to signature (any version)."""


class _Unknown:
    """The type of a value whose source is already reported broken: fits anything."""

    def __repr__(self) -> str:
        return "unknown"


UNKNOWN: Any = _Unknown()
MODULE_RESERVED = frozenset(
    {"reasoning", "trajectory", "next_thought", "next_tool_name", "next_tool_args"}
)
"""Field names a module other than Predict adds itself (a unit test keeps this equal to
the runtime's list)."""


def validate(
    pipeline: Pipeline, programs: Programs, *, pools: Collection[str] = POOLS
) -> list[Problem]:
    """Every problem of ``pipeline`` (empty when it may be published and run)."""
    resolve = programs if callable(programs) else _from_mapping(programs)
    return _Checker(pipeline, resolve, pools).run()


def check(pipeline: Pipeline, programs: Programs, *, pools: Collection[str] = POOLS) -> None:
    """Raise :class:`InvalidPipeline` with every problem of ``pipeline``, if it has any."""
    problems = Problems()
    problems.extend(validate(pipeline, programs, pools=pools))
    problems.raise_if_any(pipeline.pipeline_id)


def assignable(source: Any, target: Any) -> bool:
    """Whether every value of type ``source`` fits a field of type ``target``."""
    if source is UNKNOWN or source is Any or target is Any:
        return True
    if target is float and source is int:
        return True
    origin = getattr(target, "__origin__", None)
    if origin is list or origin is dict:
        if getattr(source, "__origin__", None) is not origin:
            return False
        return assignable(source.__args__[-1], target.__args__[-1])
    return bool(source == target)


def _from_mapping(programs: Mapping[str, str]) -> ProgramResolver:
    return lambda program_id, _version: programs.get(program_id)


class _Checker:
    """One validation run: the stages' fields first, then every reference against them."""

    def __init__(self, pipeline: Pipeline, resolve: ProgramResolver, pools: Collection[str]):
        self.pipeline = pipeline
        self.resolve = resolve
        self.pools = pools
        self.problems = Problems()
        self.by_name: dict[str, Stage] = {}
        self.fields: dict[str, SignatureFields | None] = {}
        self.items: dict[str, Any] = {}
        self.run_inputs: dict[str, Any] | None = None

    def add(self, path: str, message: str) -> None:
        self.problems.add(path, message)

    def run(self) -> list[Problem]:
        self._pipeline()
        self._names()
        for stage in self.pipeline.stages:
            self.fields.setdefault(stage.name, self._program(stage))
        for stage in self.pipeline.stages:
            self._stage(stage)
        self._cycles(self._graph())
        self._outputs()
        return self.problems.found

    # -- the pipeline as a whole ------------------------------------------------------------

    def _pipeline(self) -> None:
        pid = self.pipeline.pipeline_id
        if not NAME.match(pid or ""):
            self.add("pipeline", f"{pid!r} is not a pipeline id (letters, digits, _ . -)")
        try:
            fields = parse_field_list(self.pipeline.inputs, side="input", field="inputs")
        except InvalidRequest as exc:
            self.add("inputs", exc.reason)
            return
        self.run_inputs = dict(fields)
        if not self.pipeline.stages:
            self.add("stages", "a pipeline needs at least one stage")

    def _names(self) -> None:
        for stage in self.pipeline.stages:
            path = f"stages.{stage.name}"
            if not STAGE_NAME.fullmatch(stage.name):
                self.add(path, "a stage name is letters, digits, _ and - (not leading -)")
            if stage.name in self.by_name:
                self.add(path, f"stage name {stage.name!r} is used twice")
            self.by_name.setdefault(stage.name, stage)

    def _outputs(self) -> None:
        if not self.pipeline.outputs:
            self.add("outputs", "a pipeline needs at least one output")
        for name, text in self.pipeline.outputs.items():
            path = f"outputs.{name}"
            if not FIELD_NAME.fullmatch(name) or name.startswith("_"):
                self.add(path, f"{name!r} is not a field name")
            self._ref_type(text, path, None)

    # -- one stage --------------------------------------------------------------------------

    def _program(self, stage: Stage) -> SignatureFields | None:
        """The stage program's fields; ``None`` when they cannot be known (reported)."""
        path = f"stages.{stage.name}"
        if (stage.program_id is None) == (stage.signature is None):
            self.add(path, "give exactly one of program (registered) or signature (inline)")
            return None
        if stage.program_id is not None:
            return self._registered(stage, path)
        if stage.program_version is not None:
            self.add(f"{path}.version", "a version pins a registered program: only with program")
        fields = self._parse(stage.signature or "", f"{path}.signature", "")
        self._inline_module(stage.module_type or "Predict", fields, path)
        return fields

    def _inline_module(self, module: str, fields: SignatureFields | None, path: str) -> None:
        """What the worker would refuse for an inline program (it has no tools, no config)."""
        if module not in MODULE_TYPES:
            known = ", ".join(MODULE_TYPES)
            self.add(f"{path}.module", f"unknown module type {module!r} ({known})")
        elif module == "ReAct":
            self.add(f"{path}.module", "ReAct needs tools: register it as a program with its tools")
        elif module != "Predict" and fields is not None:
            names = [name for name, _ in fields.inputs + fields.outputs]
            clash = [name for name in names if name in MODULE_RESERVED]
            if clash:
                self.add(f"{path}.signature", f"field {clash[0]!r} is reserved by {module}")

    def _registered(self, stage: Stage, path: str) -> SignatureFields | None:
        pid, version = stage.program_id or "", stage.program_version
        if stage.module_type is not None:
            self.add(f"{path}.module", "only for an inline signature (a program has its own)")
        if version is not None and version < 1:
            self.add(f"{path}.version", f"must be >= 1, got {version}")
            return None
        signature = self.resolve(pid, version)
        if signature is None:
            pinned = f" version {version}" if version is not None else ""
            self.add(f"{path}.program", f"no program {pid!r}{pinned} is registered")
            return None
        return self._parse(signature, f"{path}.program", f"program {pid}'s signature: ")

    def _parse(self, signature: str, path: str, prefix: str) -> SignatureFields | None:
        try:
            return parse_signature_fields(signature)
        except InvalidRequest as exc:
            self.add(path, f"{prefix}{exc.reason}")
            return None

    def _stage(self, stage: Stage) -> None:
        path = f"stages.{stage.name}"
        self._map(stage, path)
        self._inputs(stage, path)
        self._when(stage, path)
        self._defaults(stage, path)
        if stage.pool_hint is not None and stage.pool_hint not in self.pools:
            known = ", ".join(self.pools)
            self.add(f"{path}.pool", f"unknown pool {stage.pool_hint!r} (known: {known})")

    def _map(self, stage: Stage, path: str) -> None:
        if stage.map_over is None:
            if stage.map_concurrency != DEFAULT_CONCURRENCY:
                self.add(f"{path}.map.concurrency", "set without map.over (not a map stage)")
            return
        if stage.map_concurrency < 1:
            self.add(f"{path}.map.concurrency", f"must be >= 1, got {stage.map_concurrency}")
        where = f"{path}.map.over"
        if _is_item(stage.map_over):
            self.add(where, f"{stage.map_over}: maps do not nest ($item is not available here)")
            return
        kind = self._ref_type(stage.map_over, where, stage)
        if kind is None or kind is UNKNOWN:
            self.items[stage.name] = UNKNOWN
        elif getattr(kind, "__origin__", None) is list:
            self.items[stage.name] = kind.__args__[0]
        else:
            self.add(where, f"{stage.map_over} is {type_name(kind)}: a map needs a list")
            self.items[stage.name] = UNKNOWN

    def _inputs(self, stage: Stage, path: str) -> None:
        fields = self.fields.get(stage.name)
        wanted = dict(fields.inputs) if fields is not None else None
        what = _describe(stage)
        for name, text in stage.inputs.items():
            where = f"{path}.inputs.{name}"
            kind = self._ref_type(text, where, stage)
            if wanted is None:
                continue
            target = wanted.get(name)
            if target is None:
                self.add(where, f"not an input of {what} (its inputs: {', '.join(wanted)})")
            elif target is HISTORY:
                self.add(where, "a History input is filled in from the run's session, not mapped")
            elif kind is not None and not assignable(kind, target):
                self.add(
                    where,
                    f"type mismatch: {text} is {type_name(kind)}, {name} takes {type_name(target)}",
                )
        for name, target in (wanted or {}).items():
            if name not in stage.inputs and target is not HISTORY:
                self.add(
                    f"{path}.inputs.{name}", f"missing: {what} needs {name} ({type_name(target)})"
                )

    def _when(self, stage: Stage, path: str) -> None:
        if stage.when is None:
            return
        where = f"{path}.when"
        if _is_item(stage.when.ref):
            self.add(f"{where}.ref", "when is decided once per stage: $item is not available")
            kind = None
        else:
            kind = self._ref_type(stage.when.ref, f"{where}.ref", stage)
        if not stage.when.values:
            self.add(f"{where}.values", "at least one value to compare with")
        for i, raw in enumerate(stage.when.values):
            self._json(raw, kind, f"{where}.values[{i}]")

    def _defaults(self, stage: Stage, path: str) -> None:
        if not stage.defaults:
            return
        if not stage.optional:
            self.add(f"{path}.defaults", "defaults apply to an optional stage (optional: true)")
        fields = self.fields.get(stage.name)
        for name, raw in stage.defaults.items():
            where = f"{path}.defaults.{name}"
            target = fields.output(name) if fields is not None else UNKNOWN
            if target is None:
                outputs = ", ".join(n for n, _ in fields.outputs) if fields else ""
                self.add(where, f"not an output of {_describe(stage)} (its outputs: {outputs})")
            self._json(raw, target, where)

    def _json(self, raw: str, kind: Any, where: str) -> None:
        annotation = Any if kind is None or kind is UNKNOWN else kind
        try:
            decode_value(where, raw, annotation)
        except InvalidRequest as exc:
            self.add(where, f"{raw}: {exc.reason}")

    # -- references ---------------------------------------------------------------------------

    def _ref_type(self, text: str, path: str, stage: Stage | None) -> Any:
        """The type of the value ``text`` names; ``None`` once a problem is reported."""
        try:
            ref = parse_ref(text, where=path)
        except InvalidRequest as exc:
            self.add(path, exc.reason)
            return None
        field = ref.field or ""
        if ref.kind == "input":
            if self.run_inputs is None:
                return UNKNOWN
            if field not in self.run_inputs:
                known = ", ".join(self.run_inputs)
                self.add(path, f"{text}: the run has no input {field!r} (inputs: {known})")
                return None
            return self.run_inputs[field]
        if ref.kind == "stage":
            return self._stage_ref(text, ref.stage or "", field, path, stage)
        return self._item_ref(text, ref.field, path, stage)

    def _stage_ref(self, text: str, name: str, field: str, path: str, reader: Stage | None) -> Any:
        target = self.by_name.get(name)
        if target is None:
            self.add(path, f"{text}: no stage {name!r} (stages: {', '.join(self.by_name)})")
            return None
        if reader is not None and reader.name == name:
            self.add(path, f"{text}: a stage cannot read its own outputs")
            return None
        fields = self.fields.get(name)
        if fields is None:
            return UNKNOWN
        kind = fields.output(field)
        if kind is None:
            outputs = ", ".join(n for n, _ in fields.outputs)
            self.add(path, f"{text}: {name} has no output {field!r} (outputs: {outputs})")
            return None
        return types.GenericAlias(list, (kind,)) if target.is_map else kind

    def _item_ref(self, text: str, field: str | None, path: str, stage: Stage | None) -> Any:
        if stage is None or not stage.is_map:
            self.add(path, f"{text}: $item is only available in a map stage")
            return None
        item = self.items.get(stage.name, UNKNOWN)
        if field is None or item is UNKNOWN:
            return item
        if getattr(item, "__origin__", None) is not dict:
            self.add(
                path, f"{text}: the items of {stage.map_over} are {type_name(item)}, not objects"
            )
            return None
        return item.__args__[1]

    # -- the graph ------------------------------------------------------------------------------

    def _graph(self) -> dict[str, Deps]:
        """Which (other, existing) stages each stage reads, with the reference's path."""
        graph: dict[str, Deps] = {}
        for stage in self.pipeline.stages:
            edges = graph.setdefault(stage.name, [])
            for where, text in stage.references():
                name = stage_read(text)
                if name in self.by_name and name != stage.name:
                    edges.append((name, f"stages.{stage.name}.{where}"))
        return graph

    def _cycles(self, deps: Mapping[str, Deps]) -> None:
        """Name each cycle once, at the reference that starts it."""
        remaining = unordered(deps)
        reported: set[frozenset[str]] = set()
        for stage in self.pipeline.stages:
            if stage.name not in remaining:
                continue
            cycle, path = cycle_from(stage.name, deps, remaining)
            if frozenset(cycle) in reported:
                continue
            reported.add(frozenset(cycle))
            reads = ", ".join(
                f"{a} reads {b}" for a, b in zip(cycle, cycle[1:] + cycle[:1], strict=True)
            )
            self.add(path, f"cycle: {reads} (a stage can only read upstream stages)")


def _describe(stage: Stage) -> str:
    if stage.program_id is not None:
        return f"program {stage.program_id}"
    return "the stage's signature"


def _is_item(text: str) -> bool:
    try:
        return parse_ref(text).kind == "item"
    except InvalidRequest:
        return False
