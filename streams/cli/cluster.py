"""``dspex broker ...`` and ``dspex topics ...``: the cluster DSPex runs on."""

from __future__ import annotations

import typer
from rich.table import Table

from dspex.streams import kafka
from dspex.streams.cli._app import app, err, out, settings_of
from dspex.streams.ops.admin import TopicReport, ensure_topics
from dspex.streams.ops.broker import BrokerInfo, LocalBroker
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics

broker_app = typer.Typer(help="The local single-node KRaft broker (Apache Kafka's own jars).")
topics_app = typer.Typer(help="The topic catalog on the cluster.")
app.add_typer(broker_app, name="broker")
app.add_typer(topics_app, name="topics")


def print_broker(info: BrokerInfo) -> None:
    out.print(
        f"[green]running[/] Apache Kafka {info.kafka_version} at [bold]{info.bootstrap_servers}[/]"
        f"  pid={info.pid}\n  data: {info.data_dir}\n  log:  {info.log_file}"
    )


@broker_app.command("start")
def broker_start(ctx: typer.Context) -> None:
    """Resolve Kafka's jars (cached), format storage once, start and wait until it answers."""
    settings = settings_of(ctx)
    with err.status("starting the local Kafka broker (the first run downloads its jars)..."):
        info = LocalBroker(settings.local_broker).start()
    print_broker(info)


@broker_app.command("status")
def broker_status(ctx: typer.Context) -> None:
    """Say whether the local broker runs (exit code 1 when it does not)."""
    info = LocalBroker(settings_of(ctx).local_broker).status()
    if info is None:
        out.print("[yellow]not running[/]")
        raise typer.Exit(1)
    print_broker(info)


@broker_app.command("stop")
def broker_stop(ctx: typer.Context) -> None:
    """Stop the local broker cleanly (SIGTERM, then SIGKILL after a timeout)."""
    stopped = LocalBroker(settings_of(ctx).local_broker).stop()
    out.print("stopped" if stopped else "[yellow]was not running[/]")


# --- topics ---------------------------------------------------------------------------------


def create_topics(settings: Settings) -> list[TopicReport]:
    topics = Topics(settings.topics)
    return ensure_topics(
        kafka.admin_client(settings),
        topics.all(),
        replication_factor=settings.topics.replication_factor,
    )


def topics_table(reports: list[TopicReport]) -> Table:
    table = Table("topic", "status", "partitions", "differences")
    colour = {"created": "green", "ok": "green", "differs": "red"}
    for r in reports:
        status = f"[{colour[r.status]}]{r.status}[/]"
        table.add_row(r.topic, status, str(r.partitions), "\n".join(r.differences))
    return table


@topics_app.command("create")
def topics_create(ctx: typer.Context) -> None:
    """Create every catalog topic that is missing; report (exit 1) any whose config differs."""
    reports = create_topics(settings_of(ctx))
    out.print(topics_table(reports))
    if any(r.status == "differs" for r in reports):
        err.print("[red]some topics differ from the catalog; DSPex does not alter them[/]")
        raise typer.Exit(1)


@topics_app.command("list")
def topics_list(ctx: typer.Context) -> None:
    """The catalog: physical names, schema, key, partitions, cleanup and retention."""
    table = Table("topic", "value schema", "key", "partitions", "cleanup", "retention")
    for name, spec in Topics(settings_of(ctx).topics).all():
        days = f"{spec.retention_ms / 86_400_000:g} d" if spec.retention_ms else "forever"
        table.add_row(name, spec.schema, spec.key, str(spec.partitions), spec.cleanup_policy, days)
    out.print(table)


def ensure_cluster(settings: Settings) -> BrokerInfo | None:
    """Check a configured cluster answers, or start the local broker; return it if we started it."""
    if settings.kafka.bootstrap_servers:
        brokers = kafka.check_reachable(settings)
        out.print(f"cluster {settings.kafka.bootstrap_servers}: {brokers} broker(s)")
        return None
    broker = LocalBroker(settings.local_broker)
    if broker.status() is not None:
        return None
    with err.status("starting the local Kafka broker (the first run downloads its jars)..."):
        info = broker.start()
    print_broker(info)
    return info
