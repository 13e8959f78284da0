"""``dspex optimize run|cancel|follow|status``: optimizer jobs from a terminal."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn

from dspex.streams.cli._app import app, err, out, settings_of
from dspex.streams.client.client import Chunk, Client
from dspex.streams.client.jobs import (
    JobOptions,
    JobProgress,
    JobResult,
    job_status,
    job_submitted,
    pipeline_job_target,
)
from dspex.streams.errors import ConfigError
from dspex.streams.serde import make_serde
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics

optimize_app = typer.Typer(help="Optimizer jobs on the optimizer pool (docs/optimizer.md).")
app.add_typer(optimize_app, name="optimize")


@optimize_app.command("run")
def optimize_run(
    ctx: typer.Context,
    program_id: Annotated[
        str, typer.Argument(help="The registered program (or, with --pipeline, pipeline).")
    ],
    metric: Annotated[str, typer.Option(help="exact_match, f1, contains, dspy:<name>.")],
    optimizer: Annotated[
        str | None,
        typer.Option(help="BootstrapFewShot, MIPROv2, SIMBA, GEPA; omit to search only."),
    ] = None,
    dataset: Annotated[
        Path | None,
        typer.Option(help="Examples: a .jsonl file (one object a line) or a JSON array."),
    ] = None,
    dataset_topic: Annotated[str | None, typer.Option(help="A topic of examples instead.")] = None,
    search: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=LOW:HIGH[:STEPS] or NAME=A,B,... (repeat), e.g. temperature=0:1:3."
        ),
    ] = None,
    config: Annotated[str, typer.Option(help="Optimizer settings JSON.")] = "{}",
    version: Annotated[
        int | None, typer.Option(help="Version to start from (default latest).")
    ] = None,
    val_fraction: Annotated[float, typer.Option(help="Examples held out for scoring.")] = 0.5,
    canary: Annotated[float | None, typer.Option(help="Canary weight for the new version.")] = None,
    follow: Annotated[bool, typer.Option(help="Show live progress until the job ends.")] = False,
    pipeline: Annotated[
        bool, typer.Option("--pipeline", help="PROGRAM is a pipeline id: compile all its stages.")
    ] = False,
) -> None:
    """Queue an optimizer job; with --follow, show its progress and result."""
    if pipeline:
        program_id = pipeline_job_target(program_id)
    options = JobOptions(
        optimizer=optimizer,
        optimizer_config=_object("--config", config),
        metric=metric,
        search=parse_search(search or []),
        program_version=version,
        val_fraction=val_fraction,
        canary_weight=canary,
        requested_by="dspex-cli",
    )
    if dataset is not None:
        options["dataset"] = read_dataset(dataset)
    else:
        options["dataset_topic"] = dataset_topic
    with Client(settings_of(ctx)) as client:
        if not follow:
            job_id = client.submit_job(program_id, **options)
            out.print(f"[green]queued[/] job {job_id}  (dspex optimize follow {job_id})")
            return
        result = _run_with_bar(client, program_id, options)
    _print_result(result)


def _run_with_bar(client: Client, program_id: str, options: JobOptions) -> JobResult:
    if not err.is_terminal:  # piped: a line per progress chunk, not a bar nobody sees redrawn
        return client.optimize(program_id, on_progress=_print_progress, **options)
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("best={task.fields[best]}"),
    )
    with Progress(*columns, console=err, transient=False) as bar:
        task = bar.add_task("queued", total=None, best="-")
        seen = _Seen()

        def show(progress: JobProgress) -> None:
            seen.update(progress)
            bar.update(task, description=_headline(progress)[:60], total=seen.trials or None)
            bar.update(task, completed=progress.trial, best=seen.best_text())

        return client.optimize(program_id, on_progress=show, **options)


@dataclasses.dataclass
class _Seen:
    """What the job reported so far: a chunk without a best score or a trial count keeps them."""

    best: float | None = None
    trials: int = 0

    def update(self, progress: JobProgress) -> None:
        self.best = progress.best if progress.best is not None else self.best
        self.trials = progress.trials or self.trials

    def best_text(self) -> str:
        return "-" if self.best is None else f"{self.best:.4f}"


def _headline(progress: JobProgress) -> str:
    """``phase message``, the phase not twice (``compile finished``, not ``compile compile``)."""
    if progress.message.split(" ", 1)[0] == progress.phase:
        return progress.message
    return f"{progress.phase} {progress.message}".strip()


def _print_progress(progress: JobProgress) -> None:
    trial = f" trial {progress.trial}/{progress.trials}" if progress.trials else ""
    best = "" if progress.best is None else f" best={progress.best:.4f}"
    err.print(f"{_headline(progress)}{trial}{best}", highlight=False, soft_wrap=True)


def _print_result(result: JobResult) -> None:
    if result.ok and "pipeline_id" in result.outputs:
        out.print(
            f"[green]job {result.job_id} done[/]: score {result.score_before} -> "
            f"{result.score_after}; pipeline {result.outputs['pipeline_id']} version "
            f"{result.outputs['pipeline_version']}; programs "
            f"{json.dumps(result.outputs['program_versions'])}"
        )
        return
    if result.ok:
        out.print(
            f"[green]job {result.job_id} done[/]: score {result.score_before} -> "
            f"{result.score_after}; program version {result.program_version}; "
            f"variables {json.dumps(result.variables)}"
        )
        return
    error = result.error or {}
    err.print(f"[red]job {result.job_id} {result.status}[/]: {error.get('message')}")
    raise typer.Exit(1)


@optimize_app.command("cancel")
def optimize_cancel(
    ctx: typer.Context, job_id: str, reason: Annotated[str, typer.Option()] = ""
) -> None:
    """Ask the job's runner to stop it (it ends with a final "cancelled" Response)."""
    with Client(settings_of(ctx)) as client:
        client.cancel_job(job_id, requested_by="dspex-cli", reason=reason)
    out.print(f"cancel requested for job {job_id}")


