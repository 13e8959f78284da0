"""Two publishers finishing on one program at once take distinct version numbers (real broker).

The race is forced, not hoped for: each publisher's first ``build(latest)`` waits
on a barrier until the other has read the latest version too, so both have seen
the same number before either commits — what two job runners finishing together
do. Before the per-program fenced transaction (``dspex.agents.jobs.versions``)
both published latest + 1.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, Message, TopicPartition

from dspex.agents.jobs.versions import Built, Versioned, commit_versioned
from dspex.agents.plumbing.messages import Consumed, Outgoing
from dspex.streams import kafka
from dspex.streams.client.client import Client
from dspex.streams.client.pipelines import read_pipelines
from dspex.streams.client.programs import (
    program_version_record,
    publish_next_version,
    read_versions,
)
from dspex.streams.ops.admin import TopicReport
from dspex.streams.pipelines.spec import Pipeline
from dspex.streams.serde import make_serde
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics

PROGRAM = "qa"


class RacingBuilds:
    """``build(latest)`` for two publishers; the first call of each waits for the other's."""

    def __init__(self, parties: int = 2) -> None:
        self.barrier = threading.Barrier(parties, timeout=120)
        self.seen: dict[str, list[int]] = {}
        self._lock = threading.Lock()

    def build(self, who: str) -> Callable[[int], dict[str, Any]]:
        def build(latest: int) -> dict[str, Any]:
            with self._lock:
                first = who not in self.seen
                self.seen.setdefault(who, []).append(latest)
            if first:
                self.barrier.wait()  # both have read `latest` now
            return program_version_record(
                PROGRAM,
                "question -> answer",
                version=latest + 1,
                parent_version=latest or None,
                module_type="Predict",
                state_json=None,
                module_config_json="{}",
                tools=(),
                metric="exact",
                description=f"result of {who}",
                created_by=who,
            )

        return build


def _publish_first(settings: Settings) -> None:
    serde = make_serde(settings)
    topic = Topics(settings.topics).name("programs")
    assert publish_next_version(settings, serde, topic, PROGRAM, RacingBuilds(1).build("seed")) == 1


def _versions(settings: Settings) -> dict[int, str]:
    topic = Topics(settings.topics).name("programs")
    found = read_versions(settings, make_serde(settings), topic, program_id=PROGRAM)
    pairs = [(int(r["version"]), str(r["created_by"])) for r in found.get(PROGRAM, [])]
    assert len(pairs) == len(dict(pairs)), f"a version number taken twice: {pairs}"
    return dict(pairs)


def _race(work: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    errors: list[BaseException] = []

    def run(who: str, call: Callable[[], Any]) -> None:
        try:
            results[who] = call()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=item) for item in work.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not errors, errors
    return results


def test_two_job_completions_racing_on_one_program_publish_distinct_versions(
    settings: Settings, create_topics: Callable[[], list[TopicReport]]
) -> None:
    create_topics()
    _publish_first(settings)
    topics = Topics(settings.topics)
    serde = make_serde(settings)
    racing = RacingBuilds()
    runners = _two_job_runners(settings, topics)

    def complete(job: str) -> Built | None:
        consumer, origin = runners[job]
        build_record = racing.build(job)

        def build(latest: int) -> Built:
            record = build_record(latest)
            topic = topics.name("programs")
            value = serde.encode("ProgramVersion", record, topic=topic)
            out = [Outgoing(topic, PROGRAM.encode(), value)]
            return Built(out, int(record["version"]), f"version={record['version']}")

        return commit_versioned(
            settings,
            consumer,
            Versioned(PROGRAM, build),
            [],
            [TopicPartition(origin.topic, origin.partition, origin.offset + 1)],
            worker_id=job,
            timeout_s=settings.jobs.transaction_timeout_s,
        )

    started = time.monotonic()
    try:
        built = _race({job: functools.partial(complete, job) for job in runners})
        for job, (consumer, origin) in runners.items():
            tp = TopicPartition(origin.topic, origin.partition)
            assert consumer.committed([tp], timeout=10)[0].offset == origin.offset + 1, job
    finally:
        for consumer, _ in runners.values():
            consumer.close()
    elapsed = time.monotonic() - started
    versions = _versions(settings)
    print(
        f"\nracing job completions: latest seen per build {racing.seen}, "
        f"published {versions}, {elapsed:.2f}s"
    )
    assert all(seen[0] == 1 for seen in racing.seen.values())  # the race really happened
    assert {b.version for b in built.values()} == {2, 3}
    assert versions == {1: "seed", 2: _creator(built, 2), 3: _creator(built, 3)}


