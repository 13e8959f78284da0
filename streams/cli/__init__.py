"""The ``dspex`` command line: broker, topics, schemas, requests, programs, pipelines, ``up``...

Every command builds the settings once (``--settings FILE`` or the environment)
and turns a DSPex error into one red line and exit code 1, never a traceback.
"""

from __future__ import annotations

from rich.markup import escape

from dspex import schemas
from dspex.streams.cli import (  # noqa: F401 - importing them registers their commands
    cluster,
    contract,
    dashboard,
    dlq,
    optimize,
    pipelines,
    programs,
    records,
    runs,
    sessions,
    tenants,
    top,
    up,
    variables,
)
from dspex.streams.cli._app import app, err
from dspex.streams.errors import DSPexError, SchemaError

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point: DSPex errors become one clear line and exit code 1."""
    try:
        app()
    except (DSPexError, SchemaError, schemas.SchemaContractError) as exc:
        # one line whatever the terminal's width: scripts and log collectors read it whole
        # escaped: a message quoting "list[str]" is not rich markup
        message = escape(" ".join(str(exc).split()))
        err.print(f"[red]error:[/] {message}", soft_wrap=True, highlight=False)
        raise SystemExit(1) from None
