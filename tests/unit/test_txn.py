"""The job runner's transactional committer: what it publishes with which offsets (no broker)."""

from __future__ import annotations

import threading
from typing import Any, cast

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from dspex.agents.jobs.txn import Completion
from dspex.agents.plumbing.messages import Consumed, Outgoing


class FakeTransactions:
    """A transactional producer that records each transaction; ``refuse`` fails the next one."""

    def __init__(self) -> None:
        self.transactions: list[tuple[list[str], list[tuple[str, int, int]]]] = []
        self.aborted = 0
        self.refuse: KafkaError | None = None
        self._open: list[str] = []

    def begin_transaction(self) -> None:
        self._open = []

    def produce(self, topic: str, value: bytes, key: bytes | None) -> None:
        self._open.append(value.decode())

    def send_offsets_to_transaction(
        self, offsets: list[TopicPartition], metadata: object, timeout: float
    ) -> None:
        if self.refuse is not None:
            error, self.refuse = self.refuse, None
            raise KafkaException(error)
        self.transactions.append((self._open, [(p.topic, p.partition, p.offset) for p in offsets]))

    def commit_transaction(self, timeout: float) -> None:
        return None

    def abort_transaction(self, timeout: float) -> None:
        self.aborted += 1


class FakeConsumer:
    def consumer_group_metadata(self) -> object:
        return object()


def completion() -> tuple[Completion, FakeTransactions]:
    done = Completion.__new__(Completion)
    producer = FakeTransactions()
    done._producer = cast(Any, producer)
    done._timeout_s = 5.0
    done._worker_id = "w"
    done._lock = threading.Lock()
    done._staged = {}
    return done, producer


def staged(done: Completion, offset: int, partition: int = 0) -> None:
    origin = Consumed("jobs", partition, offset, b"k", b"v")
    done.stage(origin, [Outgoing("out", b"k", f"{partition}@{offset}".encode())])


def test_a_commit_publishes_what_is_staged_below_its_offsets_only() -> None:
    done, producer = completion()
    for offset in (3, 5):
        staged(done, offset)
    consumer = cast(Consumer, FakeConsumer())
    done.commit(consumer, [TopicPartition("jobs", 0, 4)])
    done.commit(consumer, [TopicPartition("jobs", 0, 6)])
    assert producer.transactions == [
        (["0@3"], [("jobs", 0, 4)]),
        (["0@5"], [("jobs", 0, 6)]),
    ]


def test_a_refused_transaction_is_aborted_and_its_records_published_by_the_next() -> None:
    done, producer = completion()
    staged(done, 3)
    producer.refuse = KafkaError(KafkaError._FENCED, "fenced", retriable=True)
    consumer = cast(Consumer, FakeConsumer())
    with pytest.raises(KafkaException):
        done.commit(consumer, [TopicPartition("jobs", 0, 4)])
    assert producer.aborted == 1 and producer.transactions == []
    done.commit(consumer, [TopicPartition("jobs", 0, 4)])
    assert producer.transactions == [(["0@3"], [("jobs", 0, 4)])]


def test_records_of_a_partition_that_moved_are_never_published() -> None:
    done, producer = completion()
    staged(done, 3, partition=0)
    staged(done, 7, partition=1)
    staged(done, 8, partition=1)
    done.forget({("jobs", 0)})  # revoked
    done.discard(("jobs", 1), 7)  # finished after its partition moved
    done.commit(cast(Consumer, FakeConsumer()), [TopicPartition("jobs", p, 9) for p in (0, 1)])
    ((records, _),) = producer.transactions
    assert records == ["1@8"]
