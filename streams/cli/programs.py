"""``dspex programs put|get|list`` and ``dspex submit``: programs and requests from a terminal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from dspex.streams.cli._app import app, err, out, settings_of
from dspex.streams.client.client import Client, PipelineRef, Program, RequestFailed
from dspex.streams.errors import ConfigError, InvalidRequest
from dspex.streams.programs import ADAPTERS, AUTO, check_program
from dspex.streams.serde import make_serde
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics

_ADAPTER_HELP = f"DSPy adapter: {', '.join(ADAPTERS)} (default {AUTO})."
programs_app = typer.Typer(help="Program versions on the compacted programs topic.")
app.add_typer(programs_app, name="programs")


@programs_app.command("put")
def programs_put(
    ctx: typer.Context,
    program_id: str,
    signature: Annotated[str, typer.Argument(help='e.g. "question, context -> answer"')],
    module_type: Annotated[str, typer.Option("--module")] = "Predict",
    state: Annotated[Path | None, typer.Option(help="DSPy JSON state file (demos, ...)")] = None,
    config: Annotated[str, typer.Option(help="Module config JSON, e.g. '{\"N\": 3}'")] = "{}",
    tool: Annotated[list[str] | None, typer.Option(help="A registered tool (repeat).")] = None,
    adapter: Annotated[str | None, typer.Option(help=_ADAPTER_HELP)] = None,
    description: str | None = None,
) -> None:
    """Publish a new version of a program, checked first with the router's own rules."""
    settings = settings_of(ctx)
    # refused before connecting: the same checks publish_program (and the router) run
    check_program(
        signature,
        module_type=module_type,
        module_config_json=config,
        adapter=adapter,
        deployed=settings.modules,
    )
    state_json = state.read_text() if state else None
    with Client(settings) as client:
        version = client.publish_program(
            program_id,
            signature,
            module_type=module_type,
            state_json=state_json,
            module_config_json=config,
            tools=tuple(tool or ()),
            description=description,
            adapter=adapter,
        )
    out.print(f"[green]published[/] {program_id} v{version}")


@programs_app.command("list")
def programs_list(ctx: typer.Context) -> None:
    """The latest version of every program."""
    table = Table("program", "version", "module", "adapter", "signature", "created")
    for pid, versions in sorted(_read(settings_of(ctx)).items()):
        latest = versions[-1]
        created = latest["created_at"].isoformat(timespec="seconds")
        adapter = latest.get("adapter") or AUTO
        table.add_row(
            pid,
            str(latest["version"]),
            latest["module_type"],
            adapter,
            latest["signature"],
            created,
        )
    out.print(table)


@programs_app.command("get")
def programs_get(ctx: typer.Context, program_id: str) -> None:
    """One program's latest version as JSON."""
    versions = _read(settings_of(ctx)).get(program_id)
    if not versions:
        raise ConfigError(f"no program {program_id!r} on the programs topic")
    out.print_json(json.dumps(versions[-1], default=str))


def _read(settings: Settings) -> dict[str, list[dict[str, Any]]]:
    from dspex.streams.client.programs import read_versions

    topic = Topics(settings.topics).name("programs")
    return read_versions(settings, make_serde(settings), topic)


@app.command("submit")
def submit(
    ctx: typer.Context,
    program: Annotated[
        str,
        typer.Argument(help="A registered program id, a signature, or (--pipeline) a pipeline."),
    ],
    inputs: Annotated[list[str], typer.Argument(help="name=value pairs (value: JSON or text)")],
    module_type: Annotated[str | None, typer.Option("--module")] = None,
    adapter: Annotated[str | None, typer.Option(help=_ADAPTER_HELP)] = None,
    pool: Annotated[str | None, typer.Option(help="Pool hint: general, optimizer, gpu.")] = None,
    deadline: Annotated[float, typer.Option(help="Seconds.")] = 60.0,
    stream: Annotated[bool, typer.Option(help="Print token chunks as they arrive.")] = True,
    cache: bool = True,
    pipeline: Annotated[
        bool, typer.Option("--pipeline", help="PROGRAM is a pipeline id: show its stages live.")
    ] = False,
    version: Annotated[int | None, typer.Option(help="Pipeline version (default latest).")] = None,
    session: Annotated[str | None, typer.Option(help="Session id: a turn of that session.")] = None,
    tenant: Annotated[
        str | None,
        typer.Option(help="Send as this tenant (its own topics; default tenants.client)."),
    ] = None,
) -> None:
    """Send one request (or pipeline run) and print the answer (streamed by default)."""
    inline = "->" in program
    target = (
        Program.inline(program, module_type or "Predict", adapter=adapter)
        if inline
        else Program.registered(program, adapter=adapter)
    )
    options: dict[str, Any] = {"deadline_s": deadline, "pool_hint": pool, "cache": cache}
    options["session_id"] = session
    with Client(settings_of(ctx), tenant=tenant) as client:
        if pipeline:
            from dspex.streams.cli.runs import show_run

            show_run(client, PipelineRef(program, version), parse_inputs(inputs), options)
        elif stream:
            _stream(client, target, parse_inputs(inputs), options)
        else:
            try:
                result = client.submit(target, parse_inputs(inputs), **options)
            except RequestFailed as exc:
                err.print(f"[red]{exc}[/]")
                raise typer.Exit(1) from None
            out.print_json(json.dumps(result.outputs))


@app.command("feedback")
def feedback(
    ctx: typer.Context,
    request_id: Annotated[str, typer.Argument(help="The answered request's id.")],
    quality: Annotated[float, typer.Argument(help="Quality score in [0, 1].")],
    program: Annotated[str, typer.Option("--program", help="The registered program id.")],
    variant: Annotated[str | None, typer.Option(help="The variant that answered.")] = None,
) -> None:
    """Score an answer's quality; the learning agent credits the variant that ran it."""
    with Client(settings_of(ctx)) as client:
        try:
            client.send_feedback(request_id, quality, program_id=program, variant=variant)
        except InvalidRequest as exc:
            err.print(f"[red]{exc}[/]")
            raise typer.Exit(2) from None
    err.print(f"feedback {quality} for request_id={request_id} program={program} sent")


def _stream(client: Client, target: Program | str, inputs: dict[str, Any], options: Any) -> None:
    for chunk in client.stream(target, inputs, **options):
        if chunk.delta:
            out.print(chunk.delta, end="", highlight=False)
        if chunk.final:
            out.print()
            if chunk.status != "ok":
                error = chunk.error or {}
                err.print(
                    f"[red]{chunk.status}[/] request_id={chunk.request_id} "
                    f"field={error.get('field')} stage={error.get('stage')}: {error.get('message')}"
                )
                raise typer.Exit(1)
            turn = chunk.session or {}
            where = f" session={turn['session_id']} turn={turn['turn']}" if turn else ""
            where += " (expired: started afresh)" if turn.get("expired") else ""
            # the router answers a cache hit itself: no pool ran it
            source = f"pool={chunk.pool}" if chunk.pool else "from=the router's cache"
            err.print(
                f"[dim]request_id={chunk.request_id} {source} cached={chunk.cached}{where}[/]"
            )
            out.print_json(json.dumps(chunk.outputs))


def parse_inputs(pairs: list[str]) -> dict[str, Any]:
    """``name=value`` pairs; a value that parses as JSON is used as such, else as text."""
    inputs: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ConfigError(f"input {pair!r} is not name=value")
        try:
            inputs[name] = json.loads(value)
        except json.JSONDecodeError:
            inputs[name] = value
    return inputs
