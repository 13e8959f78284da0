"""Sessions on the real stack: history, affinity, a worker killed mid-conversation, expiry.

The LM is the ``dspex/sim?task=recall`` SIMULATION: its answer is the first input
of every user turn in its prompt, oldest first, joined by `` | `` — so an answer
shows exactly which history the worker gave the program. Turn ``k`` of session
``s`` asks ``s:k`` and must be answered ``s:1 | s:2 | ... | s:k``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from dspex import AsyncClient, Client, Program, Result
from dspex.agents.sessions.sweeper import SessionSweeper
from dspex.schemas import records
from dspex.streams.serde import make_serde
from dspex.streams.sessions import find_session, list_sessions
from dspex.streams.settings import Settings, load_settings
from tests.integration.stack import Stack, agent_env
from tests.integration.tail import OpenTail, Tail
from tests.integration.test_end_to_end import (  # noqa: F401 - the fixture is used by name
    StartStack,
    start_stack,
)
from tests.integration.test_reliability import _start_agent, _wait_for_members

SIGNATURE = "question, history: History -> answer"
CHAT = Program.inline(SIGNATURE)
RECALL = "dspex/sim?task=recall"
DEADLINE_S = 240.0


def recall_settings(settings: Settings, **sessions: Any) -> Settings:
    """The test's broker and prefix; the general pool on the recall simulation."""
    return load_settings(
        kafka={"bootstrap_servers": settings.kafka.bootstrap_servers},
        topics={"prefix": settings.topics.prefix},
        lm={
            "backends": {"recall": {"model": RECALL}, "recall-b": {"model": RECALL}},
            "pool_variants": {"general": "recall"},
        },
        reliability={"session_timeout_s": 6.0},
        sessions=sessions,
    )


def two_workers(
    settings: Settings, start: StartStack, log: Path
) -> tuple[Stack, subprocess.Popen[bytes]]:
    """The stack (router, one general worker) and a second general worker, both assigned."""
    stack = start(settings, ["general"])
    second = _start_agent(settings, log, "worker", "--pool", "general")
    try:
        _wait_for_members(settings, f"{settings.topics.prefix}pool.general", 2, 90)
    except BaseException:
        second.kill()
        second.wait(10)
        raise
    return stack, second


def expected(session: str, turn: int) -> str:
    return " | ".join(f"{session}:{k}" for k in range(1, turn + 1))


async def ask(
    client: AsyncClient, session: str, turn: int, program: Program | str = CHAT
) -> Result:
    return await client.submit(
        program, {"question": f"{session}:{turn}"}, session_id=session, deadline_s=DEADLINE_S
    )


async def converse(client: AsyncClient, session: str, turns: range) -> list[Result]:
    """The session's turns one after another (each waits for the previous answer)."""
    return [await ask(client, session, turn) for turn in turns]


def check_answers(session: str, turns: range, results: list[Result]) -> list[str]:
    """What is wrong with a session's answers (empty: every turn saw exactly its history)."""
    wrong = []
    for turn, result in zip(turns, results, strict=True):
        if result.outputs.get("answer") != expected(session, turn):
            wrong.append(f"{session} turn {turn}: {result.outputs!r}")
        if result.session is None or result.session["turn"] != turn:
            wrong.append(f"{session} turn {turn}: session field {result.session!r}")
    return wrong


def stored_turns(settings: Settings) -> dict[str, list[str]]:
    """The request ids in each live session's stored history, in order."""
    states = list_sessions(settings, make_serde(settings))
    return {sid: [t["request_id"] for t in state["turns"]] for sid, state in states.items()}


def executions_of(tail: Tail, ids: set[str]) -> list[dict[str, Any]]:
    """The Execution records read so far, once there is one for every id in ``ids``."""
    tail.wait(
        lambda t: ids <= {r["request_id"] for r in t.of("executions")} or None, 60, "executions"
    )
    return tail.of("executions")


def workers_by_request(tail_records: list[dict[str, Any]]) -> dict[str, str]:
    return {r["request_id"]: r["worker_id"] for r in tail_records}


