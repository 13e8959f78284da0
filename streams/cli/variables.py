"""``dspex variables set|get|list|history``: shared, typed variables from a terminal."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from dspex.streams.cli._app import app, out, settings_of
from dspex.streams.client.client import Client, VariableScope
from dspex.streams.errors import ConfigError, InvalidRequest
from dspex.streams.variables import VAR_TYPES, constraints_of

variables_app = typer.Typer(
    help="Shared, typed variables: the compacted variables topic and its history."
)
app.add_typer(variables_app, name="variables")

_BARE_TEXT_TYPES = ("string", "module")
ScopeOption = Annotated[
    str | None, typer.Option(help="global, program, module or session (inferred).")
]
SessionOption = Annotated[
    str | None, typer.Option(help="A session id: that session only (docs/sessions.md).")
]
ProgramOption = Annotated[str | None, typer.Option(help="The program id (program/module scope).")]
ModuleOption = Annotated[str | None, typer.Option(help="The module type (module scope).")]


# ignore_unknown_options: a negative value (-0.5) is the value, not an option
@variables_app.command("set", context_settings={"ignore_unknown_options": True})
def variables_set(
    ctx: typer.Context,
    name: str,
    value: Annotated[str, typer.Argument(help="JSON, or bare text for string/choice/module.")],
    var_type: Annotated[str | None, typer.Option("--type", help=", ".join(VAR_TYPES))] = None,
    minimum: Annotated[float | None, typer.Option("--min")] = None,
    maximum: Annotated[float | None, typer.Option("--max")] = None,
    choices: Annotated[str | None, typer.Option(help="Comma-separated, e.g. a,b.")] = None,
    dims: Annotated[int | None, typer.Option(help="Embedding dimensions.")] = None,
    shape: Annotated[str | None, typer.Option(help="Tensor shape, e.g. 2,3.")] = None,
    max_length: Annotated[int | None, typer.Option(help="Longest string.")] = None,
    pattern: Annotated[str | None, typer.Option(help="Regex a string must match.")] = None,
    fields: Annotated[str | None, typer.Option(help="Composite members, JSON.")] = None,
    constraints: Annotated[str | None, typer.Option(help="All constraints, JSON.")] = None,
    when: Annotated[
        list[str] | None, typer.Option(help="VAR=v1,v2: only while VAR is one of these (repeat).")
    ] = None,
    scope: ScopeOption = None,
    program: ProgramOption = None,
    module: ModuleOption = None,
    session: SessionOption = None,
    reason: Annotated[str, typer.Option(help="Why, for the history.")] = "",
    by: Annotated[str | None, typer.Option("--by", help="Who (default user@host).")] = None,
    source: Annotated[str, typer.Option(help="person, optimizer, learning-agent.")] = "person",
    observer: Annotated[list[str] | None, typer.Option(help="A program using it (repeat).")] = None,
) -> None:
    """Validate and publish a new value; exit 1 naming the field when it is invalid."""
    where = VariableScope(scope=scope, program=program, module=module, session=session)
    flags = _flags(minimum, maximum, choices, dims, shape, max_length, pattern, fields, when)
    with Client(settings_of(ctx)) as client:
        current = client.get_variable(name, **where)
        kind = var_type or (current["var_type"] if current is not None else None)
        record = client.set_variable(
            name,
            parse_value_text(value, kind),
            var_type=kind,
            constraints=_constraints(constraints, flags, current, kind),
            reason=reason,
            updated_by=by or "",
            source=source,
            observers=tuple(observer or ()),
            **where,
        )
    out.print(
        f"[green]set[/] {escape(_label(record))} = {escape(record['value_json'])} "
        f"(v{record['version']}, {record['var_type']})"
    )


@variables_app.command("get")
def variables_get(
    ctx: typer.Context,
    name: str,
    scope: ScopeOption = None,
    program: ProgramOption = None,
    module: ModuleOption = None,
) -> None:
    """The record in force (what the routers use) as JSON."""
    where = VariableScope(scope=scope, program=program, module=module)
    with Client(settings_of(ctx)) as client:
        record = client.get_variable(name, **where)
    if record is None:
        raise ConfigError(f"no variable {name!r} in that scope on the variables topic")
    out.print_json(json.dumps(record, default=str))


@variables_app.command("list")
def variables_list(ctx: typer.Context) -> None:
    """Every variable in force: scope, type, value, version, author, constraints."""
    table = Table("variable", "scope", "type", "value", "version", "updated by", "constraints")
    with Client(settings_of(ctx)) as client:
        records = client.list_variables()
    for record in records:
        table.add_row(
            escape(record["name"]),
            escape(_scope(record)),
            record["var_type"],
            escape(_clip(record["value_json"])),
            str(record["version"]),
            escape(record["updated_by"]),
            escape(_clip(record["constraints_json"])),
        )
    out.print(table)


@variables_app.command("history")
def variables_history(
    ctx: typer.Context,
    name: str,
    scope: ScopeOption = None,
    program: ProgramOption = None,
    module: ModuleOption = None,
) -> None:
    """Every update of a variable, oldest first, with who and why (all scopes by default)."""
    where = VariableScope(scope=scope, program=program, module=module)
    with Client(settings_of(ctx)) as client:
        records = client.variable_history(name, **where)
    table = Table("updated", "scope", "version", "value", "previous", "by", "source", "reason")
    for record in records:
        table.add_row(
            record["updated_at"].isoformat(timespec="seconds"),
            escape(_scope(record)),
            str(record["version"]),
            escape(_clip(record["value_json"])),
            escape(_clip(record["previous_value_json"] or "")),
            escape(record["updated_by"]),
            escape(record["source"]),
            escape(record["reason"]),
        )
    out.print(table)


def parse_value_text(text: str, var_type: str | None) -> Any:
    """A value typed on the command line: JSON, else the text itself.

    For string and module variables a JSON string is unquoted and anything else
    is the text as typed (``123`` stays the string ``"123"``).
    """
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if var_type in _BARE_TEXT_TYPES and not isinstance(value, str):
        return text
    return value


def _flags(
    minimum: float | None,
    maximum: float | None,
    choices: str | None,
    dims: int | None,
    shape: str | None,
    max_length: int | None,
    pattern: str | None,
    fields: str | None,
    when: list[str] | None,
) -> dict[str, Any]:
    flags: dict[str, Any] = {
        "min": _number(minimum),
        "max": _number(maximum),
        "choices": [parse_value_text(c, None) for c in choices.split(",")] if choices else None,
        "dims": dims,
        "shape": [_size(part) for part in shape.split(",")] if shape else None,
        "max_length": max_length,
        "pattern": pattern,
        "fields": _json_option("--fields", fields) if fields else None,
        "when": dict(_condition(item) for item in when) if when else None,
    }
    return {key: value for key, value in flags.items() if value is not None}


def _constraints(
    text: str | None, flags: dict[str, Any], current: dict[str, Any] | None, kind: str | None
) -> dict[str, Any] | None:
    """``--constraints`` plus the flags; the flags alone extend the current constraints."""
    if text is None and not flags:
        return None  # unchanged
    if text is not None:
        base = _json_option("--constraints", text)
        if not isinstance(base, dict):
            raise InvalidRequest("constraints_json", "--constraints must be a JSON object")
    elif current is not None and current["var_type"] == kind:
        base = constraints_of(current)
    else:
        base = {}
    return {**base, **flags}


def _condition(item: str) -> tuple[str, list[Any]]:
    name, sep, values = item.partition("=")
    if not sep or not name or not values:
        raise ConfigError(f"--when {item!r} is not VAR=value[,value...]")
    return name, [parse_value_text(v, None) for v in values.split(",")]


def _json_option(option: str, text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{option} is not JSON: {exc}") from exc


def _number(value: float | None) -> float | int | None:
    if value is not None and value.is_integer():
        return int(value)
    return value


def _size(text: str) -> int:
    try:
        return int(text)
    except ValueError as exc:
        raise ConfigError(f"--shape needs integers, got {text!r}") from exc


def _scope(record: dict[str, Any]) -> str:
    return "global" if record["scope"] == "global" else f"{record['scope']} {record['scope_ref']}"


def _label(record: dict[str, Any]) -> str:
    return f"{record['name']} [{_scope(record)}]"


def _clip(text: str, width: int = 60) -> str:
    return text if len(text) <= width else f"{text[: width - 3]}..."
