"""Optimizer job checkpoints: a restarted job resumes where its dead runner got to.

A job's progress — the baseline evaluation, the compiled program's DSPy JSON
state (instructions already checked, see ``Optimization._earned_instructions``)
and each search trial done — is written after every step as one JobCheckpoint
record on the compacted ``jobs.checkpoints`` topic, keyed by job id. When a
runner dies mid-job, the partition's next owner restarts the job
(:mod:`dspex.agents.jobs.jobs`); :meth:`Checkpoint.load` gives it the progress so
:class:`~dspex.agents.jobs.optimize.Optimization` skips what was done.

A checkpoint is valid only for the same work: its ``fingerprint`` hashes the
job record, the base program version and state, and the train/validation split.
A different one (the job named no version and the program moved on meanwhile) is
ignored and the job starts over. Everything is JSON: nothing is unpickled.
Writes go through the job's plain idempotent producer and are flushed before the
step's progress chunk, so a progress chunk seen by a client means its checkpoint
is on the broker. Checkpoints are not part of the job's result transaction; they
expire with the topic's retention (a week).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import dspy

from dspex.agents.plumbing.publisher import Producer
from dspex.agents.runtime.programs import ProgramSpec
from dspex.schemas import records
from dspex.schemas.times import now
from dspex.streams.errors import DSPexError
from dspex.streams.reader import latest_by_key, read_to_end
from dspex.streams.serde import Serde
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics

logger = logging.getLogger(__name__)

SCHEMA = "JobCheckpoint"


def fingerprint(
    record: Mapping[str, Any],
    base: ProgramSpec,
    train: Sequence[dspy.Example],
    val: Sequence[dspy.Example],
) -> str:
    """What a job's progress depends on, hashed: the job, its base program, its examples."""
    examples = [[dict(e.items()) for e in part] for part in (train, val)]
    work = [dict(record), base.version, base.state_json, examples]
    text = json.dumps(work, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class Checkpoint:
    """One job's checkpoint: ``load`` what an earlier attempt saved, ``save`` each step."""

    def __init__(
        self,
        settings: Settings,
        serde: Serde,
        producer: Producer,
        *,
        job_id: str,
        fingerprint: str,
        worker_id: str,
    ) -> None:
        self._settings = settings
        self._serde = serde
        self._producer = producer
        self._topic = Topics(settings.topics).name("jobs.checkpoints")
        self.job_id = job_id
        self.fingerprint = fingerprint
        self._worker_id = worker_id

    def load(self) -> dict[str, Any] | None:
        """The progress saved for this very work, or None (none, or saved for other work)."""
        found = read_to_end(self._settings, self._serde, self._topic, SCHEMA, key=self.job_id)
        saved = latest_by_key(found).get(self.job_id)
        if saved is None:
            return None
        if saved["fingerprint"] != self.fingerprint:
            logger.info("checkpoint ignored (other work) job_id=%s", self.job_id)
            return None
        try:
            state = json.loads(saved["state_json"])
        except ValueError:
            logger.warning("checkpoint ignored (not JSON) job_id=%s", self.job_id)
            return None
        return state if isinstance(state, dict) else None

    def save(self, phase: str, state: Mapping[str, Any]) -> None:
        """Write the progress and wait until the broker has it (a lost write costs a redo)."""
        record = records.job_checkpoint(
            job_id=self.job_id,
            fingerprint=self.fingerprint,
            phase=phase,
            state_json=json.dumps(state, allow_nan=False),
            written_at=now(),
            written_by=self._worker_id,
        )
        try:
            value = self._serde.encode(SCHEMA, record, topic=self._topic)
            self._producer.produce(self._topic, value, self.job_id.encode())
            left = self._producer.flush(10.0)
        except (DSPexError, BufferError, ValueError) as exc:
            logger.warning("checkpoint not written job_id=%s phase=%s: %s", self.job_id, phase, exc)
            return
        if left:
            logger.warning("checkpoint not confirmed job_id=%s phase=%s", self.job_id, phase)
