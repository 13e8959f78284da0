"""Chaos on the real stack: ``kill -9`` a general-pool worker under steady load.

The router and a general-pool worker run as ``python -m dspex.agents`` processes
(:mod:`tests.integration.stack`); a second general-pool worker is started here and
SIGKILLed while 400 requests (20 batches of 20, one batch every 0.5 s) flow. Its
partitions move to the survivor once the group notices (``reliability.session_timeout_s``),
which redoes every request the dead worker had not committed. Counted: sent,
answered at the client, lost, final Responses duplicated on the topic (a worker
killed after producing and before committing redoes work; the client drops the
repeat by request id and seq) and recovery seconds. Run with ``-s`` to see them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from dspex.streams import kafka
from dspex.streams.client.client import AsyncClient, Program, Result
from dspex.streams.errors import DSPexError
from dspex.streams.settings import Settings, load_settings
from tests.integration.stack import REPO, agent_env
from tests.integration.tail import OpenTail
from tests.integration.test_end_to_end import (  # noqa: F401 - the fixture is used by name
    StartStack,
    echo_settings,
    start_stack,
)

INLINE = Program.inline("question -> answer")
BATCHES, BATCH_SIZE, INTERVAL_S, KILL_AFTER_BATCH = 20, 20, 0.5, 8


def _start_worker(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    return _start_agent(settings, log, "worker", "--pool", "general")


def _start_agent(settings: Settings, log: Path, *args: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "dspex.agents", *args]
    with log.open("wb") as out:
        return subprocess.Popen(
            argv, env=agent_env(settings), cwd=REPO, stdout=out, stderr=subprocess.STDOUT
        )


def _wait_for_members(settings: Settings, group: str, members: int, timeout_s: float) -> None:
    admin = kafka.admin_client(settings)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        (future,) = admin.describe_consumer_groups([group], request_timeout=5).values()
        described = future.result()
        assigned = [m for m in described.members if m.assignment.topic_partitions]
        if described.state.name == "STABLE" and len(assigned) == members:
            return
        time.sleep(0.3)
    raise AssertionError(f"group {group} did not reach {members} assigned members")


async def _timed(client: AsyncClient, question: str) -> tuple[str, Result | DSPexError, float]:
    sent_at = time.monotonic()
    try:
        result: Result | DSPexError = await client.submit(
            INLINE, {"question": question}, deadline_s=120, cache=False
        )
    except DSPexError as exc:
        result = exc
    return question, result, sent_at


async def test_kill_9_of_a_general_worker_under_load_loses_nothing(
    settings: Settings,
    start_stack: StartStack,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
    tails: OpenTail,
) -> None:
    settings = echo_settings(settings)
    stack = start_stack(settings, ["general"])
    victim = _start_worker(settings, tmp_path / "victim.log")
    try:
        _wait_for_members(settings, f"{settings.topics.prefix}pool.general", 2, 60)
        tail = tails(["responses"], settings=settings)
        done: dict[str, float] = {}
        async with AsyncClient(settings) as client:

            async def one(question: str) -> tuple[str, Result | DSPexError, float]:
                outcome = await _timed(client, question)
                done[question] = time.monotonic()
                return outcome

            tasks, killed_at = [], 0.0
            for batch in range(BATCHES):
                questions = [f"chaos {batch}.{n} {uuid.uuid4().hex[:6]}" for n in range(BATCH_SIZE)]
                tasks += [asyncio.create_task(one(q)) for q in questions]
                if batch == KILL_AFTER_BATCH:
                    os.kill(victim.pid, signal.SIGKILL)
                    killed_at = time.monotonic()
                await asyncio.sleep(INTERVAL_S)
            outcomes = await asyncio.gather(*tasks)
        tail.wait(lambda t: len([r for r in t.of("responses") if r["final"]]) >= 400, 30, "400")
        stack.wait_idle()  # the survivors committed all they consumed: nothing more is redone
        tail.catch_up()  # and every duplicate already produced has been read
    finally:
        if victim.poll() is None:
            victim.kill()
        victim.wait(10)
    stack.check_alive()

    answered = [(q, r, s) for q, r, s in outcomes if isinstance(r, Result)]
    lost = [(q, repr(r)) for q, r, _ in outcomes if not isinstance(r, Result)]
    wrong = [
        q for q, r, _ in answered if isinstance(r, Result) and r.outputs != {"answer": f"echo: {q}"}
    ]
    finals = Counter(r["request_id"] for r in tail.of("responses") if r["final"])
    duplicated = {rid: n for rid, n in finals.items() if n > 1}
    # the slowest answer after the kill: requests parked on the dead worker's partitions
    # wait until the group reassigns them (the session timeout), then are redone
    recovery_s = max(done[q] - sent_at for q, _, sent_at in outcomes if done[q] > killed_at)
    after = sorted(t for t in done.values() if t > killed_at)
    longest_gap = max(b - a for a, b in zip([killed_at, *after], after, strict=False))
    print(
        f"\nkill -9 of 1 of 2 general workers: sent {len(outcomes)}, answered {len(answered)} "
        f"(each once at the client), lost {len(lost)}, duplicated final responses on the topic "
        f"{sum(n - 1 for n in duplicated.values())} for {len(duplicated)} requests, "
        f"recovery {recovery_s:.1f}s (slowest answer after the kill), "
        f"longest pause in answers {longest_gap:.1f}s; victim exit {victim.returncode}"
    )
    assert victim.returncode == -signal.SIGKILL
    assert lost == [] and wrong == []
    assert len(answered) == BATCHES * BATCH_SIZE
    assert set(finals) >= {r.request_id for _, r, _ in answered if isinstance(r, Result)}
    assert recovery_s < settings.reliability.session_timeout_s + 15


async def test_kill_9_of_the_router_under_load_loses_nothing(
    settings: Settings,
    start_stack: StartStack,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
    tails: OpenTail,
) -> None:
    """The router is killed between batches and restarted at once, as the supervisor does.

    Requests the dead router had read but not yet forwarded must be routed by its
    successor: the router's offset for a request is committed only once its pool
    record is on the broker. The restarted router has the same ``--instance-id``
    (static membership), so it takes the partitions back without waiting for the
    dead one's session to expire. Measured: seconds from the kill to the first
    answer to a request sent after it (which only the new router can route).
    """
    settings = echo_settings(settings)
    stack = start_stack(settings, ["general"])
    victim = stack.processes["router"]
    tail = tails(["responses"], settings=settings)
    answered_at: dict[str, float] = {}
    async with AsyncClient(settings) as client:

        async def one(question: str) -> tuple[str, Result | DSPexError, float]:
            outcome = await _timed(client, question)
            answered_at[question] = time.monotonic()
            return outcome

        tasks, killed_at = [], 0.0
        for batch in range(BATCHES):
            questions = [f"router {batch}.{n} {uuid.uuid4().hex[:6]}" for n in range(BATCH_SIZE)]
            tasks += [asyncio.create_task(one(q)) for q in questions]
            if batch == KILL_AFTER_BATCH:
                await asyncio.sleep(0.05)  # let the router be mid-batch
                os.kill(victim.pid, signal.SIGKILL)
                killed_at = time.monotonic()
                victim.wait(10)
                stack.processes["router"] = _start_agent(
                    settings, tmp_path / "router2.log", "router", "--instance-id", "1"
                )
            await asyncio.sleep(INTERVAL_S)
        outcomes = await asyncio.gather(*tasks)
    tail.wait(lambda t: len([r for r in t.of("responses") if r["final"]]) >= 400, 30, "400")
    stack.check_alive()

    answered = [r for _, r, _ in outcomes if isinstance(r, Result)]
    lost = [(q, repr(r)) for q, r, _ in outcomes if not isinstance(r, Result)]
    wrong = [
        q for q, r, _ in outcomes if isinstance(r, Result) and r.outputs != {"answer": f"echo: {q}"}
    ]
    sent_after = [q for q, _, sent_at in outcomes if sent_at > killed_at]
    first_answer_s = min(answered_at[q] for q in sent_after) - killed_at
    print(
        f"\nkill -9 of the router after batch {KILL_AFTER_BATCH}: sent {len(outcomes)}, "
        f"answered {len(answered)}, lost {len(lost)}; first answer to a request sent after "
        f"the kill {first_answer_s:.2f}s after it; victim exit {victim.returncode}"
    )
    assert victim.returncode == -signal.SIGKILL
    assert lost == [] and wrong == []
    assert len(answered) == BATCHES * BATCH_SIZE
    assert first_answer_s <= 10.0


@pytest.mark.parametrize("args", [["router"], ["worker", "--pool", "general"]])
def test_sigterm_while_an_agent_is_still_starting_exits_cleanly(
    settings: Settings, create_topics: Callable[[], object], args: list[str]
) -> None:
    """An orchestrator may stop a process that is still importing: exit 0, no traceback."""
    create_topics()
    process = subprocess.Popen(
        [sys.executable, "-m", "dspex.agents", *args],
        env=agent_env(settings),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    time.sleep(0.5)  # the imports (DSPy, faust) take seconds: this lands among them
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output.decode(errors="replace")[-2000:]
    assert b"Traceback" not in output


SIM_30MS = "dspex/sim?task=echo&delay=0.03"
RATE, LOAD_S, KILL_AT_S = 25, 24.0, 8.0


@pytest.mark.parametrize("membership", ["static", "dynamic"])
async def test_kill_9_of_a_worker_every_partition_answers_again_within_10s(
    settings: Settings,
    start_stack: StartStack,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
    tails: OpenTail,
    membership: str,
) -> None:
    """Two general-pool workers at 25 requests/s (30 ms simulated LM); one is SIGKILLed.

    The supervisor's part is played here: the victim is restarted at once. ``static``:
    with the same ``--instance-id``, it takes its partitions back without a rebalance.
    ``dynamic`` (no instance id, a 6 s session timeout): the group gives the dead
    member's partitions to the survivor once the session expires, then moves some to
    the restarted member; the survivor's revoke must never stall its other
    partitions (cooperative assignment, a revoke callback that never waits).
    Measured per pool partition: seconds from the kill to the first answer of a
    request on that partition.
    """
    settings = load_settings(
        kafka={"bootstrap_servers": settings.kafka.bootstrap_servers},
        topics={"prefix": settings.topics.prefix},
        lm={"backends": {"sim": {"model": SIM_30MS}}, "pool_variants": {"general": "sim"}},
        reliability={"session_timeout_s": 10.0 if membership == "static" else 6.0},
    )
    stack = start_stack(settings, ["general"])
    args = ["worker", "--pool", "general"]
    args += ["--instance-id", "2"] if membership == "static" else []
    victim = _start_agent(settings, tmp_path / "victim.log", *args)
    restarted: subprocess.Popen[bytes] | None = None
    # which pool partition each request went to, read from the pool topic
    pool = tails(["pool.general"], settings=settings)
    answered_at: dict[str, float] = {}
    try:
        _wait_for_members(settings, f"{settings.topics.prefix}pool.general", 2, 60)
        tail = tails(["responses"], settings=settings)
        async with AsyncClient(settings) as client:

            async def one(question: str) -> tuple[str, Result | DSPexError, float]:
                outcome = await _timed(client, question)
                if isinstance(outcome[1], Result):
                    answered_at[outcome[1].request_id] = time.monotonic()
                return outcome

            tasks, killed_at, start = [], 0.0, time.monotonic()
            for tick in range(int(LOAD_S * RATE)):
                question = f"steady {tick} {uuid.uuid4().hex[:6]}"
                tasks.append(asyncio.create_task(one(question)))
                if not killed_at and time.monotonic() - start >= KILL_AT_S:
                    os.kill(victim.pid, signal.SIGKILL)
                    killed_at = time.monotonic()
                    victim.wait(10)
                    restarted = _start_agent(settings, tmp_path / "restarted.log", *args)
                await asyncio.sleep(max(0.0, start + (tick + 1) / RATE - time.monotonic()))
            outcomes = await asyncio.gather(*tasks)
        total = len(outcomes)
        tail.wait(lambda t: len({r["request_id"] for r in t.of("responses")}) >= total, 30, "all")
        pairs = zip(pool.records["pool.general"], pool.messages("pool.general"), strict=True)
        placed = {rec["request_id"]: msg.partition() for (_, rec), msg in pairs if rec}
    finally:
        for process in (victim, restarted):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(45)
    stack.check_alive()

    results = [r for _, r, _ in outcomes if isinstance(r, Result)]
    lost = [(q, repr(r)) for q, r, _ in outcomes if not isinstance(r, Result)]
    first_after: dict[int, float] = {}
    for result in results:
        at, partition = answered_at[result.request_id], placed.get(result.request_id)
        if at > killed_at and partition is not None:
            first_after[partition] = min(first_after.get(partition, at), at)
    recovery = {p: round(at - killed_at, 2) for p, at in sorted(first_after.items())}
    slowest = max(recovery.values())
    print(
        f"\nkill -9 of 1 of 2 workers ({membership}) at {RATE}/s: sent {total}, "
        f"answered {len(results)} (once each), lost {len(lost)}; seconds from the kill to "
        f"each partition's first answer {recovery}; slowest {slowest:.2f}s; "
        f"victim exit {victim.returncode}"
    )
    assert victim.returncode == -signal.SIGKILL
    assert lost == []
    assert len({r.request_id for r in results}) == len(results) == total
    assert all(r.outputs == {"answer": q} for q, r, _ in outcomes if isinstance(r, Result))
    partition_count = len(set(placed.values()))
    assert len(recovery) == partition_count, (recovery, partition_count)
    assert slowest <= 10.0, recovery
