"""A three-broker KRaft cluster under the DSPex request path: ``kill -9`` of a broker, and back.

The cluster is this module's own (not the session's single broker): three local
nodes started by :class:`LocalCluster`, each a broker and a voter of a three-node
controller quorum, with ``-Xmx256m`` each (about 310 MB resident measured; the
single-node test broker gets 768 MB) so that three JVMs, the agents and the test
fit a two-core CI machine. Topics are created as ``dspex topics create`` does:
3 replicas, ``min.insync.replicas=2``.

Under steady load (a router and a general-pool worker, 20 requests/s, a 30 ms simulated
LM) one broker is SIGKILLed: one that leads ``requests`` partitions and the consumer
groups' coordinator, or the active controller. The test plays ``dspex up``'s supervisor:
an agent that exits is started again. Counted: sent, answered at the client, lost,
answered twice at the client, final Responses duplicated or contradicting (same request,
other status) on the topic. Measured (run with ``-s``): seconds from the kill to the
first answer of a request sent after it, per ``requests`` partition, and the longest
pause in answers. The broker is restarted under load and must rejoin the in-sync
replicas of every partition it holds. A rolling restart (each node in turn: SIGTERM,
start, back in every ISR) under the same load must keep the same counts.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient, ConfigResource

from dspex.streams import kafka
from dspex.streams.client.client import AsyncClient, Program, Result
from dspex.streams.errors import DSPexError
from dspex.streams.ops import _kraft
from dspex.streams.ops.admin import ensure_topics
from dspex.streams.ops.broker import BrokerInfo
from dspex.streams.ops.cluster import LocalCluster
from dspex.streams.settings import LocalBrokerSettings, Settings, load_settings
from dspex.streams.topics import CATALOG, Topics
from tests.integration.stack import Stack
from tests.integration.tail import Tail

INLINE = Program.inline("question -> answer")
SIM_30MS = "dspex/sim?task=echo&delay=0.03"
RATE, KILL_AT_S, RESTART_AFTER_S, TAIL_S = 20, 5.0, 15.0, 3.0
# Three JVMs restarting under load on two busy cores: a kill test took over 300 s
# (the suite's default) with a load average of 24 beside it.
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    settings = LocalBrokerSettings(
        nodes=3,
        port=_kraft.free_port(),
        controller_port=_kraft.free_port(),
        data_dir=tmp_path_factory.mktemp("cluster"),
        heap="256m",
        start_timeout_s=180,
    )
    cluster = LocalCluster(settings)
    try:
        started = time.monotonic()
        info = cluster.start()
        print(f"\n3-node cluster at {info.bootstrap_servers} in {time.monotonic() - started:.1f}s")
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def settings(cluster: LocalCluster) -> Settings:
    """This module's cluster (by its three addresses), a fresh prefix, a 30 ms simulated LM."""
    info = cluster.status()
    assert info is not None and not info.down, info
    return load_settings(
        kafka={"bootstrap_servers": info.bootstrap_servers},
        topics={"prefix": f"c{uuid.uuid4().hex[:10]}."},
        lm={"backends": {"sim": {"model": SIM_30MS}}, "pool_variants": {"general": "sim"}},
    )


def dspex(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "dspex.streams", *args]
    env = {**os.environ, "COLUMNS": "250", **env}
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_broker_status_lists_every_node_and_the_controller(cluster: LocalCluster) -> None:
    run = dspex("broker", "status", env={"DSPEX_LOCAL_BROKER__DATA_DIR": str(cluster.data_dir)})
    assert run.returncode == 0, run.stderr
    assert "3 nodes" in run.stdout
    assert f"active controller: node {cluster.controller()}" in run.stdout
    for n in (1, 2, 3):
        assert f"node {n}: 127.0.0.1:" in run.stdout