async def test_100_sessions_of_5_turns_each_see_only_their_own_history_on_one_worker(
    settings: Settings,
    start_stack: StartStack,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
    tails: OpenTail,
) -> None:
    """100 conversations at once on two workers; each answer depends on all earlier turns.

    Also the affinity figure: the share of each session's turns served by its
    most frequent worker, without faults (expected 100 %: one key, one partition,
    one owner while the group is stable).
    """
    settings = recall_settings(settings)
    stack, second = two_workers(settings, start_stack, tmp_path / "second.log")
    try:
        executions = tails(["executions"], settings=settings)
        sessions = [f"s{n:03d}-{uuid.uuid4().hex[:4]}" for n in range(100)]
        turns = range(1, 6)
        started = time.monotonic()
        async with AsyncClient(settings) as client:
            answers = await asyncio.gather(*(converse(client, s, turns) for s in sessions))
        elapsed = time.monotonic() - started
        request_ids = {r.request_id for results in answers for r in results}
        executions_of(executions, request_ids)
        stack.wait_idle()
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(60)
    stack.check_alive()

    wrong = [
        w
        for s, results in zip(sessions, answers, strict=True)
        for w in check_answers(s, turns, results)
    ]
    assert not wrong, wrong[:10]
    assert all(r[0].session == {"session_id": s, "turn": 1, "fresh": True, "expired": False}
               for s, r in zip(sessions, answers, strict=True))  # fmt: skip
    stored = stored_turns(settings)
    for session, results in zip(sessions, answers, strict=True):
        assert stored[session] == [r.request_id for r in results], session

    served = workers_by_request(executions.of("executions"))
    by_session: dict[str, Counter[str]] = defaultdict(Counter)
    for session, results in zip(sessions, answers, strict=True):
        for result in results:
            by_session[session][served[result.request_id]] += 1
    on_one = sum(c.most_common(1)[0][1] for c in by_session.values())
    share = on_one / (len(sessions) * len(turns))
    workers = Counter(w for c in by_session.values() for w in c)
    print(
        f"\n100 sessions x 5 turns on 2 workers in {elapsed:.1f}s: all {len(request_ids)} "
        f"answers saw exactly their own history; affinity: {share:.1%} of a session's "
        f"turns on its most frequent worker; sessions per worker {sorted(workers.values())}"
    )
    assert share >= 0.9  # 1.0 expected; a broken affinity would spread turns ~50/50
    assert len(workers) == 2  # both workers served sessions: affinity is not "one worker"


