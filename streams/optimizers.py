"""Optimizer jobs, checked without DSPy: optimizer settings, search grid, dataset, metric.

Pure functions of an ``OptimizationJob`` record (and the deployment's backend
names), no Kafka and no DSPy, so the client refuses a job that cannot run before
producing it, with the same messages the job runner gives
(``dspex.agents.jobs.jobspec`` adds what needs DSPy: which optimizers are
installed, the metric functions). Errors are :class:`InvalidRequest` naming the
record field (``optimizer``, ``optimizer_config_json.max_rounds``,
``search_json.temperature``, ``metric``, ``val_fraction``).

Optimizer settings are data: only the keys listed in :data:`OPTIMIZERS` are
accepted, with their types and bounds, so a job can never hand DSPy a log
directory, a wandb key or an LM of its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dspex.streams._vartypes import decode_json_object
from dspex.streams.errors import InvalidRequest


@dataclass(frozen=True)
class Option:
    """One accepted optimizer setting: its JSON type, bounds and where DSPy takes it."""

    kind: type
    low: float = -math.inf
    high: float = math.inf
    choices: tuple[Any, ...] = ()
    stage: str = "init"  # "init": the optimizer's constructor; "compile": compile()


def _int(low: int, high: int, stage: str = "init") -> Option:
    return Option(int, low, high, stage=stage)


def _num(low: float, high: float) -> Option:
    return Option(float, low, high)


def _choice(*choices: Any) -> Option:
    return Option(str, choices=choices)


_FLAG = Option(bool, stage="compile")
_DEMOS = {"max_bootstrapped_demos": _int(0, 64), "max_labeled_demos": _int(0, 64)}
_THREADS = {"num_threads": _int(1, 64)}
OPTIMIZERS: dict[str, dict[str, Option]] = {
    "BootstrapFewShot": {
        **_DEMOS,
        "max_rounds": _int(1, 10),
        "max_errors": _int(0, 100_000),
        "metric_threshold": _num(-1e9, 1e9),
    },
    "MIPROv2": {
        **_DEMOS,
        **_THREADS,
        "auto": _choice("light", "medium", "heavy", None),  # null: num_candidates + num_trials
        "num_candidates": _int(1, 100),
        "seed": _int(0, 2**31 - 1),
        "init_temperature": _num(0.0, 2.0),
        "max_errors": _int(0, 100_000),
        "metric_threshold": _num(-1e9, 1e9),
        "num_trials": _int(1, 1000, "compile"),
        "minibatch": _FLAG,
        "minibatch_size": _int(1, 10_000, "compile"),
        "minibatch_full_eval_steps": _int(1, 1000, "compile"),
        "program_aware_proposer": _FLAG,
        "data_aware_proposer": _FLAG,
        "tip_aware_proposer": _FLAG,
        "fewshot_aware_proposer": _FLAG,
    },
    "SIMBA": {
        **_THREADS,
        "bsize": _int(1, 10_000),
        "num_candidates": _int(1, 100),
        "max_steps": _int(1, 1000),
        "max_demos": _int(0, 64),
        "temperature_for_sampling": _num(0.0, 2.0),
        "temperature_for_candidates": _num(0.0, 2.0),
        "seed": _int(0, 2**31 - 1, "compile"),
    },
    "GEPA": {
        **_THREADS,
        "auto": _choice("light", "medium", "heavy"),
        "max_full_evals": _int(1, 10_000),
        "max_metric_calls": _int(1, 10_000_000),
        "reflection_minibatch_size": _int(1, 1000),
        "candidate_selection_strategy": _choice("pareto", "current_best"),
        "skip_perfect_score": Option(bool),
        "use_merge": Option(bool),
        "max_merge_invocations": _int(0, 1000),
        "failure_score": _num(-1e9, 1e9),
        "perfect_score": _num(-1e9, 1e9),
        "seed": _int(0, 2**31 - 1),
    },
}


# DSPy's optional dependencies: MIPROv2 imports optuna when it compiles, and DSPy's GEPA
# is a stand-in that raises without the gepa package.
REQUIRES = {"MIPROv2": "optuna", "GEPA": "gepa"}


@dataclass(frozen=True)
class SearchVariable:
    """One variable the job searches: its candidate values and its VariableUpdate type."""

    name: str
    values: tuple[Any, ...]
    var_type: str
    constraints: Mapping[str, Any] = field(default_factory=dict)


# Variables an evaluation request can carry and the pipeline honours: the worker's LM
# settings, and "model" (a configured backend name; the router pins the route's variant).
# Not "module": compiled DSPy state is keyed by the predictors of one module type.
SEARCHABLE: dict[str, tuple[str, Mapping[str, Any]]] = {
    "temperature": ("float", {"min": 0.0, "max": 2.0}),
    "max_tokens": ("int", {"min": 1, "max": 100_000}),
    "model": ("choice", {}),
}


PIPELINE_PREFIX = "pipeline:"
"""A job whose ``program_id`` is ``pipeline:<pipeline_id>`` optimizes that whole pipeline
(``program_version`` then pins the pipeline version). Program ids cannot contain ``:``,
so the prefix is a namespace of its own (docs/optimizer.md, *Optimizing a pipeline*)."""


def pipeline_target(program_id: Any) -> str | None:
    """The pipeline id a job's ``program_id`` names (``pipeline:<id>``), else None."""
    if isinstance(program_id, str) and program_id.startswith(PIPELINE_PREFIX):
        return program_id[len(PIPELINE_PREFIX) :]
    return None