def test_up_finds_the_running_cluster_and_replicates_its_topics(cluster: LocalCluster) -> None:
    """``dspex up`` with no cluster configured uses the local one (all three addresses)."""
    prefix = f"u{uuid.uuid4().hex[:8]}."
    env = {
        **os.environ,
        "DSPEX_LOCAL_BROKER__DATA_DIR": str(cluster.data_dir),
        "DSPEX_LOCAL_BROKER__NODES": "3",
        "DSPEX_TOPICS__PREFIX": prefix,
        "COLUMNS": "250",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    argv = [sys.executable, "-m", "dspex.streams", "up", "--no-agents"]
    up = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert up.stdout is not None
    lines = []
    for raw in up.stdout:
        lines.append(raw.decode(errors="replace"))
        if "DSPex is up" in lines[-1]:
            break
    up.send_signal(signal.SIGTERM)
    output = "".join(lines) + up.communicate(timeout=60)[0].decode(errors="replace")
    info = cluster.status()
    assert up.returncode == 0, output
    assert info is not None and f"DSPex is up on {info.bootstrap_servers}" in output
    assert not info.down  # it found the cluster running: it neither started nor stopped it
    replicas = {
        len(p.replicas)
        for name, meta in AdminClient({"bootstrap.servers": info.bootstrap_servers})
        .list_topics(timeout=10)
        .topics.items()
        if name.startswith(prefix)
        for p in meta.partitions.values()
    }
    assert replicas == {3}, output


def test_topics_get_three_replicas_and_two_in_sync(settings: Settings) -> None:
    """``dspex topics create`` against the three addresses, as an operator runs it."""
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": str(settings.kafka.bootstrap_servers),
        "DSPEX_TOPICS__PREFIX": settings.topics.prefix,
    }
    first = dspex("topics", "create", env=env)
    assert first.returncode == 0, first.stderr
    admin = kafka.admin_client(settings)
    catalog = Topics(settings.topics).all()
    again = ensure_topics(admin, catalog, settings=settings.topics)
    assert [(r.status, r.replicas, r.differences) for r in again] == [("ok", 3, [])] * len(CATALOG)
    live = admin.list_topics(timeout=10).topics
    for name, _ in catalog:
        assert {len(p.replicas) for p in live[name].partitions.values()} == {3}, name
    # spread: every broker leads some partition of a 6-partition topic
    assert len({p.leader for p in live[catalog[0][0]].partitions.values()}) == 3
    resources = [ConfigResource(ConfigResource.Type.TOPIC, name) for name, _ in catalog]
    for resource, future in admin.describe_configs(resources).items():
        assert future.result(timeout=30)["min.insync.replicas"].value == "2", resource.name


class _Run:
    """What one load run saw: outcomes, answer times, when the fault began and ended."""

    def __init__(self) -> None:
        self.outcomes: list[tuple[str, Result | DSPexError, float]] = []
        self.answered_at: dict[str, float] = {}
        self.sent_at: dict[str, float] = {}
        self.killed_at = self.restarted_at = 0.0
        self.victim, self.victim_exit, self.rejoined_s = 0, 0, 0.0
        self.led: list[int] = []  # requests partitions the victim led
        self.finals: list[dict[str, Any]] = []
        self.placed: dict[str, int] = {}  # request id -> requests partition
        self.restarts: dict[str, list[int]] = {}  # agent -> exit codes it was restarted after

    def counts(self) -> dict[str, int]:
        """sent, answered, lost, wrong, twice at the client, duplicated and contradicting
        final Responses on the topic."""
        results = [r for _, r, _ in self.outcomes if isinstance(r, Result)]
        statuses: dict[str, set[str]] = defaultdict(set)
        for final in self.finals:
            statuses[final["request_id"]].add(final["status"])
        finals = Counter(f["request_id"] for f in self.finals)
        return {
            "sent": len(self.outcomes),
            "answered": len(results),
            "lost": len(self.outcomes) - len(results),
            "wrong": sum(
                1
                for q, r, _ in self.outcomes
                if isinstance(r, Result) and r.outputs != {"answer": q}
            ),
            "twice at the client": len(results) - len({r.request_id for r in results}),
            "duplicated on the topic": sum(n - 1 for n in finals.values()),
            "contradicting on the topic": sum(1 for s in statuses.values() if len(s) > 1),
        }

    def assert_nothing_lost_or_doubled(self) -> None:
        counts = self.counts()
        bad = ("lost", "wrong", "twice at the client", "contradicting on the topic")
        assert {k: counts[k] for k in bad} == dict.fromkeys(bad, 0), counts
        assert counts["answered"] == counts["sent"], counts


