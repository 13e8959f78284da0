"""``dspex schemas ...``: the Avro contract in ``schemas/*.avsc``."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from dspex import schemas
from dspex.schemas.evolution import check_all, release
from dspex.streams.cli._app import app, err, out

schemas_app = typer.Typer(help="The Avro contract in schemas/*.avsc.")
app.add_typer(schemas_app, name="schemas")


@schemas_app.command("list")
def schemas_list() -> None:
    """Every record schema with its version and fingerprint."""
    table = Table("schema", "version", "CRC-64-AVRO fingerprint", "fields")
    for name in schemas.names():
        s = schemas.current(name)
        table.add_row(
            s.full_name, str(s.version), f"{s.fingerprint:#018x}", str(len(s.definition["fields"]))
        )
    out.print(table)


@schemas_app.command("show")
def schemas_show(name: str) -> None:
    """Print one schema's JSON."""
    out.print_json(json.dumps(schemas.current(name).definition))


@schemas_app.command("check")
def schemas_check() -> None:
    """Fail (exit 1) when a schema can no longer read records written by a released version."""
    problems = check_all()
    if problems:
        for problem in problems:
            err.print(f"[red]{problem}[/]")
        raise typer.Exit(1)
    out.print(f"[green]all {len(schemas.names())} schemas read every released version[/]")


@schemas_app.command("release")
def schemas_release(name: str) -> None:
    """Snapshot a changed, compatible schema as its next released version (schemas/history/)."""
    released = release(name)
    out.print(
        f"{released.full_name}: latest release is v{released.version} "
        f"(fingerprint {released.fingerprint:#018x})"
    )
