"""``dspex broker ...`` and ``dspex topics ...``: the cluster DSPex runs on."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from dspex.streams import kafka
from dspex.streams.cli._app import app, err, out, settings_of
from dspex.streams.ops.admin import TopicReport, ensure_topics
from dspex.streams.ops.cluster import ClusterInfo, LocalCluster
from dspex.streams.ops.security import Material
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics

broker_app = typer.Typer(
    help="The local KRaft broker, or a cluster of several (Apache Kafka's own jars)."
)
topics_app = typer.Typer(help="The topic catalog on the cluster.")
app.add_typer(broker_app, name="broker")
app.add_typer(topics_app, name="topics")


def print_broker(info: ClusterInfo, controller: int | None = None) -> None:
    nodes = f"{info.size} nodes" if info.size > 1 else "1 node"
    where = f" (active controller: node {controller})" if controller else ""
    out.print(
        f"[green]running[/] Apache Kafka {info.kafka_version}, {nodes}, at "
        f"[bold]{info.bootstrap_servers}[/]{where}"
    )
    for node in info.nodes:
        label = f"node {node.node_id}: " if info.size > 1 else ""
        out.print(
            f"  {label}{node.bootstrap_servers} pid={node.pid}\n"
            f"    data: {node.data_dir}\n    log:  {node.log_file}"
        )
    for node_id in info.down:
        out.print(f"  [yellow]node {node_id}: not running[/] (`dspex broker start` restarts it)")


@broker_app.command("start")
def broker_start(
    ctx: typer.Context,
    nodes: Annotated[
        int | None,
        typer.Option(
            min=1, max=9, help="Nodes, each broker and controller voter (local_broker.nodes)."
        ),
    ] = None,
    secure: Annotated[
        bool,
        typer.Option(
            "--secure",
            help="SASL_SSL (SCRAM-SHA-512, local CA) and ACLs (local_broker.secure); one node.",
        ),
    ] = False,
) -> None:
    """Resolve Kafka's jars (cached), format storage once, start and wait until it answers.

    With --nodes 3: three JVMs, each a broker and a voter of a three-node controller
    quorum; topics get 3 replicas and min.insync.replicas=2. Nodes that are already
    running are left alone, so this also restarts a node that died.

    With --secure: one node whose only client listener is SASL_SSL; it prints the
    settings file that connects DSPex to it (README, "Security").
    """
    local = settings_of(ctx).local_broker
    if secure:
        local = local.model_copy(update={"secure": True})
    cluster = LocalCluster(local, nodes=nodes)
    with err.status("starting the local Kafka broker (the first run downloads its jars)..."):
        info = cluster.start()
    print_broker(info, cluster.controller())
    if local.secure:
        material = Material(cluster.data_dir)
        out.print(
            f"  secured: SASL_SSL (SCRAM-SHA-512) and mTLS listeners, ACLs; connect DSPex with\n"
            f"    export DSPEX_SETTINGS_FILE={material.settings_file}\n"
            f"  or, over mTLS: DSPEX_SETTINGS_FILE={material.mtls_settings_file}"
        )


@broker_app.command("status")
def broker_status(ctx: typer.Context) -> None:
    """Say whether the local broker (every node of it) runs (exit code 1 when none does)."""
    cluster = LocalCluster(settings_of(ctx).local_broker)
    info = cluster.status()
    if info is None:
        out.print("[yellow]not running[/]")
        raise typer.Exit(1)
    print_broker(info, cluster.controller())


@broker_app.command("stop")
def broker_stop(ctx: typer.Context) -> None:
    """Stop every node of the local broker (SIGTERM, then SIGKILL after a timeout)."""
    stopped = LocalCluster(settings_of(ctx).local_broker).stop()
    out.print("stopped" if stopped else "[yellow]was not running[/]")


# --- topics ---------------------------------------------------------------------------------


def create_topics(settings: Settings) -> list[TopicReport]:
    """The catalog's topics, replicated as ``topics.*`` say or as the cluster's size suggests."""
    topics = Topics(settings.topics)
    return ensure_topics(kafka.admin_client(settings), topics.all(), settings=settings.topics)


def topics_table(reports: list[TopicReport]) -> Table:
    table = Table("topic", "status", "partitions", "replicas", "differences")
    colour = {"created": "green", "ok": "green", "differs": "red"}
    for r in reports:
        status = f"[{colour[r.status]}]{r.status}[/]"
        row = (r.topic, status, str(r.partitions), str(r.replicas), "\n".join(r.differences))
        table.add_row(*row)
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


def ensure_cluster(settings: Settings) -> ClusterInfo | None:
    """Check a configured cluster answers, or start the local broker (``local_broker.nodes``
    nodes); return it if we started it."""
    if settings.kafka.bootstrap_servers:
        brokers = kafka.check_reachable(settings)
        out.print(f"cluster {settings.kafka.bootstrap_servers}: {brokers} broker(s)")
        return None
    cluster = LocalCluster(settings.local_broker)
    if cluster.status() is not None:
        return None
    with err.status("starting the local Kafka broker (the first run downloads its jars)..."):
        info = cluster.start()
    print_broker(info, cluster.controller())
    return info
