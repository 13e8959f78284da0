"""The records an optimizer job writes, and reading the compacted topics it needs.

Pure builders over the contract's constructors (:mod:`dspex.schemas.records`):
progress and final Response chunks keyed by job id, ``kind="optimizer"``
Telemetry, the result's ProgramVersion, its program-scoped VariableUpdates and
the canary RoutingTable.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dspex.agents.jobs.optimize import OptimizationResult, Progress
from dspex.agents.plumbing.messages import ErrorInfo
from dspex.schemas import records
from dspex.schemas.records import Record
from dspex.schemas.times import now
from dspex.streams.client.programs import program_version_record
from dspex.streams.variables import VariableStore, new_update, variable_key

POOL = "optimizer"
SOURCE = "optimizer"


@dataclass(frozen=True)
class JobHead:
    """What every record of one job names: the job, its program, who runs it."""

    job_id: str
    program_id: str
    program_version: int | None
    worker_id: str


def progress_response(head: JobHead, seq: int, progress: Progress) -> Record:
    """A non-final Response chunk: a readable ``delta`` line, the numbers in ``outputs``."""
    numbers = {
        "phase": progress.phase,
        "trial": progress.trial,
        "trials": progress.trials,
        "score": progress.score,
        "best": progress.best,
        "message": progress.message,
        "worker": head.worker_id,
    }
    return _response(
        head,
        head.program_version,
        seq=seq,
        final=False,
        status="progress",
        delta=describe(progress) + "\n",
        outputs={name: json.dumps(value) for name, value in numbers.items()},
    )


def describe(progress: Progress) -> str:
    """One human-readable line for a progress event."""
    parts = [progress.phase]
    if progress.trials:
        parts.append(f"trial {progress.trial}/{progress.trials}")
    if progress.message:
        parts.append(progress.message)
    if progress.score is not None:
        parts.append(f"score={progress.score:.4f}")
    if progress.best is not None:
        parts.append(f"best={progress.best:.4f}")
    return " ".join(parts)


def final_response(
    head: JobHead,
    seq: int,
    status: str,
    *,
    outputs: Mapping[str, Any] | None = None,
    error: ErrorInfo | None = None,
    version: int | None = None,
) -> Record:
    """The job's one final chunk: ``ok`` with the result, else ``error``/``cancelled`` + error."""
    return _response(
        head,
        version if version is not None else head.program_version,
        seq=seq,
        final=True,
        status=status,
        outputs={k: json.dumps(v) for k, v in outputs.items()} if outputs is not None else None,
        error=error.record() if error is not None else None,
    )


def _response(
    head: JobHead,
    version: int | None,
    *,
    seq: int,
    final: bool,
    status: str,
    delta: str = "",
    outputs: Mapping[str, str] | None = None,
    error: Record | None = None,
) -> Record:
    return records.response(
        request_id=head.job_id,
        seq=seq,
        final=final,
        status=status,
        delta=delta,
        outputs=outputs,
        error=error,
        program_id=head.program_id or None,
        program_version=version,
        pool=POOL,
        produced_at=now(),
    )


def telemetry(
    head: JobHead, elapsed_s: float, quality: float | None, success: bool | None = None
) -> Record:
    """``kind="optimizer"``: the job's best score so far (learner and metrics ignore the kind)."""
    return records.telemetry(
        kind="optimizer",
        request_id=head.job_id,
        program_id=head.program_id or None,
        program_version=head.program_version,
        pool=POOL,
        worker_id=head.worker_id,
        emitted_at=now(),
        latency_ms=elapsed_s * 1000.0,
        success=success,
        quality=quality,
    )


def result_outputs(
    result: OptimizationResult, *, optimizer: str | None, metric: str, version: int | None
) -> dict[str, Any]:
    """The final Response's outputs: scores before and after, what was published."""
    return {
        "score_before": result.score_before,
        "score_after": result.score_after,
        "improved": result.improved,
        "optimizer": optimizer,
        "metric": metric,
        "program_version": version,
        "parent_version": result.base.version,
        "variables": result.changed_variables() if result.improved else {},
        "best_trial": result.best.variables,
        "trials": [
            {"variables": t.variables, "score": t.evaluation.score, "failed": t.evaluation.failed}
            for t in result.trials
        ],
    }


def result_version(
    result: OptimizationResult, *, job_id: str, metric: str, optimizer: str, latest: int
) -> Record:
    """The compiled program as the next ProgramVersion (``created_by`` = the job id)."""
    base = result.candidate
    return program_version_record(
        base.program_id or "",
        base.signature,
        version=latest + 1,
        parent_version=result.base.version,
        module_type=base.module_type,
        state_json=base.state_json,
        module_config_json=base.module_config_json,
        tools=base.tools,
        metric=metric,
        description=(
            f"{optimizer} job {job_id}: {metric} {result.score_before:.4f} -> "
            f"{result.score_after:.4f}"
        ),
        created_by=job_id,
        score=result.score_after,
        adapter=base.adapter,
    )


def variable_updates(
    result: OptimizationResult,
    *,
    types: Mapping[str, tuple[str, Mapping[str, Any]]],
    store: VariableStore,
    job_id: str,
    metric: str,
) -> list[Record]:
    """Program-scoped VariableUpdates for the best trial's changed values (validated)."""
    program_id = result.base.program_id or ""
    updates = []
    for name, value in result.changed_variables().items():
        previous = store.get(variable_key(name, "program", program_id))
        var_type, constraints = types[name]
        updates.append(
            new_update(
                name,
                value,
                var_type=None if previous else var_type,
                constraints=None if previous else constraints,
                scope="program",
                scope_ref=program_id,
                previous=previous,
                updated_by=job_id,
                source=SOURCE,
                reason=(
                    f"optimizer job {job_id}: {metric} {result.score_before:.4f} -> "
                    f"{result.score_after:.4f}"
                ),
                observers=(program_id,),
            )
        )
    return updates


def canary_table(
    program_id: str,
    *,
    parent: int,
    version: int,
    weight: float,
    previous: Mapping[str, Any] | None,
    job_id: str,
    now_ms: int,
) -> Record:
    """A RoutingTable sending ``weight`` of the program's traffic to the new version.

    Two variants, ``v<parent>`` and ``v<version>``, pin a program version each on
    the pool the previous table used (else general); the learning agent continues
    from this table, so it can move traffic between the versions from telemetry.
    """
    previous = previous or {}
    pools = [v.get("pool") for v in previous.get("variants") or [] if v.get("pool")]
    pool = str(pools[0]) if pools else "general"

    def variant(number: int, share: float) -> Record:
        return records.variant(name=f"v{number}", pool=pool, weight=share, program_version=number)

    return records.routing_table(
        program_id=program_id,
        version=int(previous.get("version") or 0) + 1,
        created_at=now_ms,
        objective=previous.get("objective") or "balanced",
        reason=(
            f"canary: optimizer job {job_id} published version {version}; "
            f"{weight:.0%} of traffic to it, the rest to its parent {parent}"
        ),
        variants=[variant(parent, 1.0 - weight), variant(version, weight)],
        pool_hints=previous.get("pool_hints") or {},
    )
