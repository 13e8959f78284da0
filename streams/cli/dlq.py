"""``dspex dlq list|replay``: look into the dead-letter topic and re-submit what was fixed.

Replay re-produces a dead letter's *original bytes* (key, value and headers, with a
``dspex-replay-of`` header naming the dead letter) to its original topic, so the
record goes through validation again exactly as first sent. It never edits a record.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from confluent_kafka import TopicPartition
from rich.table import Table

from dspex.streams import kafka
from dspex.streams.cli._app import app, err, out, settings_of
from dspex.streams.errors import DSPexError
from dspex.streams.reader import scan_to_end
from dspex.streams.serde import make_serde
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics

dlq_app = typer.Typer(help="The dead-letter topic: list and replay.")
app.add_typer(dlq_app, name="dlq")


@dataclass(frozen=True)
class Filter:
    """Which dead letters a command applies to (all given conditions must hold)."""

    stage: str | None = None
    error_class: str | None = None
    request_id: str | None = None
    component: str | None = None

    def matches(self, record: dict[str, Any]) -> bool:
        wanted = {
            "stage": self.stage,
            "error_class": self.error_class,
            "request_id": self.request_id,
            "component": self.component,
        }
        return all(v is None or record.get(k) == v for k, v in wanted.items())


StageOpt = Annotated[str | None, typer.Option(help="decode, validate, route, execute, ...")]
ClassOpt = Annotated[str | None, typer.Option("--error-class")]
RequestOpt = Annotated[str | None, typer.Option("--request-id")]
ComponentOpt = Annotated[str | None, typer.Option(help="router, worker, ...")]


@dlq_app.command("list")
def dlq_list(
    ctx: typer.Context,
    stage: StageOpt = None,
    error_class: ClassOpt = None,
    request_id: RequestOpt = None,
    component: ComponentOpt = None,
) -> None:
    """Dead letters still on the topic, oldest first, with where they came from and why."""
    table = Table("dlq offset", "failed", "stage", "error", "request id", "origin")
    wanted = Filter(stage, error_class, request_id, component)
    for where, record in read_dead_letters(settings_of(ctx), wanted):
        origin = (
            f"{record['original_topic']}[{record['original_partition']}]"
            f"@{record['original_offset']}"
        )
        table.add_row(
            where,
            record["failed_at"].isoformat(timespec="seconds"),
            record["stage"],
            f"{record['error_class']}: {record['error_message']}",
            record.get("request_id") or "-",
            origin,
        )
    out.print(table)


@dlq_app.command("replay")
def dlq_replay(
    ctx: typer.Context,
    stage: StageOpt = None,
    error_class: ClassOpt = None,
    request_id: RequestOpt = None,
    component: ComponentOpt = None,
    dry_run: Annotated[bool, typer.Option(help="Show what would be replayed.")] = False,
) -> None:
    """Re-produce the original bytes of the selected dead letters to their original topics."""
    settings = settings_of(ctx)
    wanted = Filter(stage, error_class, request_id, component)
    if wanted == Filter():
        raise typer.BadParameter("select what to replay (--stage, --error-class, --request-id...)")
    producer = kafka.producer(settings)
    replayed = 0
    for where, record in read_dead_letters(settings, wanted):
        if record.get("original_value_omitted"):
            try:
                record["original_value"] = fetch_original(settings, record)
            except DSPexError as exc:
                err.print(f"[yellow]skip {where}: {exc}[/]")
                continue
        if record.get("original_value") is None:
            err.print(f"[yellow]skip {where}: no original value (a tombstone)[/]")
            continue
        out.print(
            f"{'would replay' if dry_run else 'replay'} {where} -> {record['original_topic']}"
        )
        if not dry_run:
            headers = [(h["key"], h["value"]) for h in record.get("original_headers") or []]
            headers.append(("dspex-replay-of", where.encode()))
            producer.produce(
                record["original_topic"],
                key=record.get("original_key"),
                value=record["original_value"],
                headers=headers,
            )
            replayed += 1
    if producer.flush(30) != 0:
        raise DSPexError("some replayed records were not acknowledged within 30 s")
    out.print(f"{replayed} record(s) replayed" if not dry_run else "dry run: nothing produced")


def fetch_original(settings: Settings, record: Mapping[str, Any], timeout_s: float = 10.0) -> bytes:
    """The value a dead letter left out (too large to embed), read back from its topic."""
    topic, partition = record["original_topic"], record["original_partition"]
    offset = record["original_offset"]
    where = f"{topic}[{partition}]@{offset}"
    consumer = kafka.consumer(settings, f"dspex-dlq-{uuid.uuid4().hex}")
    try:
        consumer.assign([TopicPartition(topic, partition, offset)])
        give_up = time.monotonic() + timeout_s
        while time.monotonic() < give_up:
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            if msg.error() is not None:
                raise DSPexError(f"{where}: {msg.error()}")
            if msg.offset() != offset:
                break  # the original is gone: retention deleted it
            return bytes(msg.value() or b"")
    finally:
        consumer.close()
    raise DSPexError(
        f"the original value ({record.get('original_value_bytes')} bytes) was too large to "
        f"embed and {where} no longer holds it"
    )


def read_dead_letters(
    settings: Settings, wanted: Filter, timeout_s: float = 10.0
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(``dlq[partition]@offset``, record) for matching dead letters, read to the current end."""
    topic = Topics(settings.topics).name("dlq")
    serde = make_serde(settings)
    consumer = kafka.consumer(settings, f"dspex-dlq-{uuid.uuid4().hex}")
    try:
        # by position, not by the last record's offset: transaction markers (the workers
        # write dead letters in transactions) sit after the last record of a partition
        for msg in scan_to_end(consumer, topic, timeout_s):
            partition, offset = int(msg.partition() or 0), int(msg.offset() or 0)
            where = f"dlq[{partition}]@{offset}"
            record = _decode(serde, topic, msg.value() or b"", where)
            if record is not None and wanted.matches(record):
                yield where, record
    finally:
        consumer.close()


def _decode(serde: Any, topic: str, value: bytes, where: str) -> dict[str, Any] | None:
    try:
        record: dict[str, Any] = serde.decode(value, topic=topic, expect="DeadLetter").record
    except DSPexError as exc:
        err.print(f"[yellow]skip {where}: {exc}[/]")
        return None
    return record
