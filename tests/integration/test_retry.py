"""Retry topics on the real stack: a transient failure goes round again, then the DLQ.

The general pool runs a SIMULATED flaky model, ``dspex/sim?task=echo&fail=N``:
the first N calls in the worker process raise DSPy's retryable ``LMServerError``,
later ones answer. In-process retries are off (``retry_attempts=1``) and the
breaker never opens (``breaker_fail_max=1000``), so each failed call fails its
attempt and the request goes through ``retry`` -> router -> ``pool.general``.
Counted (run with ``-s``): sent, answered ok/error, executions per attempt,
retry records (on the delay tiers ``retry.1s``/``retry.5s``/``retry.30s``), dead
letters. A third test stops the router (``kill -9``, then SIGTERM) while a retry
waits on its tier (the retrier's partition paused until it is due), and starts a
new one: the retry is forwarded either way, once, and the timing is printed.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from dspex.agents.plumbing.messages import Consumed
from dspex.agents.plumbing.retry import NOT_BEFORE, RETRY_HEADERS, header
from dspex.streams.client.client import AsyncClient, Program, RequestFailed, Result
from dspex.streams.settings import Settings, load_settings
from dspex.streams.topics import RETRY_TIERS
from tests.integration.stack import REPO, agent_env
from tests.integration.tail import OpenTail, Tail
from tests.integration.test_end_to_end import (  # noqa: F401 - the fixture is used by name
    StartStack,
    start_stack,
)

PROGRAM = Program.inline("question -> answer")
ATTEMPTS = 3
TIERS = [f"retry.{label}" for label in RETRY_TIERS]
WATCHED = ["executions", "retry", *TIERS, "dlq", "responses"]


def _retries(tail: Tail) -> list[str]:
    """The tier of every retry record read (the old ``retry`` topic must stay empty)."""
    return [short for short in ["retry", *TIERS] for _ in tail.of(short)]


def flaky_settings(
    settings: Settings, fail: int, backoff_s: tuple[float, ...] = (0.2, 0.5)
) -> Settings:
    backends = {"flaky": {"model": f"dspex/sim?task=echo&fail={fail}"}}
    return load_settings(
        kafka={"bootstrap_servers": settings.kafka.bootstrap_servers},
        topics={"prefix": settings.topics.prefix},
        lm={"backends": backends, "default_variant": "flaky", "pool_variants": {}},
        pools={"general": {"processes": 1, "in_flight": 8, "max_processes": 1}},
        router={"cache_enabled": False},
        reliability={
            "retry_attempts": 1,
            "breaker_fail_max": 1000,
            "retry_topic_attempts": ATTEMPTS,
            "retry_topic_backoff_s": list(backoff_s),
        },
    )


async def _ask(settings: Settings, questions: list[str]) -> list[Result | RequestFailed]:
    async def one(client: AsyncClient, question: str) -> Result | RequestFailed:
        try:
            return await client.submit(PROGRAM, {"question": question}, deadline_s=60)
        except RequestFailed as exc:
            return exc

    async with AsyncClient(settings) as client:
        return list(await asyncio.gather(*(one(client, q) for q in questions)))


def _attempts(tail: Tail) -> dict[str, list[tuple[int, str | None]]]:
    """Per request id: (attempt, error class or None) of every Execution, in attempt order."""
    by_request: dict[str, list[tuple[int, str | None]]] = {}
    for execution in tail.of("executions"):
        error = execution["error"]
        entry = (execution["attempt"], error["error_class"] if error else None)
        by_request.setdefault(execution["request_id"], []).append(entry)
    return {rid: sorted(entries) for rid, entries in by_request.items()}


def _report(name: str, outcomes: list[Any], tail: Tail) -> None:
    statuses = Counter("ok" if isinstance(o, Result) else o.status for o in outcomes)
    per_attempt = Counter(
        (e["attempt"], "ok" if e["error"] is None else "error") for e in tail.of("executions")
    )
    print(
        f"\nretry topic, {name}: sent {len(outcomes)}, answered {dict(statuses)}; executions "
        f"by (attempt, outcome) {dict(sorted(per_attempt.items()))}; retry records "
        f"{Counter(_retries(tail))}; dead letters {len(tail.of('dlq'))}"
    )


async def test_a_request_whose_first_call_fails_is_answered_ok_on_its_retry(
    settings: Settings,
    start_stack: StartStack,  # noqa: F811 - the fixture imported above
    tails: OpenTail,
) -> None:
    settings = flaky_settings(settings, fail=1)
    stack = start_stack(settings, ["general"])
    tail = tails(WATCHED, settings=settings)
    questions = [f"retry me {n} {uuid.uuid4().hex[:6]}" for n in range(4)]
    outcomes = await _ask(settings, questions)
    tail.wait(lambda t: len(t.of("executions")) >= 5, 30, "five executions")
    stack.wait_idle()  # router and worker committed all they consumed: nothing is redone
    tail.catch_up()  # anything produced twice is read by now
    _report("first call fails", outcomes, tail)

    assert all(isinstance(o, Result) for o in outcomes), outcomes
    answers = sorted(o.outputs["answer"] for o in outcomes if isinstance(o, Result))
    assert answers == sorted(questions)
    histories = _attempts(tail)
    assert len(histories) == 4
    retried = [h for h in histories.values() if len(h) > 1]
    assert retried == [[(1, "BackendsExhausted"), (2, None)]]
    assert sorted(h for h in histories.values() if len(h) == 1) == [[(1, None)]] * 3
    assert _retries(tail) == ["retry.1s"]  # backoff 0.2 s: the 1 s tier
    assert tail.of("dlq") == []
    assert len([r for r in tail.of("responses") if r["final"]]) == 4


async def test_a_request_that_always_fails_is_dead_lettered_once_after_every_attempt(
    settings: Settings,
    start_stack: StartStack,  # noqa: F811 - the fixture imported above
    tails: OpenTail,
) -> None:
    settings = flaky_settings(settings, fail=1_000_000)
    stack = start_stack(settings, ["general"])
    tail = tails(WATCHED, settings=settings)
    outcomes = await _ask(settings, [f"doomed {uuid.uuid4().hex[:6]}"])
    tail.wait(lambda t: len(t.of("dlq")) >= 1, 30, "the dead letter")
    stack.wait_idle()
    tail.catch_up()
    _report("every call fails", outcomes, tail)

    (failed,) = outcomes
    assert isinstance(failed, RequestFailed)
    assert (failed.status, failed.error_class, failed.retryable) == (
        "error",
        "BackendsExhausted",
        True,
    )
    assert _attempts(tail) == {
        failed.request_id: [(n, "BackendsExhausted") for n in range(1, ATTEMPTS + 1)]
    }
    assert _retries(tail) == ["retry.1s"] * (ATTEMPTS - 1)
    (letter,) = tail.of("dlq")
    assert (letter["attempts"], letter["stage"], letter["request_id"]) == (
        ATTEMPTS,
        "execute",
        failed.request_id,
    )
    # the retry bookkeeping headers are left out: a replay starts again at attempt 1
    assert not {h["key"] for h in letter["original_headers"]} & RETRY_HEADERS
    assert len([r for r in tail.of("responses") if r["final"]]) == 1


def _wait_for_line(log: Path, text: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{text!r} not in {log} after {timeout_s}s"
        time.sleep(0.1)


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
async def test_a_retry_waiting_on_its_delay_tier_survives_a_router_stop(
    settings: Settings,
    start_stack: StartStack,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
    stop: signal.Signals,
    tails: OpenTail,
) -> None:
    """The wait is on Kafka: the retry record sits on ``retry.5s``, its offset uncommitted.

    kill -9 or SIGTERM while the retrier waits for it (its partition paused): nothing
    was forwarded or committed, so the next router's retrier reads it again and
    forwards it once it is due — not before (the order of the timestamps says so).
    """
    settings = flaky_settings(settings, fail=1, backoff_s=(4.0,))
    stack = start_stack(settings, ["general"])
    tail = tails(WATCHED, settings=settings)
    asking = asyncio.create_task(_ask(settings, [f"survive {uuid.uuid4().hex[:6]}"]))
    await asyncio.to_thread(_wait_for_line, tmp_path / "router.log", "retry scheduled", 30)
    old = stack.processes["router"]
    old.send_signal(stop)
    stopped_ms = time.time() * 1000
    exit_code = await asyncio.to_thread(old.wait, 45)
    exited_ms = time.time() * 1000
    log = (tmp_path / "router2.log").open("wb")
    with log:
        stack.processes["router"] = subprocess.Popen(
            [sys.executable, "-m", "dspex.agents", "router"],
            env=agent_env(settings),
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    outcomes = await asyncio.wait_for(asking, 90)
    tail.wait(lambda t: len(t.of("executions")) >= 2, 30, "two executions")
    await asyncio.to_thread(stack.wait_ready)  # the teardown's SIGTERM must find it running
    stack.wait_idle()  # the new retrier committed the retry, the worker its pool record
    tail.catch_up()
    _report(f"router stopped ({stop.name}) while a retry waited", outcomes, tail)

    assert exit_code == (0 if stop == signal.SIGTERM else -signal.SIGKILL)
    (answer,) = outcomes
    assert isinstance(answer, Result), answer
    assert _attempts(tail) == {answer.request_id: [(1, "BackendsExhausted"), (2, None)]}
    assert _retries(tail) == ["retry.5s"] and tail.of("dlq") == []
    (waiting,) = tail.messages("retry.5s")
    due_ms = int(header(Consumed.from_message(waiting).headers, NOT_BEFORE) or b"0")
    second = [m for m in tail.messages("executions") if m.timestamp()[1] > waiting.timestamp()[1]]
    executed_ms = min(m.timestamp()[1] for m in second)
    print(
        f"retry written at 0 ms, due at +{due_ms - waiting.timestamp()[1]:.0f} ms; router "
        f"{stop.name} at +{stopped_ms - waiting.timestamp()[1]:.0f} ms, exited at "
        f"+{exited_ms - waiting.timestamp()[1]:.0f} ms; attempt 2 executed at "
        f"+{executed_ms - waiting.timestamp()[1]:.0f} ms ({executed_ms - due_ms:.0f} ms after due)"
    )
    assert stopped_ms < due_ms <= executed_ms  # stopped during the wait; forwarded once due