Fault = Callable[[_Run], Coroutine[Any, Any, None]]


async def _under_load(
    cluster: LocalCluster, settings: Settings, tmp_path: Path, fault: Fault
) -> _Run:
    """A router and a general worker on the cluster, ``RATE`` requests/s from before
    ``fault`` starts until ``TAIL_S`` after it ends; then every answer and final Response
    read (the agents committed all they consumed, so nothing more is redone)."""
    # no admin handle kept across the fault (see _topic_metadata)
    ensure_topics(
        kafka.admin_client(settings), Topics(settings.topics).all(), settings=settings.topics
    )
    stack = Stack(settings, ["general"], tmp_path)
    tail = Tail(settings, ["requests", "responses"])
    run = _Run()
    try:
        stack.start(ready_timeout_s=120)
        supervising = asyncio.create_task(_supervise(stack))
        try:
            async with AsyncClient(settings) as client:
                run.outcomes = await _send(client, run, fault)
        finally:
            supervising.cancel()
        run.restarts = stack.restarts
        total = len(run.outcomes)
        tail.wait(lambda t: len({r["request_id"] for r in t.of("responses")}) >= total, 60, "all")
        stack.wait_idle(120)
        tail.catch_up(60)
        run.placed = _partitions(tail, "requests")
        run.finals = [r for r in tail.of("responses") if r["final"]]
    finally:
        stack.stop()
        tail.close()
        cluster.start()  # every node back for the next test, whatever happened here
    unclean = {n: c for n, c in stack.exit_codes.items() if c != 0}
    assert not stack.killed and not unclean, (unclean, stack.log_tails())
    return run


async def _supervise(stack: Stack) -> None:
    """The supervisor's part (``dspex up``): an agent that exits is started again.

    An agent whose consumer is fenced for good (a static member after its group
    coordinator's broker died) exits 1 so that this happens.
    """
    while True:
        await asyncio.to_thread(stack.restart_exited)
        await asyncio.sleep(0.5)


async def _send(
    client: AsyncClient, run: _Run, fault: Fault
) -> list[tuple[str, Result | DSPexError, float]]:
    async def one(question: str) -> tuple[str, Result | DSPexError, float]:
        sent_at = time.monotonic()
        try:
            answer = await client.submit(
                INLINE, {"question": question}, deadline_s=180, cache=False
            )
        except DSPexError as exc:
            return question, exc, sent_at
        run.answered_at[answer.request_id] = time.monotonic()
        run.sent_at[answer.request_id] = sent_at
        return question, answer, sent_at

    faulting = asyncio.create_task(fault(run))
    tasks, start, ended = [], time.monotonic(), 0.0
    tick = 0
    while not ended or time.monotonic() - ended < TAIL_S:
        tasks.append(asyncio.create_task(one(f"cluster {tick} {uuid.uuid4().hex[:6]}")))
        tick += 1
        if not ended and faulting.done():
            faulting.result()  # a failed fault fails the test here
            ended = time.monotonic()
        await asyncio.sleep(max(0.0, start + tick / RATE - time.monotonic()))
    return list(await asyncio.gather(*tasks))


