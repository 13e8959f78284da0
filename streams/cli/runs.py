"""Pipeline runs from a terminal: the live per-stage view of ``dspex submit --pipeline`` and
``dspex pipelines runs`` (recent runs and their state, from the ``pipeline.state`` topic).

:class:`StageBoard` folds a run's progress chunks into one row per stage (pure, so it is
tested without a terminal); :func:`show_run` draws it live with rich while the run goes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table

from dspex.schemas.times import to_ms
from dspex.streams.cli._app import err, out, settings_of
from dspex.streams.cli.pipelines import pipelines_app
from dspex.streams.client.client import Chunk, Client, PipelineRef
from dspex.streams.reader import latest_by_key, read_to_end
from dspex.streams.serde import make_serde
from dspex.streams.topics import Topics

_STYLE = {
    "started": "yellow",
    "finished": "green",
    "failed": "red",
    "defaulted": "magenta",
    "skipped": "dim",
    "cancelled": "dim",
}


@dataclass
class StageRow:
    """What the view shows of one stage."""

    state: str = "pending"
    pool: str | None = None
    started_ms: int | None = None
    finished_ms: int | None = None
    items: int = 0
    items_done: int = 0
    error: str | None = None


@dataclass
class StageBoard:
    """One row per stage, updated from a run's progress chunks (and its final chunk)."""

    rows: dict[str, StageRow] = field(default_factory=dict)

    def take(self, chunk: Chunk) -> None:
        """Fold one chunk in: a stage (or map item) event, or the final per-stage summary."""
        for status in chunk.stages if chunk.final else ([chunk.stage] if chunk.stage else []):
            row = self.rows.setdefault(status["name"], StageRow())
            if status.get("item") is not None:
                row.items_done += status["state"] == "finished"
                row.pool = row.pool or status.get("pool")
                continue
            row.state = status["state"]
            row.pool = status.get("pool") or row.pool
            row.started_ms = to_ms(status.get("started_at")) or row.started_ms
            row.finished_ms = to_ms(status.get("finished_at"))
            row.items = max(row.items, int(status.get("items") or 0))
            row.error = status.get("error") or row.error

    def table(self) -> Table:
        table = Table("stage", "state", "items", "pool", "seconds", "error")
        for name, row in self.rows.items():
            style = _STYLE.get(row.state, "")
            seconds = ""
            if row.started_ms is not None and row.finished_ms is not None:
                seconds = f"{(row.finished_ms - row.started_ms) / 1000:.2f}"
            items = f"{row.items_done}/{row.items}" if row.items else ""
            state = f"[{style}]{row.state}[/]" if style else row.state
            table.add_row(name, state, items, row.pool or "", seconds, row.error or "")
        return table


def show_run(client: Client, pipeline: PipelineRef, inputs: dict[str, Any], options: Any) -> None:
    """Run a pipeline, drawing its stages live; print the outputs (exit 1 when it failed)."""
    board = StageBoard()
    final: Chunk | None = None
    with Live(board.table(), console=err, refresh_per_second=8) as live:
        for chunk in client.stream(pipeline, inputs, **options):
            board.take(chunk)
            live.update(Group(board.table()))
            final = chunk if chunk.final else final
    if final is None:
        return
    if final.status != "ok":
        error = final.error or {}
        err.print(
            f"[red]{final.status}[/] run_id={final.request_id} stage={error.get('stage')} "
            f"field={error.get('field')}: {error.get('message')}"
        )
        raise typer.Exit(1)
    partial = " [magenta]partial: an optional stage failed, its defaults used[/]"
    err.print(f"[dim]run_id={final.request_id}[/]" + (partial if final.partial else ""))
    out.print_json(json.dumps(final.outputs))


@pipelines_app.command("runs")
def runs(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(help="How many of the newest runs.")] = 20,
    pipeline: Annotated[str | None, typer.Option(help="Only this pipeline's runs.")] = None,
    status: Annotated[str | None, typer.Option(help="running, ok, error or timeout.")] = None,
) -> None:
    """Recent pipeline runs and their state (from the pipeline agent's state topic)."""
    settings = settings_of(ctx)
    topic = Topics(settings.topics).name("pipeline.state")
    states = latest_by_key(read_to_end(settings, make_serde(settings), topic, "PipelineRun"))
    chosen = [
        s
        for s in states.values()
        if (pipeline is None or s["pipeline_id"] == pipeline)
        and (status is None or s["status"] == status)
    ]
    chosen.sort(key=lambda s: to_ms(s["created_at"]) or 0, reverse=True)
    table = Table("run", "pipeline", "status", "stages", "created", "seconds", "error")
    for state in chosen[:limit]:
        table.add_row(*run_row(state))
    out.print(table)


def run_row(state: dict[str, Any]) -> list[str]:
    """One run as a table row: id, pipeline@version, status, stages done, times, error."""
    latest: dict[str, str] = {}
    for event in state["events"]:
        if event.get("item") is None:
            latest[event["name"]] = event["state"]
    done = sum(value in ("finished", "skipped", "defaulted") for value in latest.values())
    created, updated = to_ms(state["created_at"]) or 0, to_ms(state["updated_at"]) or 0
    label = state["status"] + (" (partial)" if state.get("partial") else "")
    error = state.get("error") or {}
    return [
        state["run_id"],
        f"{state['pipeline_id']}@{state['pipeline_version']}",
        label,
        f"{done}/{len(latest)}",
        datetime.fromtimestamp(created / 1000, UTC).isoformat(timespec="seconds"),
        f"{(updated - created) / 1000:.1f}",
        str(error.get("message") or ""),
    ]