METRIC_NAMES: tuple[str, ...] = (
    "contains",
    "dspy:answer_exact_match",
    "dspy:answer_passage_match",
    "exact_match",
    "f1",
)
"""Metric names a job may use (``dspex.agents.runtime.scoring`` registers these; a test
keeps the two lists equal)."""


@dataclass(frozen=True)
class CheckedJob:
    """The parts of an OptimizationJob record that passed :func:`check_job`."""

    program_id: str
    optimizer: str | None
    init_config: Mapping[str, Any]
    compile_config: Mapping[str, Any]
    search: tuple[SearchVariable, ...]
    val_fraction: float
    canary_weight: float | None

    @property
    def trial_count(self) -> int:
        """How many combinations of searched values the job evaluates."""
        return math.prod(len(variable.values) for variable in self.search)


def check_job(
    record: Mapping[str, Any],
    *,
    backends: Iterable[str],
    max_trials: int,
    metrics: Sequence[str] = METRIC_NAMES,
    available: Sequence[str] | None = None,
) -> CheckedJob:
    """Check an OptimizationJob record; ``InvalidRequest`` names the first bad field.

    ``available`` narrows the optimizers to those this deployment can run (the job
    runner passes the installed ones; the client, which cannot know, passes none).
    """
    optimizer = record.get("optimizer") or None
    init_config, compile_config = parse_optimizer_config(
        optimizer, record.get("optimizer_config_json") or "{}", available=available
    )
    search = parse_search(record.get("search_json") or "{}", backends=backends)
    if optimizer is None and not search:
        raise InvalidRequest("optimizer", "name an optimizer, a search_json, or both")
    _check_dataset(record)
    metric = record.get("metric")
    if metric not in metrics:
        raise InvalidRequest(
            "metric", f"unknown metric {metric!r} (registered: {', '.join(sorted(metrics))})"
        )
    checked = CheckedJob(
        program_id=_nonempty(record, "program_id"),
        optimizer=optimizer,
        init_config=init_config,
        compile_config=compile_config,
        search=search,
        val_fraction=_fraction(record.get("val_fraction", 0.5)),
        canary_weight=_canary(record.get("canary_weight")),
    )
    if pipeline_target(checked.program_id) is not None:
        _check_pipeline_job(checked)
    if checked.trial_count > max_trials:
        raise InvalidRequest(
            "search_json", f"{checked.trial_count} combinations, over jobs.max_trials={max_trials}"
        )
    return checked


def _check_pipeline_job(checked: CheckedJob) -> None:
    """What a pipeline job cannot do: it compiles the stage programs with a DSPy optimizer."""
    if not pipeline_target(checked.program_id):
        raise InvalidRequest("program_id", "name the pipeline: pipeline:<pipeline_id>")
    if checked.optimizer is None:
        raise InvalidRequest("optimizer", "a pipeline job needs a DSPy optimizer")
    if checked.search:
        raise InvalidRequest(
            "search_json", "a pipeline job does not search variables (search per program)"
        )
    if checked.canary_weight is not None:
        raise InvalidRequest(
            "canary_weight", "a pipeline job pins its new versions in a new pipeline version"
        )


