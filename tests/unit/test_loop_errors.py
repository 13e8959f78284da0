"""The consumer loop on consumer errors: a fatal one stops the loop, others are logged."""

from __future__ import annotations

from typing import cast

from confluent_kafka import KafkaError, Message

from dspex.agents.plumbing.loop import ConsumerLoop, LoopConfig
from dspex.streams.errors import BrokerUnavailable
from dspex.streams.settings import load_settings


class ErrorMessage:
    """What consume() returns for a consumer error: a message that is only an error."""

    def __init__(self, error: KafkaError) -> None:
        self._error = error

    def error(self) -> KafkaError:
        return self._error


async def _never(_: object) -> None:
    raise AssertionError("an error message must not reach the handler")


def loop() -> ConsumerLoop:
    config = LoopConfig(topics=("t",), group_id="g", client_id="c", limit=4, instance_id="1")
    return ConsumerLoop(load_settings(kafka={"bootstrap_servers": "127.0.0.1:1"}), config, _never)


def test_a_fatal_consumer_error_stops_the_loop_with_a_named_error() -> None:
    """A static member fenced after its coordinator moved never fetches again: the loop
    must end (and the process exit, for its supervisor to start a fresh one)."""
    consumer = loop()
    fenced = KafkaError(
        KafkaError._FATAL, "Static consumer fenced by other consumer with same group.instance.id",
        fatal=True,
    )  # fmt: skip
    consumer._dispatch(cast(Message, ErrorMessage(fenced)))
    assert isinstance(consumer._fatal, BrokerUnavailable)
    assert "group=g: fatal consumer error: Static consumer fenced" in str(consumer._fatal)


def test_a_transient_consumer_error_keeps_the_loop_running() -> None:
    consumer = loop()
    refused = KafkaError(KafkaError._TRANSPORT, "Connection refused")
    consumer._dispatch(cast(Message, ErrorMessage(refused)))
    assert consumer._fatal is None