def test_two_programs_puts_racing_on_one_program_publish_distinct_versions(
    settings: Settings, create_topics: Callable[[], list[TopicReport]]
) -> None:
    create_topics()
    _publish_first(settings)
    serde = make_serde(settings)
    topic = Topics(settings.topics).name("programs")
    racing = RacingBuilds()
    put = functools.partial(publish_next_version, settings, serde, topic, PROGRAM)
    published = _race(
        {who: functools.partial(put, racing.build(who)) for who in ("put-a", "put-b")}
    )
    versions = _versions(settings)
    print(f"\nracing puts: latest seen per build {racing.seen}, published {versions}")
    assert all(seen[0] == 1 for seen in racing.seen.values())
    assert sorted(published.values()) == [2, 3]
    assert versions == {1: "seed", **{v: who for who, v in published.items()}}


def _two_job_runners(settings: Settings, topics: Topics) -> dict[str, tuple[Consumer, Consumed]]:
    """Two jobs on the jobs topic, each taken by a runner (a consumer group) of its own."""
    producer = kafka.producer(settings)
    for job in ("job-a", "job-b"):
        producer.produce(topics.name("jobs"), b"job", job.encode(), partition=0)
    assert producer.flush(10) == 0
    runners: dict[str, tuple[Consumer, Consumed]] = {}
    for n, job in enumerate(("job-a", "job-b")):
        consumer = kafka.consumer(settings, f"{settings.topics.prefix}jobs-{job}")
        runners[job] = (consumer, Consumed.from_message(_nth_message(consumer, topics, n)))
    return runners


def _creator(built: dict[str, Built | None], version: int) -> str:
    (who,) = [job for job, b in built.items() if b is not None and b.version == version]
    return who


def _nth_message(consumer: Consumer, topics: Topics, n: int, timeout_s: float = 30.0) -> Message:
    consumer.subscribe([topics.name("jobs")])
    deadline = time.monotonic() + timeout_s
    seen = 0
    while time.monotonic() < deadline:
        message = consumer.poll(0.2)
        if message is not None and message.error() is None:
            if seen == n:
                return message
            seen += 1
    raise AssertionError(f"no message {n} from jobs within {timeout_s}s")


def test_two_pipeline_job_completions_racing_on_one_pipeline_publish_distinct_versions(
    settings: Settings, create_topics: Callable[[], list[TopicReport]]
) -> None:
    """The same race for a pipeline job: its PipelineVersion is numbered inside a
    transaction fenced per pipeline (the one a ``pipelines put`` takes too)."""
    create_topics()
    pipeline = (
        Pipeline("raced", inputs="question")
        .stage("answer", signature="question -> answer", inputs={"question": "$input.question"})
        .output(answer="$stage.answer.answer")
    )
    with Client(settings) as client:
        assert client.pipelines.put(pipeline, created_by="seed").version == 1
    topics = Topics(settings.topics)
    serde = make_serde(settings)
    barrier, seen = threading.Barrier(2, timeout=120), {}
    runners = _two_job_runners(settings, topics)

    def complete(job: str) -> Built:
        consumer, origin = runners[job]

        def build(latest: int) -> Built:
            if job not in seen:
                seen[job] = latest
                barrier.wait()  # both have read the latest version now
            topic = topics.name("pipelines")
            record = pipeline.to_record(version=latest + 1, created_by=job)
            value = serde.encode("PipelineVersion", record, topic=topic)
            return Built([Outgoing(topic, b"raced", value)], latest + 1, job)

        return commit_versioned(
            settings,
            consumer,
            Versioned("pipeline:raced", build, pipeline_id="raced"),
            [],
            [TopicPartition(origin.topic, origin.partition, origin.offset + 1)],
            worker_id=job,
            timeout_s=settings.jobs.transaction_timeout_s,
        )

    try:
        built = _race({job: functools.partial(complete, job) for job in runners})
    finally:
        for consumer, _ in runners.values():
            consumer.close()
    found = read_pipelines(settings, serde, topics.name("pipelines"), pipeline_id="raced")
    versions = {p.version: p.created_by for p in found["raced"]}
    print(f"\nracing pipeline jobs: first latest seen {seen}, published {versions}")
    assert seen == {"job-a": 1, "job-b": 1}  # the race really happened
    assert sorted(b.version for b in built.values()) == [2, 3]
    assert versions == {1: "seed", **{b.version: job for job, b in built.items()}}
