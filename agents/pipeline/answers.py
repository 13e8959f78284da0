"""The records a pipeline run gives: its state, the client's chunks, per-stage telemetry.

Pure functions of a :class:`~dspex.agents.pipeline.run.Run`: the ``PipelineRun`` state
record (``pipeline.state``), the progress chunk with seq ``i`` (event ``i``), the final
Response (outputs, ``partial``, one StageStatus per stage) and one Telemetry of kind
``stage`` per stage that ended.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from dspex.agents.pipeline.run import Run
from dspex.schemas import records
from dspex.schemas.records import Record
from dspex.schemas.times import to_ms


def state_record(run: Run, now_ms: int) -> Record:
    """The ``PipelineRun`` state record of ``run`` as of now."""
    return records.pipeline_run(
        run_id=run.run_id,
        pipeline_id=run.plan.pipeline_id,
        pipeline_version=run.plan.version,
        status=run.status,
        partial=run.partial,
        created_at=run.request["created_at"],
        updated_at=now_ms,
        deadline_at=run.request.get("deadline_at"),
        reply_topic=run.request.get("reply_topic"),
        stream=bool(run.request.get("stream")),
        events=run.events,
        delivered=run.delivered,
        results={k: json.dumps(v) for k, v in run.results.items()},
        issued=sorted(run.issued),
        outputs=run.outputs,
        error=run.error,
    )


def progress_chunk(run: Run, seq: int, now_ms: int) -> Record:
    """The progress chunk ``seq``: event ``seq``."""
    event = run.events[seq]
    return records.response(
        request_id=run.run_id,
        seq=seq,
        final=False,
        status="progress",
        pool=event.get("pool"),
        produced_at=now_ms,
        stage=event,
    )


def final_response(run: Run, now_ms: int, session: Record | None = None) -> Record:
    """The one final chunk: outputs, partial and per-stage status (or the error)."""
    return records.response(
        request_id=run.run_id,
        seq=len(run.events) if run.request.get("stream") else 0,
        final=True,
        status=run.status,
        outputs=run.outputs if run.status == "ok" else None,
        error=run.error,
        produced_at=now_ms,
        partial=run.partial,
        stages=stage_summary(run),
        session=session,
    )


def stage_summary(run: Run) -> list[Record]:
    """One StageStatus per stage: its latest state, when it started and ended, its pool."""
    summary = []
    for stage in run.plan.stages:
        events = [e for e in run.events if e["name"] == stage.name and e["item"] is None]
        if not events:
            state = "cancelled" if run.done else "pending"
            summary.append(records.stage_status(name=stage.name, state=state))
            continue
        last = events[-1]
        pool = next((e["pool"] for e in reversed(events) if e.get("pool")), None)
        summary.append(
            records.stage_status(
                **{**last, "pool": pool, "started_at": events[0].get("started_at")}
            )
        )
    return summary


def stage_telemetry(run: Run, event: Mapping[str, Any], worker_id: str) -> Record | None:
    """The Telemetry (kind ``stage``) of a stage that ended; None for other events.

    ``program_id`` is ``<pipeline>/<stage>``: the metrics agent and ``dspex top`` show
    each stage of each pipeline as a series; the learning agent ignores the kind.
    """
    if event.get("item") is not None or event["state"] not in ("finished", "failed", "defaulted"):
        return None
    if event["state"] == "failed" and run.plan.stage(event["name"]).optional:
        return None  # its "defaulted" event follows: one measurement per stage
    started, finished = to_ms(event.get("started_at")), to_ms(event.get("finished_at"))
    latency = None if started is None or finished is None else float(finished - started)
    ok = event["state"] == "finished"
    return records.telemetry(
        kind="stage",
        request_id=run.run_id,
        program_id=f"{run.plan.pipeline_id}/{event['name']}",
        pool=event.get("pool"),
        variant="stage",
        worker_id=worker_id,
        emitted_at=finished or 0,
        latency_ms=latency,
        success=ok,
        error_class=None if ok else "StageFailed",
    )