# `make test-soak`, not `make test`: in 3 runs on 2026-12-07 its test process once died
# in librdkafka (assertion in rd_kafka_enq_once_del_source_return; admin handles are
# short-lived since) and its tail twice stopped reading responses after the kill
# (librdkafka issue 5153; the tail has a StallGuard since, and both kills passed).
# Until more runs back that it does not gate CI; the rolling restart stays in `make test`.
@pytest.mark.soak
@pytest.mark.parametrize("role", ["leader", "controller"])
async def test_kill_9_of_a_broker_under_load_loses_nothing(
    cluster: LocalCluster, settings: Settings, tmp_path: Path, role: str
) -> None:
    """SIGKILL one broker ``KILL_AT_S`` into the load, restart it ``RESTART_AFTER_S`` later
    (``cluster.start`` starts only the missing node), wait until it is in every ISR again."""
    requests = Topics(settings.topics).name("requests")

    async def kill_and_restart(run: _Run) -> None:
        await asyncio.sleep(KILL_AT_S)
        run.victim, run.led = _victim(cluster, settings, requests, role)
        pid = next(n.pid for n in _running(cluster) if n.node_id == run.victim)
        os.kill(pid, signal.SIGKILL)
        run.killed_at = time.monotonic()
        run.victim_exit = await asyncio.to_thread(_reap, pid)
        await asyncio.sleep(max(0.0, run.killed_at + RESTART_AFTER_S - time.monotonic()))
        run.restarted_at = time.monotonic()
        await asyncio.to_thread(cluster.start)
        prefix = settings.topics.prefix
        run.rejoined_s = await asyncio.to_thread(
            _wait_in_sync, settings, prefix, run.victim, run.restarted_at
        )

    run = await _under_load(cluster, settings, tmp_path, kill_and_restart)
    recovery = _first_answer_after(run, run.placed)
    answers_after = sorted(at for at in run.answered_at.values() if at > run.killed_at)
    pause = max(b - a for a, b in zip([run.killed_at, *answers_after], answers_after, strict=False))
    print(
        f"\nkill -9 of broker node {run.victim} ({role}; it led requests partitions {run.led}) "
        f"at {RATE}/s: {run.counts()}; seconds from the kill to the first answer of a request "
        f"sent after it, per requests partition {recovery}; longest pause in answers "
        f"{pause:.2f}s; restarted {RESTART_AFTER_S:.0f}s after the kill, back in every ISR "
        f"{run.rejoined_s:.1f}s after its restart; agents restarted (exit codes) {run.restarts}"
    )
    assert run.victim_exit == -signal.SIGKILL
    run.assert_nothing_lost_or_doubled()
    assert set(recovery) == set(run.placed.values()), (recovery, sorted(set(run.placed.values())))


async def test_rolling_restart_of_every_broker_under_load_loses_nothing(
    cluster: LocalCluster, settings: Settings, tmp_path: Path
) -> None:
    """Each node in turn: SIGTERM (a controlled shutdown: its leaderships move first),
    start again, wait until it is back in every ISR, then the next, as an operator rolls
    an upgrade. Measured: each node's stop and its restart-to-ISR seconds, and the
    longest pause in answers over the whole roll."""
    steps: dict[int, tuple[float, float]] = {}

    async def roll(run: _Run) -> None:
        await asyncio.sleep(KILL_AT_S)
        run.killed_at = time.monotonic()
        for node_id in (1, 2, 3):
            stopping = time.monotonic()
            assert await asyncio.to_thread(cluster.node(node_id).stop)
            stopped_s = time.monotonic() - stopping
            restarted_at = time.monotonic()
            await asyncio.to_thread(cluster.start)
            prefix = settings.topics.prefix
            in_sync_s = await asyncio.to_thread(
                _wait_in_sync, settings, prefix, node_id, restarted_at
            )
            steps[node_id] = (round(stopped_s, 1), round(in_sync_s, 1))
        run.restarted_at = time.monotonic()

    run = await _under_load(cluster, settings, tmp_path, roll)
    during = sorted(at for at in run.answered_at.values() if run.killed_at < at)
    pause = max(b - a for a, b in zip([run.killed_at, *during], during, strict=False))
    print(
        f"\nrolling restart of nodes 1, 2, 3 at {RATE}/s: {run.counts()}; per node (seconds "
        f"to stop, restart to back in every ISR) {steps}; the roll took "
        f"{run.restarted_at - run.killed_at:.1f}s; longest pause in answers {pause:.2f}s; "
        f"agents restarted (exit codes) {run.restarts}"
    )
    run.assert_nothing_lost_or_doubled()
    assert sorted(steps) == [1, 2, 3]