def parse_optimizer_config(
    optimizer: str | None, config_json: str, *, available: Sequence[str] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(constructor kwargs, compile kwargs)`` of a known optimizer's whitelisted config."""
    config = decode_json_object("optimizer_config_json", config_json)
    if optimizer is None:
        if config:
            raise InvalidRequest("optimizer_config_json", "set without an optimizer")
        return {}, {}
    runnable = sorted(OPTIMIZERS) if available is None else sorted(available)
    if optimizer not in runnable:
        known = ", ".join(runnable)
        if optimizer in REQUIRES and optimizer in OPTIMIZERS:
            raise InvalidRequest(
                "optimizer",
                f"{optimizer} needs the {REQUIRES[optimizer]!r} package, which this deployment "
                f"does not have (available: {known})",
            )
        raise InvalidRequest("optimizer", f"unknown optimizer {optimizer!r} (available: {known})")
    options = OPTIMIZERS[optimizer]
    staged: dict[str, dict[str, Any]] = {"init": {}, "compile": {}}
    for key, value in config.items():
        if key not in options:
            allowed = ", ".join(sorted(options))
            raise InvalidRequest(
                f"optimizer_config_json.{key}", f"not a {optimizer} setting (allowed: {allowed})"
            )
        staged[options[key].stage][key] = _checked(
            f"optimizer_config_json.{key}", value, options[key]
        )
    return staged["init"], staged["compile"]


def _checked(where: str, value: Any, option: Option) -> Any:
    if option.choices:
        if value not in option.choices:
            raise InvalidRequest(where, f"must be one of {list(option.choices)}")
        return value
    if option.kind is bool:
        if not isinstance(value, bool):
            raise InvalidRequest(where, "must be true or false")
        return value
    number_ok = isinstance(value, int) if option.kind is int else isinstance(value, int | float)
    if isinstance(value, bool) or not number_ok or not math.isfinite(value):
        raise InvalidRequest(where, f"must be a{'n integer' if option.kind is int else ' number'}")
    if not option.low <= value <= option.high:
        raise InvalidRequest(where, f"must be between {option.low:g} and {option.high:g}")
    return option.kind(value)


def parse_search(search_json: str, *, backends: Iterable[str]) -> tuple[SearchVariable, ...]:
    """The variables to search, in the order given, each with its candidate values."""
    search = decode_json_object("search_json", search_json)
    return tuple(_variable(name, spec, set(backends)) for name, spec in search.items())


def _variable(name: str, spec: Any, backends: set[str]) -> SearchVariable:
    where = f"search_json.{name}"
    if name not in SEARCHABLE:
        raise InvalidRequest(where, f"cannot search {name!r} (searchable: {', '.join(SEARCHABLE)})")
    if not isinstance(spec, dict):
        raise InvalidRequest(where, 'must be {"min", "max", "steps"} or {"choices": [...]}')
    var_type, constraints = SEARCHABLE[name]
    if var_type in ("float", "int") and "choices" in spec:
        values = _numbers(where, spec, var_type, constraints)
    elif var_type in ("float", "int"):
        values = _range(where, spec, var_type, constraints)
    else:
        allowed = sorted(backends) if name == "model" else list(constraints["choices"])
        values = _choices(where, spec, allowed)
        constraints = {"choices": allowed}
    return SearchVariable(name, values, var_type, dict(constraints))


def _range(
    where: str, spec: Mapping[str, Any], var_type: str, bounds: Mapping[str, Any]
) -> tuple[Any, ...]:
    if set(spec) - {"min", "max", "steps"} or not {"min", "max"} <= set(spec):
        raise InvalidRequest(where, 'a numeric range is {"min": a, "max": b, "steps": n}')
    low, high = (
        _checked(where, spec[k], Option(float, bounds["min"], bounds["max"]))
        for k in ("min", "max")
    )
    steps = _checked(f"{where}.steps", spec.get("steps", 2), Option(int, 1, 1000))
    if low > high:
        raise InvalidRequest(where, f"min {low:g} is above max {high:g}")
    if steps == 1 or low == high:
        points = [low]
    else:
        points = [low + (high - low) * i / (steps - 1) for i in range(steps)]
    if var_type == "int":
        return tuple(dict.fromkeys(round(p) for p in points))
    return tuple(round(p, 6) for p in points)


def _numbers(
    where: str, spec: Mapping[str, Any], var_type: str, bounds: Mapping[str, Any]
) -> tuple[Any, ...]:
    choices = spec.get("choices")
    if set(spec) != {"choices"} or not isinstance(choices, list) or not choices:
        raise InvalidRequest(where, 'choices are {"choices": [a, b, ...]} (non-empty)')
    option = Option(int if var_type == "int" else float, bounds["min"], bounds["max"])
    return tuple(dict.fromkeys(_checked(where, value, option) for value in choices))


def _choices(where: str, spec: Mapping[str, Any], allowed: Sequence[Any]) -> tuple[Any, ...]:
    choices = spec.get("choices")
    if set(spec) != {"choices"} or not isinstance(choices, list) or not choices:
        raise InvalidRequest(where, 'a choice is {"choices": [a, b, ...]} (non-empty)')
    unknown = [c for c in choices if c not in allowed]
    if unknown:
        raise InvalidRequest(where, f"unknown choice {unknown[0]!r} (allowed: {list(allowed)})")
    return tuple(dict.fromkeys(choices))


def _nonempty(record: Mapping[str, Any], name: str) -> str:
    value = record.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidRequest(name, "must be a non-empty string")
    return value


def _fraction(value: Any) -> float:
    if not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise InvalidRequest("val_fraction", f"must be in [0, 1), got {value!r}")
    return float(value)


def _canary(value: Any) -> float | None:
    if value is not None and (not isinstance(value, int | float) or not 0.0 < value <= 1.0):
        raise InvalidRequest("canary_weight", f"must be in (0, 1], got {value!r}")
    return None if value is None else float(value)


def _check_dataset(record: Mapping[str, Any]) -> None:
    given = [name for name in ("dataset_json", "dataset_topic") if record.get(name)]
    if len(given) != 1:
        raise InvalidRequest("dataset_json", "set exactly one of dataset_json and dataset_topic")
