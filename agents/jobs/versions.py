"""Picking a program's next version number safely when several job runners finish at once.

Two optimizer jobs on one program, finishing on two runners, used to read the
latest version (N) and both publish N + 1. Kafka has no compare-and-set, so the
number is picked *inside* a transaction whose ``transactional.id`` belongs to the
program (:func:`dspex.streams.client.programs.version_txn_id`), not to the runner:

1. ``init_transactions`` with that id bumps its producer epoch: any other process
   holding the same id (another runner completing a job on this program) is
   fenced — its open transaction is aborted and its commit fails. The call returns
   only once an earlier transaction of that id is fully committed or aborted, so
   its markers are on the programs partition.
2. Re-read the programs topic (read-committed) for the program's latest version,
   and build the job's records with latest + 1.
3. Produce them and the job's consumer offset in that transaction (as
   :class:`~dspex.agents.jobs.txn.Completion` does: the offset commit is still
   fenced by the consumer group, KIP-447) and commit.

A runner fenced between 1 and 3 sees a fatal producer error, waits a random
moment (so two runners do not keep fencing each other) and starts again at 1
with a fresh producer: by then the winner's version is committed and visible, so
the loser takes the next number. The same id guards ``publish_program`` in the
client, so a program put by hand and a job result cannot collide either.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaException

from dspex.agents.jobs.txn import Completion
from dspex.agents.plumbing.messages import Consumed, Outgoing
from dspex.streams.client.programs import latest_version, version_txn_id
from dspex.streams.serde import make_serde
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics

logger = logging.getLogger(__name__)

ATTEMPTS = 8
BACKOFF_S = 0.5


@dataclass(frozen=True)
class Built:
    """A job's records for one version number, and the line the runner logs."""

    records: list[Outgoing]
    version: int
    summary: str


@dataclass(frozen=True)
class Versioned:
    """A result that becomes ``program_id``'s next version: ``build(latest)`` gives its records."""

    program_id: str
    build: Callable[[int], Built]


class VersionedCompletion:
    """Completes a job whose result is a new program version (see the module doc)."""

    def __init__(self, settings: Settings, *, worker_id: str, group_id: str) -> None:
        self._settings = settings
        self._worker_id = worker_id
        self._group_id = group_id
        self._serde = make_serde(settings)
        self._topic = Topics(settings.topics).name("programs")

    def commit(
        self,
        consumer: Consumer,
        origin: Consumed,
        versioned: Versioned,
        owns: Callable[[], bool],
    ) -> Built | None:
        """Publish the result under the next free version; None when it could not be done."""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                built = self._attempt(consumer, origin, versioned, owns)
            except KafkaException as exc:  # fenced by a racing completion on this program
                logger.info(
                    "version commit fenced program_id=%s attempt=%d worker_id=%s: %s",
                    versioned.program_id,
                    attempt,
                    self._worker_id,
                    exc,
                )
                time.sleep(random.uniform(0, BACKOFF_S * attempt))  # noqa: S311 - jitter
                continue
            if built is not None or not owns():
                return built
        return None

    def _attempt(
        self,
        consumer: Consumer,
        origin: Consumed,
        versioned: Versioned,
        owns: Callable[[], bool],
    ) -> Built | None:
        completion = Completion(
            self._settings,
            worker_id=self._worker_id,
            group_id=self._group_id,
            transactional_id=version_txn_id(self._settings, versioned.program_id),
        )
        latest = latest_version(self._settings, self._serde, self._topic, versioned.program_id)
        built = versioned.build(latest)
        return built if completion.commit(consumer, origin, built.records, owns) else None
