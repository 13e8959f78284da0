"""An OptimizationJob record, checked: the DSPy side of :mod:`dspex.streams.optimizers`.

The pure checks (optimizer settings, search grid, dataset, metric name) live in
``dspex.streams.optimizers`` so the client runs them before producing; here a job
also needs its optimizer installed in this deployment's DSPy and its metric
function, and becomes a :class:`JobSpec` the runner executes.
"""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import dspy

from dspex.agents.runtime.scoring import Metric, get_metric, metric_names
from dspex.streams.optimizers import (
    OPTIMIZERS,
    REQUIRES,
    SEARCHABLE,
    SearchVariable,
    check_job,
)

__all__ = [
    "OPTIMIZERS",
    "REQUIRES",
    "SEARCHABLE",
    "JobSpec",
    "SearchVariable",
    "available_optimizers",
    "parse_job",
]


def available_optimizers() -> list[str]:
    """The optimizers this deployment can run: listed here, in DSPy, their extras installed."""
    return sorted(
        name
        for name in OPTIMIZERS
        if hasattr(dspy, name) and (name not in REQUIRES or _installed(REQUIRES[name]))
    )


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


@dataclass(frozen=True)
class JobSpec:
    """A checked OptimizationJob: what to optimize, how, on what, scored by which metric."""

    job_id: str
    program_id: str
    program_version: int | None
    optimizer: str | None
    init_config: Mapping[str, Any]
    compile_config: Mapping[str, Any]
    metric_name: str
    metric: Metric
    search: tuple[SearchVariable, ...]
    val_fraction: float
    dataset_json: str | None
    dataset_topic: str | None
    reply_topic: str | None
    requested_by: str
    canary_weight: float | None

    def trials(self) -> list[dict[str, Any]]:
        """Every combination of the searched values (one empty trial without a search)."""
        names = [variable.name for variable in self.search]
        grid = itertools.product(*(variable.values for variable in self.search))
        return [dict(zip(names, values, strict=True)) for values in grid]


def parse_job(record: Mapping[str, Any], *, backends: Iterable[str], max_trials: int) -> JobSpec:
    """Check an OptimizationJob record; ``InvalidRequest`` names the first bad field."""
    checked = check_job(
        record,
        backends=backends,
        max_trials=max_trials,
        metrics=metric_names(),
        available=available_optimizers(),
    )
    return JobSpec(
        job_id=str(record["job_id"]),
        program_id=checked.program_id,
        program_version=record.get("program_version"),
        optimizer=checked.optimizer,
        init_config=checked.init_config,
        compile_config=checked.compile_config,
        metric_name=str(record.get("metric")),
        metric=get_metric(str(record.get("metric"))),
        search=checked.search,
        val_fraction=checked.val_fraction,
        dataset_json=record.get("dataset_json"),
        dataset_topic=record.get("dataset_topic"),
        reply_topic=record.get("reply_topic"),
        requested_by=str(record.get("requested_by") or ""),
        canary_weight=checked.canary_weight,
    )
