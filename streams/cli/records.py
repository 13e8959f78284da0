"""``dspex tail``: records of any topic, decoded, for people at a terminal."""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime
from typing import Annotated, Any

import typer
from confluent_kafka import KafkaError, KafkaException

from dspex.streams import kafka
from dspex.streams.cli._app import app, err, settings_of
from dspex.streams.errors import BrokerUnavailable, ConfigError, DSPexError
from dspex.streams.serde import Serde, make_serde
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics


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
    settings = settings_of(ctx)
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
    try:
        _require_topic(consumer, physical)
        consumer.subscribe([physical])
        _tail_loop(consumer, serde, physical, limit, idle)
    finally:
        consumer.close()


def _require_topic(consumer: Any, topic: str) -> None:
    """A ConfigError (exit 1, one line) when ``topic`` does not exist on the cluster."""
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
    except KafkaException as exc:
        raise BrokerUnavailable(f"topic={topic}: no metadata: {exc.args[0].str()}") from exc
    if metadata is None or metadata.error is not None:
        raise ConfigError(f"topic {topic} does not exist (see `dspex topics list`)")


def _tail_loop(consumer: Any, serde: Serde, topic: str, limit: int, idle: float) -> None:
    seen, last = 0, time.monotonic()
    while not limit or seen < limit:
        msg = consumer.poll(0.5)
        if msg is None:
            if idle and time.monotonic() - last > idle:
                return
            continue
        if msg.error():
            if msg.error().code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise ConfigError(f"topic {topic} does not exist (see `dspex topics list`)")
            err.print(f"topic={topic}: {msg.error().str()}", soft_wrap=True, highlight=False)
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
