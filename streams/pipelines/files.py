"""Pipeline files: YAML or JSON documents to :class:`Pipeline` and back.

The document (``docs/pipelines-spec.md`` has the whole format)::

    pipeline: support                 # optional; the id given to `put` wins if they agree
    description: retrieve, then answer
    inputs: "question, topics: list[str]"   # or a list: [question, "topics: list[str]"]
    stages:
      retrieve:
        program: search               # a registered program ...
        version: 3                    # ... pinned (else the latest when the stage runs)
        inputs: {query: $input.question}
      summarize:
        signature: "topic -> summary" # ... or an inline one
        module: Predict
        map: {over: $input.topics, concurrency: 4}   # or map: $input.topics
        inputs: {topic: $item}
        when: {ref: $stage.retrieve.found, equals: true}   # or values: [a, b]
        optional: true
        defaults: {summary: ""}
        pool: general
    outputs:
      passages: $stage.retrieve.passages

Unknown keys and wrong shapes are refused with their path
(``stages.summarize.map.concurrncy: unknown key``); duplicate keys too (YAML and
JSON parsers would silently keep the last one).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]  # PyYAML ships no type hints

from dspex.streams.pipelines.problems import InvalidPipeline, Problem, Problems
from dspex.streams.pipelines.spec import (
    DEFAULT_CONCURRENCY,
    Pipeline,
    Stage,
    condition_from,
    encode_defaults,
)

__all__ = ["dumps", "from_document", "load", "loads", "to_document"]

_TOP_KEYS = ("pipeline", "description", "inputs", "stages", "outputs")
_STAGE_KEYS = (
    "program", "version", "signature", "module", "inputs", "map", "when", "optional",
    "defaults", "pool",
)  # fmt: skip
_MAP_KEYS = ("over", "concurrency")


def load(path: str | Path, *, pipeline_id: str | None = None) -> Pipeline:
    """The pipeline in a ``.yaml``/``.yml``/``.json`` file (other names: read as YAML)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidPipeline(
            pipeline_id or "", [Problem(str(path), f"cannot read: {exc}")]
        ) from exc
    fmt = "json" if path.suffix.lower() == ".json" else "yaml"
    return loads(text, fmt=fmt, pipeline_id=pipeline_id, source=str(path))


def loads(
    text: str, *, fmt: str = "yaml", pipeline_id: str | None = None, source: str = "document"
) -> Pipeline:
    """The pipeline in YAML or JSON ``text``; ``source`` names it in a syntax error."""
    try:
        document = _parse_json(text) if fmt == "json" else yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader
    except (ValueError, yaml.YAMLError) as exc:
        message = " ".join(str(exc).split())
        raise InvalidPipeline(
            pipeline_id or "", [Problem(source, f"not {fmt}: {message}")]
        ) from exc
    return from_document(document, pipeline_id=pipeline_id)


def dumps(pipeline: Pipeline, *, fmt: str = "yaml") -> str:
    """``pipeline`` as a YAML (default) or JSON document that :func:`loads` reads back."""
    document = to_document(pipeline)
    if fmt == "json":
        return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    text: str = yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=100)
    return text


def from_document(document: Any, *, pipeline_id: str | None = None) -> Pipeline:
    """The pipeline a decoded document describes; :class:`InvalidPipeline` lists every problem."""
    problems = Problems()
    if not isinstance(document, Mapping):
        raise InvalidPipeline(pipeline_id or "", [Problem("document", "expected a mapping")])
    _unknown(document, _TOP_KEYS, "", problems)
    pid = _pipeline_id(document.get("pipeline"), pipeline_id, problems)
    stages = document.get("stages")
    if not isinstance(stages, Mapping) or not stages:
        problems.add("stages", "expected a mapping of stage name to stage")
        stages = {}
    pipeline = Pipeline(
        pipeline_id=pid,
        inputs=_inputs(document.get("inputs"), problems),
        stages=tuple(_stage(str(name), body, problems) for name, body in stages.items()),
        outputs=_refs(document.get("outputs"), "outputs", problems),
        description=_text(document.get("description", ""), "description", problems) or "",
    )
    problems.raise_if_any(pid)
    return pipeline


def to_document(pipeline: Pipeline) -> dict[str, Any]:
    """The document form (plain dicts, lists and JSON values) of ``pipeline``."""
    document: dict[str, Any] = {"pipeline": pipeline.pipeline_id}
    if pipeline.description:
        document["description"] = pipeline.description
    document["inputs"] = pipeline.inputs
    document["stages"] = {stage.name: _stage_document(stage) for stage in pipeline.stages}
    document["outputs"] = dict(pipeline.outputs)
    return document


def _stage_document(stage: Stage) -> dict[str, Any]:
    body: dict[str, Any] = {}
    optional_keys: list[tuple[str, Any]] = [
        ("program", stage.program_id),
        ("version", stage.program_version),
        ("signature", stage.signature),
        ("module", stage.module_type),
    ]
    body.update((key, value) for key, value in optional_keys if value is not None)
    body["inputs"] = dict(stage.inputs)
    if stage.map_over is not None or stage.map_concurrency != DEFAULT_CONCURRENCY:
        body["map"] = {"over": stage.map_over, "concurrency": stage.map_concurrency}
    if stage.when is not None:
        values = _decoded(stage.when.values, f"stages.{stage.name}.when.values")
        compared = {"equals": values[0]} if len(values) == 1 else {"values": values}
        body["when"] = {"ref": stage.when.ref, **compared}
    if stage.optional:
        body["optional"] = True
    if stage.defaults:
        names = list(stage.defaults)
        decoded = _decoded(tuple(stage.defaults.values()), f"stages.{stage.name}.defaults")
        body["defaults"] = dict(zip(names, decoded, strict=True))
    if stage.pool_hint is not None:
        body["pool"] = stage.pool_hint
    return body