async def test_kill_9_of_the_worker_holding_a_session_hands_it_over_with_full_history(
    settings: Settings,
    start_stack: StartStack,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
    tails: OpenTail,
) -> None:
    """Two turns, ``kill -9`` of the worker that served them, then the conversation goes on.

    The survivor gets the dead worker's partitions after the group's session timeout
    (6 s here), reads each session's state from the topic and answers the next turn
    with the whole history; nothing is lost or recorded twice.
    """
    settings = recall_settings(settings)
    stack, victim = two_workers(settings, start_stack, tmp_path / "victim.log")
    try:
        executions = tails(["executions"], settings=settings)
        sessions = [f"k{n:02d}-{uuid.uuid4().hex[:4]}" for n in range(24)]
        async with AsyncClient(settings) as client:
            before = await asyncio.gather(*(converse(client, s, range(1, 3)) for s in sessions))
            ids = {r.request_id for results in before for r in results}
            served = workers_by_request(executions_of(executions, ids))
            held = [s for s, res in zip(sessions, before, strict=True)
                    if served[res[-1].request_id].endswith(f":{victim.pid}")]  # fmt: skip
            assert held, "the victim served no session: nothing to hand over"
            os.kill(victim.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            answered_at: dict[str, float] = {}

            async def go_on(session: str) -> list[Result]:
                results = []
                for turn in (3, 4):
                    results.append(await ask(client, session, turn))
                    answered_at.setdefault(session, time.monotonic())
                return results

            after = await asyncio.gather(*(go_on(s) for s in sessions))
        stack.wait_idle()
        executions.catch_up()
    finally:
        if victim.poll() is None:
            victim.kill()
        victim.wait(10)
    stack.check_alive()

    wrong = []
    for session, first, then in zip(sessions, before, after, strict=True):
        wrong += check_answers(session, range(1, 5), [*first, *then])
    assert not wrong, wrong[:10]
    served = workers_by_request(executions.of("executions"))
    for session, then in zip(sessions, after, strict=True):
        if session in held:
            assert not served[then[0].request_id].endswith(f":{victim.pid}")
    stored = stored_turns(settings)
    for session, first, then in zip(sessions, before, after, strict=True):
        assert stored[session] == [r.request_id for r in [*first, *then]], session
    handover = [answered_at[s] - killed_at for s in held]
    print(
        f"\nkill -9 of the worker holding {len(held)} of {len(sessions)} sessions after turn 2: "
        f"its sessions' turn 3 answered {min(handover):.1f}-{max(handover):.1f}s after the kill "
        f"by the survivor, with full history; 0 turns lost, 0 doubled in the stored history"
    )


async def test_an_expired_session_is_tombstoned_and_its_next_turn_starts_fresh(
    settings: Settings,
    start_stack: StartStack,  # noqa: F811 - the fixture imported above
    tails: OpenTail,
) -> None:
    """TTL 2 s: the sessions agent tombstones the state; the next turn says expired and fresh.
    The agent also reports the session's counters on ``metrics``."""
    settings = recall_settings(settings, ttl_s=2.0, sweep_interval_s=0.5)
    start_stack(settings, ["general"])
    metrics = tails(["metrics"], settings=settings)
    serde = make_serde(settings)
    session = f"e-{uuid.uuid4().hex[:6]}"
    sweeper = SessionSweeper(settings)
    stop = asyncio.Event()
    sweeping = asyncio.create_task(sweeper.serve(stop))
    try:
        async with AsyncClient(settings) as client:
            first = await converse(client, session, range(1, 3))
            assert check_answers(session, range(1, 3), first) == []
            assert find_session(settings, serde, session).state is not None
            waited = time.monotonic()
            while find_session(settings, serde, session).ended is None:
                assert time.monotonic() - waited < 60, "no tombstone a minute after the TTL"
                await asyncio.sleep(0.5)
            tombstoned_s = time.monotonic() - waited
            again = await ask(client, session, 1)
            more = await ask(client, session, 2)
    finally:
        stop.set()
        await sweeping
    assert find_session(settings, serde, session).ended is None  # alive again
    assert again.outputs == {"answer": f"{session}:1"}  # no history from before the expiry
    assert again.session == {"session_id": session, "turn": 1, "fresh": True, "expired": True}
    assert more.outputs == {"answer": expected(session, 2)}
    assert more.session == {"session_id": session, "turn": 2, "fresh": False, "expired": False}
    reported = metrics.wait(
        lambda t: (
            [
                m
                for m in t.of("metrics")
                if m["name"] == "session" and m["labels"] == {"session_id": session}
            ]
            or None
        ),
        60,
        "the session's counters on metrics",
    )
    assert max(m["count"] for m in reported) == 2  # the two turns before the expiry
    print(f"\nTTL 2s: tombstone seen {tombstoned_s:.1f}s after the last turn; next turn fresh")


def _sticky_table(program_id: str, weights: dict[str, float], version: int) -> dict[str, Any]:
    variants = [records.variant(name=n, weight=w, pool="general") for n, w in weights.items()]
    now = int(time.time() * 1000)
    return records.routing_table(
        program_id=program_id, version=version, created_at=now, variants=variants
    )


def _publish_table(settings: Settings, table: dict[str, Any]) -> None:
    from dspex.streams import kafka
    from dspex.streams.topics import Topics

    topic = Topics(settings.topics).name("routing")
    producer = kafka.producer(settings)
    value = make_serde(settings).encode("RoutingTable", table, topic=topic)
    producer.produce(topic, value, table["program_id"])
    assert producer.flush(30) == 0


async def test_a_sticky_session_keeps_its_variant_while_the_table_shifts_other_traffic(
    settings: Settings,
    start_stack: StartStack,  # noqa: F811 - the fixture imported above
    tails: OpenTail,
) -> None:
    """The table sends everything to ``recall``, a session starts; then it sends all to
    ``recall-b``: new sessions follow the table, the started one stays on ``recall``."""
    settings = recall_settings(settings)
    start_stack(settings, ["general"])
    async with AsyncClient(settings) as client:
        await client.publish_program("chat", SIGNATURE)
        _publish_table(settings, _sticky_table("chat", {"recall": 1.0, "recall-b": 0.0}, 1))
        executions = tails(["executions"], settings=settings)
        pinned = f"p-{uuid.uuid4().hex[:6]}"
        first = await _ask_when_known(client, pinned)
        _publish_table(settings, _sticky_table("chat", {"recall": 0.0, "recall-b": 1.0}, 2))
        await asyncio.sleep(2.0)  # the router follows the routing topic
        later = [await ask(client, pinned, turn, "chat") for turn in range(2, 6)]
        others = [await ask(client, f"o{n}-{uuid.uuid4().hex[:4]}", 1, "chat") for n in range(4)]
    ids = {r.request_id for r in [first, *later, *others]}
    by_id = {r["request_id"]: r for r in executions_of(executions, ids)}

    def variant(result: Result) -> str:
        return str(by_id[result.request_id]["route"]["variant"])

    assert [variant(r) for r in [first, *later]] == ["recall"] * 5
    assert {by_id[r.request_id]["route"]["reason"] for r in later} == {"sticky"}
    assert [variant(r) for r in others] == ["recall-b"] * 4
    assert later[-1].outputs == {"answer": expected(pinned, 5)}
    print("\nsticky session: 5 of 5 turns on its first variant; 4 of 4 new sessions followed")


async def _ask_when_known(client: AsyncClient, session: str) -> Result:
    """Turn 1 once the router knows the program (it follows the programs topic)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return await ask(client, session, 1, "chat")
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


def _dspex(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**agent_env(settings), "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "dspex.streams", "sessions", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def test_session_handles_concurrent_turns_and_the_sessions_command(
    settings: Settings,
    start_stack: StartStack,  # noqa: F811 - the fixture imported above
    tails: OpenTail,
) -> None:
    """The blocking client's handle; three turns sent at once from three threads are
    served one after another in the order produced, each seeing the ones before, and all
    recorded; ``dspex sessions show|list|end``; an ended session's next turn starts fresh;
    a session variable steers that session only and ends with it; an unknown or ended
    session is one error line naming ``session_id`` and exit 1."""
    settings = recall_settings(settings)
    start_stack(settings, ["general"])
    session = f"c-{uuid.uuid4().hex[:6]}"
    executions = tails(["executions"], settings=settings)
    with Client(settings) as client, ThreadPoolExecutor(3) as pool:
        chat = client.session(session)
        # produced in this order (one key, one partition); the worker runs one turn of a
        # session at a time, in the order consumed
        asked = [f"{session}:{word}" for word in ("a", "b", "c")]
        futures = [pool.submit(chat.submit, CHAT, {"question": q}) for q in asked]
        answered = [(q, f.result(timeout=DEADLINE_S)) for q, f in zip(asked, futures, strict=True)]
        # whatever order they were produced in: by turn number, each saw all before it
        in_order = sorted(answered, key=lambda pair: (pair[1].session or {}).get("turn", 0))
        results = [result for _, result in in_order]
        shown = _dspex(settings, "show", session)
        listed = _dspex(settings, "list")
        ended = _dspex(settings, "end", session)
        again = chat.submit(CHAT, {"question": f"{session}:1"}, deadline_s=DEADLINE_S)
        state = chat.state()
        chat.set_variable("model", "recall-b", var_type="string")
        steered, plain = _steered(client, executions, session)
        ended_again = _dspex(settings, "end", session)
        variable = client.get_variable("model", session=session)
    assert [(r.session or {}).get("turn") for r in results] == [1, 2, 3]
    for turn, (_, result) in enumerate(in_order, start=1):
        assert result.outputs == {"answer": " | ".join(q for q, _ in in_order[:turn])}
    assert shown.returncode == 0, shown.stderr
    assert [t["request_id"] for t in json.loads(shown.stdout)["turns"]] == [
        r.request_id for r in results
    ]
    assert listed.returncode == 0 and session in listed.stdout, listed.stderr
    assert ended.returncode == 0 and "after 3 turn(s)" in ended.stdout, ended.stderr
    assert again.outputs == {"answer": f"{session}:1"}
    assert again.session == {"session_id": session, "turn": 1, "fresh": True, "expired": True}
    assert state is not None and state["restarted"] and len(state["turns"]) == 1
    assert (steered, plain) == ("recall-b", "recall")
    assert ended_again.returncode == 0, ended_again.stderr
    assert variable is None  # tombstoned with the session

    unknown = _dspex(settings, "show", "nobody-" + uuid.uuid4().hex[:6])
    assert unknown.returncode == 1 and "session_id" in unknown.stderr, unknown.stderr
    twice = _dspex(settings, "end", session)
    assert twice.returncode == 1 and "it ended" in twice.stderr, twice.stderr
    print(
        f"\n3 concurrent turns of {session} served in order; show/list/end and restart ok;"
        " a session variable steered that session only and ended with it"
    )


def _steered(client: Client, executions: Tail, session: str) -> tuple[str, str]:
    """The variants that ran a request of ``session`` (whose ``model`` variable names
    ``recall-b``) and one of another session, once the router applies the variable."""
    program = Program.inline("question -> answer")  # no History input: not sticky
    deadline = time.monotonic() + 60
    while True:
        mine = client.submit(program, {"question": "x"}, session_id=session)
        other = client.submit(program, {"question": "x"}, session_id=f"x-{uuid.uuid4().hex}")
        ran = {
            r["request_id"]: r["route"]["variant"]
            for r in executions_of(executions, {mine.request_id, other.request_id})
        }
        variants = (str(ran[mine.request_id]), str(ran[other.request_id]))
        if variants[0] == "recall-b" or time.monotonic() > deadline:
            return variants
        time.sleep(0.5)  # the router follows the variables topic
