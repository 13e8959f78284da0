"""The consumer loop on consumer errors: a fatal one renews the consumer, others are logged."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import cast
from unittest import mock

import pytest
from confluent_kafka import Consumer, KafkaError, Message

from dspex.agents.plumbing.loop import MAX_RENEWALS, ConsumerLoop, LoopConfig
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


FENCED = "Static consumer fenced by other consumer with same group.instance.id"


@pytest.mark.parametrize("flagged", [True, False])
def test_a_fatal_consumer_error_marks_the_consumer_for_renewal(flagged: bool) -> None:
    """A fenced static member never fetches again: the loop must replace its consumer.
    consume() hands the error over as code _FATAL without the fatal flag (seen live)."""
    consumer = loop()
    consumer._dispatch(
        cast(Message, ErrorMessage(KafkaError(KafkaError._FATAL, FENCED, fatal=flagged)))
    )
    assert consumer._broken is not None and consumer._fatal is None


async def test_a_loop_fenced_again_and_again_ends_with_a_named_error() -> None:
    consumer = loop()
    closed: list[object] = []
    consumer._loop = asyncio.get_running_loop()
    consumer._thread = ThreadPoolExecutor(1)
    consumer._consumer = cast(Consumer, FakeConsumer(closed))
    consumer._subscribe = lambda: cast(Consumer, FakeConsumer(closed))  # type: ignore[method-assign]
    error = KafkaError(KafkaError._FATAL, FENCED)
    with mock.patch("dspex.agents.plumbing.loop.asyncio.sleep", _no_sleep):
        for _ in range(MAX_RENEWALS):
            await consumer._renew(error)
        assert consumer._fatal is None and consumer.renewals == MAX_RENEWALS
        assert len(closed) == MAX_RENEWALS  # each failed handle closed once
        await consumer._renew(error)
    assert isinstance(consumer._fatal, BrokerUnavailable)
    assert f"group=g: fatal consumer error again after {MAX_RENEWALS}" in str(consumer._fatal)
    consumer._thread.shutdown()


class FakeConsumer:
    def __init__(self, closed: list[object]) -> None:
        self._closed = closed

    def close(self) -> None:
        self._closed.append(self)


async def _no_sleep(_: float) -> None:
    return None


def test_a_transient_consumer_error_keeps_the_loop_running() -> None:
    consumer = loop()
    refused = KafkaError(KafkaError._TRANSPORT, "Connection refused")
    consumer._dispatch(cast(Message, ErrorMessage(refused)))
    assert consumer._fatal is None
