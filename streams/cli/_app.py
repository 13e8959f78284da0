"""The ``dspex`` Typer application, its consoles and the settings every command shares."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from dspex.streams import tracing
from dspex.streams.logs import configure_logging
from dspex.streams.settings import Settings, load_settings

app = typer.Typer(help="DSPex: DSPy programs behind Apache Kafka.", no_args_is_help=True)


def _console(*, stderr: bool) -> Console:
    """A console for stdout or stderr: piped or redirected, nothing is wrapped or cut.

    Rich fits output to 80 columns when there is no terminal, truncating table cells
    (``dspex.poo…``) and wrapping lines that scripts and log collectors read whole.
    """
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 100_000)


out = _console(stderr=False)
err = _console(stderr=True)


@app.callback()
def _root(
    ctx: typer.Context,
    settings_file: Annotated[
        Path | None,
        typer.Option("--settings", help="TOML settings file (else DSPEX_SETTINGS_FILE)."),
    ] = None,
) -> None:
    settings = load_settings(settings_file)
    configure_logging(settings.log_level)
    tracing.configure(settings, "dspex-cli")  # OTEL_* (docs/tracing.md); off by default
    ctx.obj = settings
    ctx.meta["settings_file"] = settings_file


def settings_of(ctx: typer.Context) -> Settings:
    settings: Settings = ctx.find_root().obj
    return settings