def _decoded(values: tuple[str, ...], path: str) -> list[Any]:
    try:
        return [json.loads(value) for value in values]
    except ValueError as exc:
        raise InvalidPipeline("", [Problem(path, f"invalid JSON: {exc}")]) from exc


def _stage(name: str, body: Any, problems: Problems) -> Stage:
    path = f"stages.{name}"
    if not isinstance(body, Mapping):
        problems.add(path, "expected a mapping (program or signature, inputs, ...)")
        return Stage(name)
    _unknown(body, _STAGE_KEYS, path, problems)
    over, concurrency = _map(body.get("map"), f"{path}.map", problems)
    return Stage(
        name=name,
        program_id=_text(body.get("program"), f"{path}.program", problems),
        program_version=_int(body.get("version"), f"{path}.version", problems),
        signature=_text(body.get("signature"), f"{path}.signature", problems),
        module_type=_text(body.get("module"), f"{path}.module", problems),
        inputs=_refs(body.get("inputs", {}), f"{path}.inputs", problems),
        map_over=over,
        map_concurrency=concurrency,
        when=condition_from(body.get("when"), f"{path}.when", problems),
        optional=_bool(body.get("optional", False), f"{path}.optional", problems),
        defaults=_defaults(body.get("defaults", {}), f"{path}.defaults", problems),
        pool_hint=_text(body.get("pool"), f"{path}.pool", problems),
    )


def _map(value: Any, path: str, problems: Problems) -> tuple[str | None, int]:
    if value is None:
        return None, DEFAULT_CONCURRENCY
    if isinstance(value, str):
        return value, DEFAULT_CONCURRENCY
    if not isinstance(value, Mapping):
        problems.add(path, "expected a reference to a list, or a mapping with over and concurrency")
        return None, DEFAULT_CONCURRENCY
    _unknown(value, _MAP_KEYS, path, problems)
    over = _text(value.get("over"), f"{path}.over", problems)
    if over is None:
        problems.add(f"{path}.over", "missing: the reference to the list to map over")
    concurrency = _int(
        value.get("concurrency", DEFAULT_CONCURRENCY), f"{path}.concurrency", problems
    )
    return over, DEFAULT_CONCURRENCY if concurrency is None else concurrency


def _pipeline_id(in_file: Any, given: str | None, problems: Problems) -> str:
    named = _text(in_file, "pipeline", problems)
    if given and named and named != given:
        problems.add("pipeline", f"the file names pipeline {named!r}, not {given!r}")
    if not (given or named):
        problems.add("pipeline", "missing: name the pipeline in the file or when putting it")
    return given or named or ""


def _inputs(value: Any, problems: Problems) -> str:
    if isinstance(value, list) and all(isinstance(part, str) for part in value):
        return ", ".join(value)
    if isinstance(value, str):
        return value
    problems.add("inputs", 'expected the run\'s input fields, e.g. "question, topics: list[str]"')
    return ""


def _refs(value: Any, path: str, problems: Problems) -> dict[str, str]:
    if not isinstance(value, Mapping):
        problems.add(path, "expected a mapping of field name to reference")
        return {}
    found: dict[str, str] = {}
    for name, ref in value.items():
        if isinstance(ref, str):
            found[str(name)] = ref
        else:
            problems.add(f"{path}.{name}", f"expected a reference such as $input.x, got {ref!r}")
    return found


def _defaults(value: Any, path: str, problems: Problems) -> dict[str, str]:
    if not isinstance(value, Mapping):
        problems.add(path, "expected a mapping of output field to value")
        return {}
    return encode_defaults({str(k): v for k, v in value.items()}, path, problems)


def _typed(kind: type | tuple[type, ...], what: str) -> Callable[[Any, str, Problems], Any]:
    def check(value: Any, path: str, problems: Problems) -> Any:
        if value is None:
            return None
        if isinstance(value, bool) if kind is bool else isinstance(value, kind):
            if kind is bool or not isinstance(value, bool):  # YAML's true is no integer
                return value
        problems.add(path, f"expected {what}, got {value!r}")
        return None

    return check


_text = _typed(str, "text")
_int = _typed(int, "an integer")
_bool_or_none = _typed(bool, "true or false")


def _bool(value: Any, path: str, problems: Problems) -> bool:
    return bool(_bool_or_none(value, path, problems))


def _unknown(
    mapping: Mapping[Any, Any], known: tuple[str, ...], path: str, problems: Problems
) -> None:
    for key in mapping:
        if key not in known:
            where = f"{path}.{key}" if path else str(key)
            problems.add(where, f"unknown key (known: {', '.join(known)})")


class _StrictLoader(yaml.SafeLoader):  # type: ignore[misc]  # untyped base
    """PyYAML's safe loader, refusing duplicate keys instead of keeping the last."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (line {mark.line + 1})", mark
            )
        seen.add(key)
    mapping: dict[Any, Any] = loader.construct_mapping(node, deep=True)
    return mapping


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def _parse_json(text: str) -> Any:
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in items]
        duplicated = sorted({key for key in keys if keys.count(key) > 1})
        if duplicated:
            raise ValueError(f"duplicate key {duplicated[0]!r}")
        return dict(items)

    return json.loads(text, object_pairs_hook=pairs)
