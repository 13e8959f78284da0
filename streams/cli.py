"""The ``dspex`` command line: broker, topics, schemas, settings and ``up``.

Every command builds the settings once (``--settings FILE`` or the environment)
and turns a DSPex error into one red line and exit code 1, never a traceback.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

import schemas
from schemas.evolution import check_all, release
from streams import kafka
from streams.admin import TopicReport, ensure_topics
from streams.broker import BrokerInfo, LocalBroker
from streams.errors import DSPexError, SchemaError
from streams.logs import configure_logging
from streams.serde import Serde, make_serde
from streams.settings import Settings, load_settings
from streams.topics import Topics

app = typer.Typer(help="DSPex: DSPy programs behind Apache Kafka.", no_args_is_help=True)
broker_app = typer.Typer(help="The local single-node KRaft broker (Apache Kafka's own jars).")
topics_app = typer.Typer(help="The topic catalog on the cluster.")
schemas_app = typer.Typer(help="The Avro contract in schemas/*.avsc.")
app.add_typer(broker_app, name="broker")
app.add_typer(topics_app, name="topics")
app.add_typer(schemas_app, name="schemas")

out = Console()
err = Console(stderr=True)


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
    ctx.obj = settings


def _settings(ctx: typer.Context) -> Settings:
    settings: Settings = ctx.find_root().obj
    return settings


# --- broker ---------------------------------------------------------------------------------


def _print_broker(info: BrokerInfo) -> None:
    out.print(
        f"[green]running[/] Apache Kafka {info.kafka_version} at [bold]{info.bootstrap_servers}[/]"
        f"  pid={info.pid}\n  data: {info.data_dir}\n  log:  {info.log_file}"
    )


@broker_app.command("start")
def broker_start(ctx: typer.Context) -> None:
    """Resolve Kafka's jars (cached), format storage once, start and wait until it answers."""
    settings = _settings(ctx)
    with err.status("starting the local Kafka broker (the first run downloads its jars)..."):
        info = LocalBroker(settings.local_broker).start()
    _print_broker(info)


@broker_app.command("status")
def broker_status(ctx: typer.Context) -> None:
    """Say whether the local broker runs (exit code 1 when it does not)."""
    info = LocalBroker(_settings(ctx).local_broker).status()
    if info is None:
        out.print("[yellow]not running[/]")
        raise typer.Exit(1)
    _print_broker(info)


@broker_app.command("stop")
def broker_stop(ctx: typer.Context) -> None:
    """Stop the local broker cleanly (SIGTERM, then SIGKILL after a timeout)."""
    stopped = LocalBroker(_settings(ctx).local_broker).stop()
    out.print("stopped" if stopped else "[yellow]was not running[/]")


# --- topics ---------------------------------------------------------------------------------


def _create_topics(settings: Settings) -> list[TopicReport]:
    topics = Topics(settings.topics)
    return ensure_topics(
        kafka.admin_client(settings),
        topics.all(),
        replication_factor=settings.topics.replication_factor,
    )


def _topics_table(reports: list[TopicReport]) -> Table:
    table = Table("topic", "status", "partitions", "differences")
    colour = {"created": "green", "ok": "green", "differs": "red"}
    for r in reports:
        status = f"[{colour[r.status]}]{r.status}[/]"
        table.add_row(r.topic, status, str(r.partitions), "\n".join(r.differences))
    return table


@topics_app.command("create")
def topics_create(ctx: typer.Context) -> None:
    """Create every catalog topic that is missing; report (exit 1) any whose config differs."""
    reports = _create_topics(_settings(ctx))
    out.print(_topics_table(reports))
    if any(r.status == "differs" for r in reports):
        err.print("[red]some topics differ from the catalog; DSPex does not alter them[/]")
        raise typer.Exit(1)


@topics_app.command("list")
def topics_list(ctx: typer.Context) -> None:
    """The catalog: physical names, schema, key, partitions, cleanup and retention."""
    table = Table("topic", "value schema", "key", "partitions", "cleanup", "retention")
    for name, spec in Topics(_settings(ctx).topics).all():
        days = f"{spec.retention_ms / 86_400_000:g} d" if spec.retention_ms else "forever"
        table.add_row(name, spec.schema, spec.key, str(spec.partitions), spec.cleanup_policy, days)
    out.print(table)