@optimize_app.command("follow")
def optimize_follow(ctx: typer.Context, job_id: str) -> None:
    """Print a running job's progress from now until it ends (a finished job: its result)."""
    settings = settings_of(ctx)
    serde = make_serde(settings)
    final = job_status(settings, serde, job_id)
    if final is not None:
        _print_result(JobResult.from_chunk(Chunk.from_record(final)))
        return
    if not job_submitted(settings, serde, job_id):
        raise ConfigError(f"no job {job_id} on {Topics(settings.topics).name('jobs')}")
    with Client(settings) as client:
        for chunk in client.follow_job(job_id):
            if not chunk.final:
                out.print(chunk.delta, end="", highlight=False)
            else:
                _print_result(JobResult.from_chunk(chunk))


@optimize_app.command("status")
def optimize_status(ctx: typer.Context, job_id: str) -> None:
    """A finished job's final Response (from jobs.status) as JSON."""
    final = _finished(settings_of(ctx), job_id)
    if final is None:
        raise ConfigError(f"job {job_id} has not finished (or is unknown)")
    out.print_json(json.dumps(final, default=str))


def _finished(settings: Settings, job_id: str) -> dict[str, Any] | None:
    record = job_status(settings, make_serde(settings), job_id)
    return None if record is None else dataclasses.asdict(Chunk.from_record(record))


def parse_search(pairs: list[str]) -> dict[str, Any]:
    """``temperature=0:1:3`` -> a range; ``model=a,b`` -> choices (JSON values where they parse)."""
    search: dict[str, Any] = {}
    for pair in pairs:
        name, sep, spec = pair.partition("=")
        if not sep or not name or not spec:
            raise ConfigError(f"--search {pair!r} is not NAME=LOW:HIGH[:STEPS] or NAME=A,B")
        if ":" in spec:
            parts = spec.split(":")
            if len(parts) not in (2, 3):
                raise ConfigError(f"--search {pair!r}: a range is LOW:HIGH or LOW:HIGH:STEPS")
            bounds = [_value(part) for part in parts]
            search[name] = dict(zip(("min", "max", "steps"), bounds, strict=False))
        else:
            search[name] = {"choices": [_value(part) for part in spec.split(",")]}
    return search


def read_dataset(path: Path) -> list[dict[str, Any]]:
    """Examples from a .jsonl file (one object a line) or a JSON array."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read dataset {path}: {exc}") from exc
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"dataset {path}: not a JSON array: {exc}") from exc
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise ConfigError(f"dataset {path}: every example must be a JSON object")
        return rows
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            where = f"dataset {path} line {number}"
            raise ConfigError(f"{where}: {exc.msg} (column {exc.colno})") from None
        if not isinstance(row, dict):
            raise ConfigError(f"dataset {path} line {number}: an example must be a JSON object")
        rows.append(row)
    return rows


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _object(option: str, text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{option}: invalid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ConfigError(f"{option}: must be a JSON object")
    return value
