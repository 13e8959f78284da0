"""``dspex tenants add|list|remove``: tenants on a secured cluster (docs/security.md)."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from dspex.streams import tenants as naming
from dspex.streams.cli._app import app, err, out, settings_of
from dspex.streams.errors import ConfigError
from dspex.streams.ops import tenants

tenants_app = typer.Typer(
    help="Tenants: a SCRAM user, its own request and response topics, ACLs and Kafka quotas."
)
app.add_typer(tenants_app, name="tenants")


def _password(password_file: Path | None) -> tuple[str, bool]:
    """(password, generated?): from the file when given, else a new random one."""
    if password_file is None:
        return secrets.token_urlsafe(24), True
    try:
        return password_file.read_text(encoding="utf-8").strip(), False
    except OSError as exc:
        raise ConfigError(f"--password-file {password_file}: cannot read it: {exc}") from exc


@tenants_app.command("add")
def tenants_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Tenant name: lowercase letters, digits, '-'.")],
    password_file: Annotated[
        Path | None, typer.Option(help="Read the password here instead of generating one.")
    ] = None,
    producer_byte_rate: Annotated[
        float | None, typer.Option(min=1, help="Kafka quota: bytes/s it may produce.")
    ] = None,
    consumer_byte_rate: Annotated[
        float | None, typer.Option(min=1, help="Kafka quota: bytes/s it may fetch.")
    ] = None,
    request_percentage: Annotated[
        float | None, typer.Option(min=1, help="Kafka quota: % of a broker thread's time.")
    ] = None,
) -> None:
    """Create (or update) a tenant; a generated password is printed once, here only."""
    settings = settings_of(ctx)
    password, generated = _password(password_file)
    limits = {
        key: value
        for key, value in {
            "producer_byte_rate": producer_byte_rate,
            "consumer_byte_rate": consumer_byte_rate,
            "request_percentage": request_percentage,
        }.items()
        if value is not None
    }
    with err.status(f"adding tenant {name}..."):
        tenants.add(settings, name, password, limits)
    prefix = settings.topics.prefix
    out.print(
        f"[green]tenant {name}[/]: user {naming.username(name)} (SCRAM-SHA-512)\n"
        f"  writes {naming.request_topic(name, prefix)}\n"
        f"  reads  {naming.response_topic(name, prefix)}"
        + (f"\n  quotas {limits}" if limits else ""),
        highlight=False,
    )
    if generated:
        out.print(f"  password (shown once): {password}", highlight=False)


@tenants_app.command("list")
def tenants_list(ctx: typer.Context) -> None:
    """Every tenant: principal, topics, ACLs and quotas."""
    table = Table("tenant", "principal", "topics", "acls", "quotas")
    for tenant in tenants.list_all(settings_of(ctx)):
        topics = f"{tenant.request_topic}\n{tenant.response_topic}"
        if not tenant.topics_exist:
            topics += "\n[red](missing)[/]"
        limits = "\n".join(f"{k}={v:g}" for k, v in sorted(tenant.quotas.items())) or "-"
        table.add_row(tenant.name, tenant.principal, topics, str(tenant.acls), limits)
    out.print(table)


@tenants_app.command("remove")
def tenants_remove(
    ctx: typer.Context, name: Annotated[str, typer.Argument(help="Tenant name.")]
) -> None:
    """Remove a tenant's ACLs, quotas, credentials and topics (its data goes with them)."""
    with err.status(f"removing tenant {name}..."):
        found = tenants.remove(settings_of(ctx), name)
    out.print(f"removed tenant {name}" if found else f"[yellow]no tenant {name}[/]")
