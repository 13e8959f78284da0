"""``dspex dashboard``: serve the live web dashboard until Ctrl-C or SIGTERM."""

from __future__ import annotations

import signal
import threading
from typing import Annotated, Any

import typer

from dspex.streams.cli._app import app, out, settings_of
from dspex.streams.dashboard.server import Dashboard


@app.command("dashboard")
def dashboard(
    ctx: typer.Context,
    port: Annotated[
        int | None, typer.Option(help="Port (default dashboard.port; taken: a free one).")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
) -> None:
    """Live web dashboard: pools, workers, routing tables over time, dead letters."""
    board = Dashboard(settings_of(ctx), host=host, port=port)
    stop = threading.Event()

    def _handler(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)
    board.start()
    out.print(f"dashboard {board.url}  (Ctrl-C stops)")
    try:
        stop.wait()
    finally:
        board.stop()