# --- schemas --------------------------------------------------------------------------------


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


# --- tail -----------------------------------------------------------------------------------


@app.command("tail")
def tail(
    ctx: typer.Context,
    topic: Annotated[str, typer.Argument(help="Catalog name (requests, dlq, ...) or full name.")],
    from_beginning: Annotated[bool, typer.Option(help="Start at the oldest record.")] = False,
    limit: Annotated[int, typer.Option("--max", help="Stop after N records (0: never).")] = 0,
    idle: Annotated[
        float, typer.Option(help="Stop after S seconds without records (0: never).")
    ] = 0,
) -> None:
    """Print a topic's records decoded, one JSON object per line, with partition and offset."""
    settings = _settings(ctx)
    physical = _physical_topic(settings, topic)
    serde = make_serde(settings)
    reset = "earliest" if from_beginning else "latest"
    consumer = kafka.consumer(
        settings,
        f"dspex-tail-{uuid.uuid4().hex}",
        **{
            "auto.offset.reset": reset,
            "enable.partition.eof": False,
        },
    )
    consumer.subscribe([physical])
    try:
        _tail_loop(consumer, serde, physical, limit, idle)
    finally:
        consumer.close()


def _tail_loop(consumer: Any, serde: Serde, topic: str, limit: int, idle: float) -> None:
    seen, last = 0, time.monotonic()
    while not limit or seen < limit:
        msg = consumer.poll(0.5)
        if msg is None:
            if idle and time.monotonic() - last > idle:
                return
            continue
        if msg.error():
            err.print(f"[red]topic={topic}: {msg.error()}[/]")
            continue
        seen, last = seen + 1, time.monotonic()
        where = {"partition": msg.partition(), "offset": msg.offset(), "key": _text(msg.key())}
        try:
            decoded = serde.decode(msg.value(), topic=topic)
            line = {**where, "schema": decoded.schema_name, "value": decoded.record}
        except DSPexError as exc:
            line = {**where, "error": str(exc)}
        print(json.dumps(line, default=_jsonable), flush=True)


def _physical_topic(settings: Settings, topic: str) -> str:
    topics = Topics(settings.topics)
    try:
        return topics.name(topic)
    except KeyError:
        return topic


def _text(data: bytes | None) -> str | None:
    return None if data is None else data.decode("utf-8", errors="replace")


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# --- settings and up ------------------------------------------------------------------------


@app.command("settings")
def show_settings(ctx: typer.Context) -> None:
    """Print the effective settings (secrets masked)."""
    out.print_json(_settings(ctx).model_dump_json())


@app.command("up")
def up(
    ctx: typer.Context,
    detach: Annotated[bool, typer.Option(help="Return once ready, leaving the broker up.")] = False,
) -> None:
    """Start everything: the local broker (unless a cluster is configured), then the topics."""
    settings = _settings(ctx)
    started = _ensure_cluster(settings)
    reports = _create_topics(settings)
    out.print(_topics_table(reports))
    out.print(f"[green bold]DSPex is up[/] on {kafka.bootstrap_servers(settings)}")
    if detach:
        return
    out.print("Ctrl-C (or SIGTERM) stops it.")
    _wait_for_signal()
    if started is not None:
        LocalBroker(settings.local_broker).stop()
        out.print("local broker stopped")


def _ensure_cluster(settings: Settings) -> BrokerInfo | None:
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
    _print_broker(info)
    return info


def _wait_for_signal() -> None:
    stop = threading.Event()

    def _handler(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)
    while not stop.wait(1.0):
        pass


def main() -> None:
    """Console-script entry point: DSPex errors become one clear line and exit code 1."""
    try:
        app()
    except (DSPexError, SchemaError, schemas.SchemaContractError) as exc:
        err.print(f"[red]error:[/] {exc}")
        raise SystemExit(1) from None
