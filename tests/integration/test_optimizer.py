"""Optimizer jobs end to end on a real broker, with deterministic simulated LMs.

The router and a general-pool worker run as ``python -m dspex.agents`` processes
(:mod:`tests.integration.stack`) and one or two job runners (``python -m dspex.agents
jobs``, the optimizer pool's job consumers) are started here. The LMs are
``dspex/sim`` simulations (:mod:`dspex.agents.runtime.lms.simulations`): a "reverse the word" task
answered right only with demonstrations in the prompt, or only at temperature
<= 0.4, optionally slow. Evaluations really go through the router to the general
pool. A tail reads the output topics read-committed, so the tests count what
consumers see: one result per job, even when a runner is SIGKILLed mid-job, and
none from a zombie runner whose partition has a new owner. Run with ``-s`` to
see the printed figures.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from dspex.agents.jobs.txn import Completion
from dspex.agents.plumbing.messages import Consumed, Outgoing
from dspex.streams import kafka
from dspex.streams.client.client import AsyncClient, Result
from dspex.streams.client.jobs import JobProgress
from dspex.streams.ops.admin import TopicReport
from dspex.streams.settings import Settings, load_settings
from dspex.streams.topics import Topics
from tests.integration.stack import REPO, Stack, _live, agent_env
from tests.integration.tail import OpenTail, Tail
from tests.integration.test_end_to_end import (  # noqa: F401 - the fixture is used by name
    StartStack,
    start_stack,
)

WORDS = ["kafka", "stream", "topic", "broker", "offset", "record", "schema", "program"]
DATASET = [{"word": w, "answer": w[::-1]} for w in WORDS]
FEWSHOT = "dspex/sim?task=reverse&needs=demos"
LOWTEMP = "dspex/sim?task=reverse&max_temperature=0.4"
SESSION_TIMEOUT_S = 6.0


def sim_settings(
    settings: Settings, model: str, *, temperature: float = 0.0, max_poll_s: float = 300.0
) -> Settings:
    """The test's broker and prefix; the general and optimizer pools on one simulation."""
    return load_settings(
        kafka={"bootstrap_servers": settings.kafka.bootstrap_servers},
        topics={"prefix": settings.topics.prefix},
        lm={
            "backends": {"sim": {"model": model, "temperature": temperature}},
            "pool_variants": {"general": "sim", "optimizer": "sim"},
        },
        jobs={"max_poll_interval_s": max_poll_s, "eval_deadline_s": 90.0},
        reliability={"session_timeout_s": SESSION_TIMEOUT_S},
    )