def _running(cluster: LocalCluster) -> tuple[BrokerInfo, ...]:
    info = cluster.status()
    assert info is not None
    return info.nodes


def _reap(pid: int) -> int:
    """The victim's exit as a Popen return code would say it (-9 for SIGKILL).

    The JVM is not this process's child (the cluster detaches it), so wait until the
    pid is gone and report the signal we sent once it is.
    """
    deadline = time.monotonic() + 30
    while _kraft.pid_alive(pid):
        if time.monotonic() > deadline:
            return 0
        time.sleep(0.05)
    return -signal.SIGKILL


def _victim(
    cluster: LocalCluster, settings: Settings, requests: str, role: str
) -> tuple[int, list[int]]:
    """The node to kill and the ``requests`` partitions it leads.

    ``leader``: the group coordinator (the leader of ``__consumer_offsets``, one
    partition here) when it leads ``requests`` partitions too, as it does when the six
    are spread over three brokers: every consumer group then loses its coordinator
    as well. ``controller``: the quorum's active controller.
    """
    topics = _topic_metadata(settings)
    partitions = topics[requests].partitions
    leaders = Counter(p.leader for p in partitions.values())
    if role == "controller":
        node = cluster.controller()
        assert node is not None, "no active controller recorded"
    else:
        coordinator = topics["__consumer_offsets"].partitions[0].leader
        node = coordinator if coordinator in leaders else leaders.most_common(1)[0][0]
    return node, sorted(p.id for p in partitions.values() if p.leader == node)


def _partitions(tail: Tail, short: str) -> dict[str, int]:
    """request id -> partition, for every record read from ``short``."""
    pairs = zip(tail.records[short], tail.messages(short), strict=True)
    return {rec["request_id"]: int(msg.partition() or 0) for (_, rec), msg in pairs if rec}


def _first_answer_after(run: _Run, placed: dict[str, int]) -> dict[int, float]:
    """Per partition: seconds from the kill to the first answer of a request sent after it."""
    first: dict[int, float] = {}
    for rid, at in run.answered_at.items():
        partition = placed.get(rid)
        if partition is not None and run.sent_at[rid] > run.killed_at:
            first[partition] = min(first.get(partition, at), at)
    return {p: round(at - run.killed_at, 2) for p, at in sorted(first.items())}


def _topic_metadata(settings: Settings) -> dict[str, Any]:
    """Topic metadata through an admin handle made for this call: one kept across a broker
    kill can abort the process inside librdkafka (``rd_kafka_enq_once_del_source_return``)."""
    topics: dict[str, Any] = kafka.admin_client(settings).list_topics(timeout=10).topics
    return topics


def _wait_in_sync(settings: Settings, prefix: str, node: int, since: float) -> float:
    """Seconds from ``since`` until ``node`` is in the ISR of every partition of the test's
    topics (with 3 replicas on 3 brokers it holds a copy of each)."""
    deadline = time.monotonic() + 180
    while True:
        topics = _topic_metadata(settings)
        behind = [
            (name, p.id)
            for name, meta in topics.items()
            if name.startswith(prefix)
            for p in meta.partitions.values()
            if node not in p.isrs
        ]
        if not behind:
            return time.monotonic() - since
        if time.monotonic() > deadline:
            raise AssertionError(f"node {node} not back in the ISR of {behind}")
        time.sleep(0.2)
