"""``dspex sessions list|show|end``: session state on the compacted sessions topic."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.table import Table

from dspex.streams.cli._app import app, out, settings_of
from dspex.streams.errors import InvalidRequest
from dspex.streams.serde import make_serde
from dspex.streams.sessions import end_session, find_session, list_sessions

sessions_app = typer.Typer(help="Sessions: history, pinned variants and counters per session.")
app.add_typer(sessions_app, name="sessions")


@sessions_app.command("list")
def sessions_list(ctx: typer.Context) -> None:
    """Every live session: turns, history kept, tokens, last turn, expiry."""
    settings = settings_of(ctx)
    table = Table("session", "turns", "kept", "tokens", "pinned", "updated", "expires")
    states = list_sessions(settings, make_serde(settings))
    for session_id, state in sorted(states.items()):
        counters = state["counters"]
        tokens = counters["prompt_tokens"] + counters["completion_tokens"]
        pinned = ", ".join(f"{k}={v}" for k, v in sorted(state["pinned"].items()))
        table.add_row(
            session_id,
            str(counters["turns"]),
            str(len(state["turns"])),
            str(tokens),
            pinned or "-",
            _when(state["updated_at"]),
            _when(state["expires_at"]),
        )
    out.print(table)
    out.print(f"{len(states)} live session(s)")


@sessions_app.command("show")
def sessions_show(ctx: typer.Context, session_id: str) -> None:
    """One session's state as JSON (history, variables, pins, counters, TTL)."""
    settings = settings_of(ctx)
    found = find_session(settings, make_serde(settings), session_id)
    if found.state is None:
        why = f"it {found.ended}" if found.ended else "never seen, or ended long ago"
        raise InvalidRequest("session_id", f"no live session {session_id!r}: {why}")
    out.print_json(json.dumps(found.state, default=str))


@sessions_app.command("end")
def sessions_end(ctx: typer.Context, session_id: str) -> None:
    """End a session now: its state is tombstoned; its next turn starts fresh (expired)."""
    settings = settings_of(ctx)
    state = end_session(settings, make_serde(settings), session_id)
    out.print(f"[green]ended[/] {session_id} after {state['counters']['turns']} turn(s)")


def _when(value: Any) -> str:
    return str(value.isoformat(timespec="seconds")) if hasattr(value, "isoformat") else str(value)