class JobRunners:
    """``python -m dspex.agents jobs`` processes for one test."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.killed: set[str] = set()

    def start(self, count: int, timeout_s: float = 60.0) -> None:
        for n in range(1, count + 1):
            name = f"jobs-{n}"
            with (self.log_dir / f"{name}.log").open("wb") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "dspex.agents", "jobs"],
                    env=agent_env(self.settings),
                    cwd=REPO,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            _live.add(process)
            self.processes[name] = process
        self._wait_for_members(count, timeout_s)

    def _wait_for_members(self, count: int, timeout_s: float) -> None:
        admin = kafka.admin_client(self.settings)
        group = f"{self.settings.topics.prefix}jobs"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            (future,) = admin.describe_consumer_groups([group], request_timeout=5).values()
            try:
                described = future.result()
            except Exception:  # not known to the coordinator yet
                time.sleep(0.3)
                continue
            assigned = [m for m in described.members if m.assignment.topic_partitions]
            if described.state.name == "STABLE" and len(assigned) == count:
                return
            time.sleep(0.3)
        raise AssertionError(f"{count} job runner(s) not ready:\n{self.log_tails()}")

    def check_alive(self) -> None:
        dead = {
            n: p.returncode
            for n, p in self.processes.items()
            if p.poll() is not None and n not in self.killed
        }
        assert not dead, f"job runner(s) exited: {dead}\n{self.log_tails()}"

    def kill_worker(self, worker_id: str) -> str:
        """SIGKILL the runner whose worker id (``jobs-<host>-<rand>:<pid>``) is given."""
        pid = int(worker_id.rsplit(":", 1)[1])
        (name,) = [n for n, p in self.processes.items() if p.pid == pid]
        os.kill(pid, signal.SIGKILL)
        self.processes[name].wait(10)
        self.killed.add(name)
        return name

    def stop(self) -> dict[str, int]:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes = {}
        for name, process in self.processes.items():
            try:
                process.wait(45)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
            codes[name] = process.returncode
            _live.discard(process)
        return codes

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def log_tails(self, lines: int = 40) -> str:
        return "\n".join(
            f"--- {name} ---\n" + "\n".join(self.log(name).splitlines()[-lines:])
            for name in self.processes
        )


StartOptimizer = Callable[[Settings, int], tuple[Stack, JobRunners]]


@pytest.fixture
def start_optimizer(start_stack: StartStack, tmp_path: Path) -> Iterator[StartOptimizer]:  # noqa: F811
    """Factory: router + general worker + ``n`` job runners; runners must stop cleanly."""
    started: list[JobRunners] = []

    def start(settings: Settings, runners: int) -> tuple[Stack, JobRunners]:
        stack = start_stack(settings, ["general"])
        jobs = JobRunners(settings, tmp_path)
        started.append(jobs)
        jobs.start(runners)
        return stack, jobs

    yield start
    for jobs in started:
        codes = jobs.stop()
        unclean = {n: c for n, c in codes.items() if c != 0 and n not in jobs.killed}
        assert not unclean, (unclean, jobs.log_tails())


JOB_OUTPUTS = ["responses", "programs", "variables", "variables.history", "executions"]
JOB_OUTPUTS += ["routing", "jobs.status"]
"""The topics a job writes to (read committed, as every consumer of them reads)."""


def _finals(tail: Tail, job_id: str) -> list[dict[str, Any]]:
    return [r for r in tail.of("responses") if r["request_id"] == job_id and r["final"]]


async def test_bootstrap_few_shot_job_raises_the_metric_and_the_router_serves_the_new_version(
    settings: Settings, start_optimizer: StartOptimizer, tails: OpenTail
) -> None:
    settings = sim_settings(settings, FEWSHOT)
    start_optimizer(settings, 1)
    tail = tails(JOB_OUTPUTS, settings=settings)
    progress: list[JobProgress] = []
    async with AsyncClient(settings) as client:
        assert await client.publish_program("toy", "word -> answer") == 1
        result = await client.optimize(
            "toy",
            optimizer="BootstrapFewShot",
            dataset=DATASET,
            metric="exact_match",
            on_progress=progress.append,
            timeout_s=180,
        )
        print(f"\nBootstrapFewShot: exact_match {result.score_before} -> {result.score_after}")
        assert result.ok, result.error
        assert (result.score_before, result.score_after, result.program_version) == (0.0, 1.0, 2)
        answer = await client.submit("toy", {"word": "stream"}, cache=False)
    assert (answer.program_version, answer.outputs["answer"]) == (2, "maerts")
    assert {p.phase for p in progress} >= {"baseline", "compile", "search"}

    tail.wait(lambda t: any(r["version"] == 2 for r in t.of("programs")), 10, "version 2")
    (version,) = [r for r in tail.of("programs") if r["created_by"] == result.job_id]
    assert (version["version"], version["parent_version"]) == (2, 1)
    assert (version["created_by"], version["score"]) == (result.job_id, 1.0)
    assert json.loads(version["state_json"])["self"]["demos"]
    # the evaluations ran as requests on the general pool, tagged with the job id
    tail.wait(lambda t: any(r["program_version"] == 2 for r in t.of("executions")), 10, "exec")
    evaluations = [
        r for r in tail.of("executions") if r["metadata"].get("dspex-job") == result.job_id
    ]
    assert len(evaluations) == 2 * 4 and {r["pool"] for r in evaluations} == {"general"}
    served = [r for r in tail.of("executions") if r["program_id"] == "toy"]
    assert [r["program_version"] for r in served] == [2]


async def test_a_canary_job_splits_traffic_between_the_new_version_and_its_parent(
    settings: Settings, start_optimizer: StartOptimizer, tails: OpenTail
) -> None:
    settings = sim_settings(settings, FEWSHOT)
    start_optimizer(settings, 1)
    tail = tails(JOB_OUTPUTS, settings=settings)
    async with AsyncClient(settings) as client:
        assert await client.publish_program("toy", "word -> answer") == 1
        result = await client.optimize(
            "toy",
            optimizer="BootstrapFewShot",
            dataset=DATASET,
            metric="exact_match",
            canary_weight=0.5,
            timeout_s=180,
        )
        assert result.ok and result.program_version == 2, result.error
        tail.wait(lambda t: bool(t.of("routing")), 10, "the canary routing table")
        # the router follows the routing topic on its own consumer: without the table it
        # serves the latest version, so an answer from the parent shows the table applied
        probes, give_up = 1, time.monotonic() + 30
        while (await client.submit("toy", {"word": "probe"}, cache=False)).program_version != 1:
            assert time.monotonic() < give_up, "the router never served the canary's parent"
            probes += 1
        answers = await client.submit_many(
            [("toy", {"word": f"w{n}"}) for n in range(30)], cache=False
        )
    (table,) = tail.of("routing")
    variants = {v["name"]: (v["program_version"], v["weight"]) for v in table["variants"]}
    served = Counter(a.program_version for a in answers if isinstance(a, Result))
    print(
        f"\ncanary table {variants} (applied by probe {probes}): "
        f"30 requests served by versions {dict(served)}"
    )
    assert variants == {"v1": (1, 0.5), "v2": (2, 0.5)}
    assert result.job_id in table["reason"]
    assert sum(served.values()) == 30 and set(served) == {1, 2}  # P(one side only) ~ 2e-9


async def test_variable_search_publishes_the_better_temperature(
    settings: Settings,
    start_optimizer: StartOptimizer,
    tails: OpenTail,
    tmp_path: Path,
) -> None:
    settings = sim_settings(settings, LOWTEMP, temperature=0.8)
    start_optimizer(settings, 1)
    tail = tails(JOB_OUTPUTS, settings=settings)
    async with AsyncClient(settings) as client:
        await client.publish_program("toy", "word -> answer")
        result = await client.optimize(
            "toy",
            dataset=DATASET,
            metric="exact_match",
            search={"temperature": {"min": 0, "max": 1, "steps": 3}},
            timeout_s=180,
        )
    trials = {t["variables"]["temperature"]: t["score"] for t in result.outputs["trials"]}
    print(f"\ntemperature search: {trials}, before {result.score_before}")
    assert result.ok, result.error
    assert trials == {0.0: 1.0, 0.5: 0.0, 1.0: 0.0}
    assert (result.score_before, result.score_after) == (0.0, 1.0)
    assert result.variables == {"temperature": 0.0} and result.program_version is None

    tail.wait(lambda t: len(t.of("variables.history")) >= 1, 10, "variable history")
    for short in ("variables", "variables.history"):
        (update,) = tail.of(short)
        assert (update["name"], update["scope"], update["scope_ref"]) == (
            "temperature",
            "program",
            "toy",
        )
        assert (update["value_json"], update["version"]) == ("0.0", 1)
        assert (update["source"], update["updated_by"]) == ("optimizer", result.job_id)
    (key, _) = tail.records["variables"][0]
    assert key == b"program/toy/temperature"
    assert [r["version"] for r in tail.of("programs")] == [1]  # a search publishes no version

    # The same search from the CLI: 0.0 is now in force for the program, so the baseline
    # already scores 1.0, nothing is better, and nothing new is published.
    dataset = tmp_path / "toy.jsonl"
    dataset.write_text("\n".join(json.dumps(row) for row in DATASET))
    run = _dspex(
        settings,
        "optimize",
        "run",
        "toy",
        "--metric",
        "exact_match",
        "--follow",
        "--dataset",
        str(dataset),
        "--search",
        "temperature=0:1:3",
    )
    assert run.returncode == 0, run.stderr
    assert "score 1.0 -> 1.0; program version None; variables {}" in run.stdout
    job_id = run.stdout.split("job ", 1)[1].split()[0]
    status = _dspex(settings, "optimize", "status", job_id)
    assert status.returncode == 0 and json.loads(status.stdout)["status"] == "ok", status.stderr
    # the job's records and its status are one transaction, committed before the status
    # read ok: whatever it published is on the topics now
    tail.catch_up()
    assert len(tail.of("variables.history")) == 1


def _dspex(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**agent_env(settings), "COLUMNS": "250"}
    command = [sys.executable, "-m", "dspex.streams", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)


async def test_a_job_longer_than_max_poll_interval_completes_without_a_rebalance(
    settings: Settings, start_optimizer: StartOptimizer, tails: OpenTail
) -> None:
    max_poll_s = 8.0
    # every LM call takes 2.5 s: the compile alone (4 training examples) outlasts max.poll
    settings = sim_settings(settings, FEWSHOT + "&delay=2.5", max_poll_s=max_poll_s)
    _, runners = start_optimizer(settings, 1)
    started = time.monotonic()
    async with AsyncClient(settings) as client:
        await client.publish_program("toy", "word -> answer")
        result = await client.optimize(
            "toy",
            optimizer="BootstrapFewShot",
            dataset=DATASET,
            metric="exact_match",
            timeout_s=240,
        )
    took = time.monotonic() - started
    log = runners.log("jobs-1")
    revokes = log.count(" revoked group=") + log.count(" lost group=")
    print(f"\njob took {took:.1f}s with max.poll.interval {max_poll_s:g}s; revocations {revokes}")
    assert result.ok and result.score_after == 1.0, result.error
    assert took > max_poll_s  # the precondition of the test, by construction (sleeps)
    assert revokes == 0 and log.count(" assigned group=") == 1
    assert "job completed" in log
    runners.check_alive()


async def test_a_sigkilled_runners_job_completes_once_on_the_other_runner(
    settings: Settings, start_optimizer: StartOptimizer, tails: OpenTail
) -> None:
    settings = sim_settings(settings, FEWSHOT + "&delay=1.0")
    _, runners = start_optimizer(settings, 2)
    tail = tails(JOB_OUTPUTS, settings=settings)
    async with AsyncClient(settings) as client:
        await client.publish_program("toy", "word -> answer")
        job_id = await client.submit_job(
            "toy", optimizer="BootstrapFewShot", dataset=DATASET, metric="exact_match"
        )
        victim, killed_at = "", 0.0
        async for chunk in client.follow_job(job_id, timeout_s=240):
            progress = JobProgress.from_chunk(chunk) if not chunk.final else None
            if progress is not None and progress.phase == "compile" and not victim:
                victim = runners.kill_worker(str(progress.worker))
                killed_at = time.monotonic()
            if chunk.final:
                final = chunk
    recovered_s = time.monotonic() - killed_at
    assert victim, "the job never reached its compile phase"
    assert final.status == "ok" and final.outputs and final.outputs["program_version"] == 2
    # the survivor's records, status and job offset were one committed transaction, and
    # the victim is dead: read everything now on the topics, nothing can follow
    tail.catch_up()
    finals = _finals(tail, job_id)
    versions = [r for r in tail.of("programs") if r["created_by"] == job_id]
    statuses = [r for r in tail.of("jobs.status") if r["request_id"] == job_id]
    print(
        f"\nSIGKILL of {victim} mid-job: final responses {len(finals)}, program versions "
        f"{len(versions)}, status records {len(statuses)}, done {recovered_s:.1f}s after the kill"
    )
    assert (len(finals), len(versions), len(statuses)) == (1, 1, 1)
    survivor = next(n for n in runners.processes if n != victim)
    assert f"job completed job_id={job_id}" in runners.log(survivor)
    assert f"job completed job_id={job_id}" not in runners.log(victim)


async def test_cancelling_a_running_job_ends_it_cancelled_and_publishes_nothing(
    settings: Settings, start_optimizer: StartOptimizer, tails: OpenTail
) -> None:
    settings = sim_settings(settings, FEWSHOT + "&delay=1.0")
    _, runners = start_optimizer(settings, 1)
    tail = tails(JOB_OUTPUTS, settings=settings)
    async with AsyncClient(settings) as client:
        await client.publish_program("toy", "word -> answer")
        job_id = await client.submit_job(
            "toy", optimizer="BootstrapFewShot", dataset=DATASET, metric="exact_match"
        )
        cancelled = False
        async for chunk in client.follow_job(job_id, timeout_s=120):
            compiling = not chunk.final and JobProgress.from_chunk(chunk).phase == "compile"
            if compiling and not cancelled:
                await client.cancel_job(job_id, requested_by="tester", reason="changed my mind")
                cancelled = True
            if chunk.final:
                final = chunk
    assert final.status == "cancelled" and final.error is not None
    assert final.error["error_class"] == "Cancelled" and "tester" in final.error["message"]
    tail.catch_up()  # the cancellation committed with its records: all of them are read now
    assert not [r for r in tail.of("programs") if r["created_by"] == job_id]
    (status,) = [r for r in tail.of("jobs.status") if r["request_id"] == job_id]
    assert status["status"] == "cancelled"
    assert "job cancelled job_id=" in runners.log("jobs-1")


def test_a_zombie_runners_completion_is_refused_and_invisible(
    settings: Settings,
    create_topics: Callable[[], list[TopicReport]],
    tails: OpenTail,
) -> None:
    """The transaction is fenced by the consumer group: only the partition's owner completes.

    A successor joins with the zombie's ``group.instance.id``, which replaces the
    zombie's membership at once (in production the zombie is a runner paused past
    its session timeout). The zombie still holds the job message and its old group
    metadata when it tries to complete the job.
    """
    create_topics()
    topics = Topics(settings.topics)
    producer = kafka.producer(settings)
    producer.produce(topics.name("jobs"), b"job", b"job-1", partition=0)
    assert producer.flush(10) == 0
    group = f"{settings.topics.prefix}jobs"
    zombie, successor = (
        kafka.consumer(settings, group, **{"group.instance.id": "runner-a"}) for _ in range(2)
    )
    tail = tails(JOB_OUTPUTS, settings=settings)
    try:
        origin = Consumed.from_message(_first_message(zombie, topics.name("jobs")))
        _first_message(successor, topics.name("jobs"))  # it owns the partition now
        result = Outgoing(topics.name("jobs.status"), b"job-1", b"result")
        offsets = [TopicPartition(origin.topic, origin.partition, origin.offset + 1)]
        refused = Completion(settings, worker_id="zombie", group_id=group)
        refused.stage(origin, [result])
        with pytest.raises(KafkaException):
            refused.commit(zombie, offsets)
        tail.catch_up()  # past the aborted records and the abort marker
        assert tail.records["jobs.status"] == []  # aborted: read-committed sees nothing
        tp = TopicPartition(topics.name("jobs"), 0)
        assert successor.committed([tp], timeout=10)[0].offset < 0  # and no offset moved
        owner = Completion(settings, worker_id="successor", group_id=group)
        owner.stage(origin, [result])
        owner.commit(successor, offsets)
        tail.wait(lambda t: len(t.records["jobs.status"]) == 1, 10, "the owner's result")
        assert successor.committed([tp], timeout=10)[0].offset == origin.offset + 1
    finally:
        zombie.close()
        successor.close()


def _first_message(consumer: Consumer, topic: str, timeout_s: float = 30.0) -> Message:
    consumer.subscribe([topic])
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        message = consumer.poll(0.2)
        if message is not None and message.error() is None:
            return message
    raise AssertionError(f"no message from {topic} within {timeout_s}s")
