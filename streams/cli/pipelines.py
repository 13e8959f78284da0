"""``dspex pipelines put|list|get``: pipeline versions from a terminal.

``put`` reads and checks the file first (no broker needed to refuse a bad one),
then validates it against the registered programs and publishes the next version.
An invalid pipeline is one red line naming every problem's stage and path, exit 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from dspex.streams.cli._app import app, out, settings_of
from dspex.streams.client.client import Client
from dspex.streams.client.pipelines import read_pipelines
from dspex.streams.errors import ConfigError
from dspex.streams.pipelines import files
from dspex.streams.pipelines.spec import PublishedPipeline
from dspex.streams.serde import make_serde
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics

pipelines_app = typer.Typer(help="Pipeline versions on the compacted pipelines topic.")
app.add_typer(pipelines_app, name="pipelines")


@pipelines_app.command("put")
def pipelines_put(
    ctx: typer.Context,
    pipeline_id: str,
    file: Annotated[Path, typer.Argument(help="The pipeline, a YAML or JSON file.")],
    description: Annotated[str | None, typer.Option(help="What this version changes.")] = None,
) -> None:
    """Validate a pipeline against the registered programs and publish its next version."""
    pipeline = files.load(file, pipeline_id=pipeline_id)
    with Client(settings_of(ctx)) as client:
        published = client.pipelines.put(pipeline, description=description)
    stages = len(published.pipeline.stages)
    out.print(f"[green]published[/] {pipeline_id} v{published.version} ({stages} stages)")


@pipelines_app.command("list")
def pipelines_list(ctx: typer.Context) -> None:
    """The latest version of every pipeline."""
    table = Table("pipeline", "version", "stages", "inputs", "outputs", "created", "by")
    for pid, versions in sorted(_read(settings_of(ctx)).items()):
        latest = versions[-1]
        pipeline = latest.pipeline
        table.add_row(
            pid,
            str(latest.version),
            ", ".join(stage.name for stage in pipeline.stages),
            pipeline.inputs,
            ", ".join(pipeline.outputs),
            latest.created_at.isoformat(timespec="seconds"),
            latest.created_by,
        )
    out.print(table)


@pipelines_app.command("get")
def pipelines_get(
    ctx: typer.Context,
    pipeline_id: str,
    version: Annotated[int | None, typer.Option(help="A version (default: the latest).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="The record as JSON.")] = False,
) -> None:
    """One pipeline version as a YAML file (what `put` reads back), or its record as JSON."""
    versions = _read(settings_of(ctx), pipeline_id).get(pipeline_id, [])
    chosen = _pick(pipeline_id, versions, version)
    if as_json:
        record = chosen.pipeline.to_record(
            version=chosen.version, created_at=chosen.created_at, created_by=chosen.created_by
        )
        out.print_json(json.dumps(record, default=str))
        return
    created = chosen.created_at.isoformat(timespec="seconds")
    header = f"# {pipeline_id} version {chosen.version}, created {created}"
    by = f" by {chosen.created_by}" if chosen.created_by else ""
    document = files.dumps(chosen.pipeline)
    # soft_wrap: a long line must not be wrapped, or the YAML would no longer read back
    out.print(f"{header}{by}\n{document}", end="", highlight=False, markup=False, soft_wrap=True)


def _pick(
    pipeline_id: str, versions: list[PublishedPipeline], version: int | None
) -> PublishedPipeline:
    if not versions:
        raise ConfigError(f"no pipeline {pipeline_id!r} on the pipelines topic")
    if version is None:
        return versions[-1]
    for published in versions:
        if published.version == version:
            return published
    held = ", ".join(str(p.version) for p in versions)
    raise ConfigError(f"pipeline {pipeline_id!r} has no version {version} on the topic ({held})")


def _read(settings: Settings, pipeline_id: str | None = None) -> dict[str, list[PublishedPipeline]]:
    topic = Topics(settings.topics).name("pipelines")
    return read_pipelines(settings, make_serde(settings), topic, pipeline_id=pipeline_id)
