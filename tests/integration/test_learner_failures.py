"""Failures reach the learning agent: a flaky backend behind retries and a fallback, real broker.

The whole path runs as real processes (router and a general-pool worker, ``python -m
dspex.agents``) against SIMULATED LM backends (``tests/bench/routing_sim.py``: HTTP
servers on 127.0.0.1, nothing is a model): ``flaky`` fails 30 % of its calls with HTTP
500, ``steady`` never fails; each falls back to the other. The worker retries a call
once and then hands over to the fallback, so the client sees an answer either way;
only the worker's "attempt" Telemetry tells the learner that ``flaky`` gave up.
Then ``steady``, which by then carries the traffic, fails every call: its circuit
breaker opens in the worker and the published table says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from dspex.agents.learner.learner import LearnerApp, make_learner
from dspex.streams.client.client import AsyncClient
from dspex.streams.errors import DSPexError
from dspex.streams.settings import BanditConfig, LearnerSettings, Settings
from tests.bench.routing_dspex import PROGRAM_ID, SIGNATURE, publish_table, uniform_table
from tests.bench.routing_sim import Backend, Degradation, SimFleet
from tests.bench.routing_workload import tasks
from tests.integration.stack import Stack
from tests.integration.tail import OpenTail, Tail, until

FLAKY = Backend("flaky", median_ms=60.0, sigma=0.2, error_rate=0.3, error_status=500, quality=1.0)
STEADY = Backend("steady", median_ms=60.0, sigma=0.2, error_rate=0.0, error_status=500, quality=1.0)


def _settings(base: Settings, fleet: SimFleet) -> Settings:
    backends = dict(base.lm.backends)
    for name in ("flaky", "steady"):
        backends[name] = backends["echo"].model_copy(
            update={
                "model": f"openai/{name}",
                "api_base": fleet.api_base(name),
                # the simulation takes any key; this one survives agent_env's masked dump
                "api_key": SecretStr("**********"),
            }
        )
    reliability = base.reliability.model_copy(
        update={
            "retry_attempts": 2,
            "retry_base_s": 0.05,
            "breaker_fail_max": 4,
            "fallbacks": {"flaky": ["steady"], "steady": ["flaky"]},
        }
    )
    learner = LearnerSettings(
        bandit=BanditConfig(half_life_s=3_600.0), seed=7, publish_interval_s=0.5
    )
    lm = base.lm.model_copy(update={"backends": backends, "default_variant": "steady"})
    return base.model_copy(update={"lm": lm, "reliability": reliability, "learner": learner})


def _tables(watcher: Tail) -> list[dict[str, Any]]:
    return [t for t in watcher.of("routing") if t["program_id"] == PROGRAM_ID]


def _row(table: dict[str, Any], variant: str) -> dict[str, Any]:
    """The table's statistics of ``variant`` (none in the hand-written first table)."""
    empty = {"variant": variant, "count": 0.0, "successes": 0.0}
    return next((r for r in table["learned_from"] if r["variant"] == variant), empty)


def _weight(table: dict[str, Any], variant: str) -> float:
    return float(next(v["weight"] for v in table["variants"] if v["name"] == variant))


async def _ask(client: AsyncClient, count: int, first_qid: int) -> int:
    """``count`` questions, 4 at a time; how many were answered."""
    answered = 0
    gate = asyncio.Semaphore(4)

    async def one(question: str) -> None:
        nonlocal answered
        async with gate:
            try:
                await client.submit(PROGRAM_ID, {"question": question}, cache=False, deadline_s=60)
                answered += 1
            except DSPexError:
                pass

    await asyncio.gather(*(one(t.question) for t in tasks(count, 3, first_qid)))
    return answered


async def test_a_flaky_variant_behind_retries_and_a_fallback_loses_weight_and_shows_failures(
    settings: Settings,
    create_topics: Callable[[], object],
    tails: OpenTail,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network fetch at import
    create_topics()
    watcher = tails(("routing",), from_beginning=True)
    with SimFleet([FLAKY, STEADY], seed=3) as fleet:
        settings = _settings(settings, fleet)
        publish_table(settings, uniform_table([FLAKY, STEADY]))
        stack = Stack(settings, ["general"], tmp_path)
        app_id = f"{settings.topics.prefix}learner"
        learner: LearnerApp = make_learner(settings, app_id=app_id)
        stack.start()
        try:
            async with AsyncClient(settings) as client:
                await client.publish_program(PROGRAM_ID, SIGNATURE)
                started = time.monotonic()
                # under the uniform table (the learner starts after, from the earliest
                # telemetry): ~80 requests to flaky make a give-up all but certain (each
                # gives up with p = 0.3 x 0.3); under the learner's first tables flaky got
                # ~25 requests, and in one CI run not one of them gave up
                answered = await _ask(client, 160, 0)
                steady_s = time.monotonic() - started
                await learner.start()
                flaky_calls = [c for c in fleet.calls() if c["backend"] == "flaky"]
                failed_calls = sum(1 for c in flaky_calls if c["status"] != 200)
                table = await until(
                    lambda: next(
                        (t for t in _tables(watcher)[::-1] if _row(t, "flaky")["count"] >= 10),
                        None,
                    ),
                    60,
                    "a table that learned from flaky",
                )
                await asyncio.sleep(3.0)  # the last table counts the last telemetry
                table = _tables(watcher)[-1]
                flaky, steady = _row(table, "flaky"), _row(table, "steady")
                print(
                    f"\n160 requests in {steady_s:.1f} s, {answered} answered; flaky: "
                    f"{failed_calls} of {len(flaky_calls)} calls failed; table "
                    f"v{table['version']} weights flaky {_weight(table, 'flaky')} steady "
                    f"{_weight(table, 'steady')}; learned_from flaky {flaky['successes']}/"
                    f"{flaky['count']} steady {steady['successes']}/{steady['count']}; "
                    f"reason: {table['reason']}"
                )
                assert answered == 160  # retries and the fallback hid every failure from clients
                assert failed_calls > 0
                assert flaky["successes"] < flaky["count"]  # the give-ups reached the learner
                assert steady["successes"] == steady["count"]
                assert _weight(table, "flaky") < _weight(table, "steady")

                # now the backend carrying the traffic fails every call: it cools down
                # (failures in a row or its breaker open) and loses the traffic, even when
                # flaky's breaker is open too (then both cool, and flaky, failing fewer
                # calls in a row or out of its cooldown first and half-open, takes it)
                fleet.degrade(
                    Degradation(latency_factor=1.0, error_rate=1.0, error_status=500),
                    window=0,
                    backend="steady",
                )
                broke = time.monotonic()
                seen = len(_tables(watcher))

                def cooled(table: dict[str, Any]) -> bool:
                    return bool(re.search(r"variant steady cooling down \d+ s: ", table["reason"]))

                def moved_off() -> dict[str, Any] | None:
                    return next(
                        (
                            t
                            for t in _tables(watcher)[seen:]
                            if cooled(t) and _weight(t, "steady") <= 0.05
                        ),
                        None,
                    )

                sent = 0
                while sent < 600 and moved_off() is None:
                    await _ask(client, 20, 1_000 + sent)
                    sent += 20
                moved = await until(moved_off, 30, "a table moving off steady")
                first = next(t for t in _tables(watcher)[seen:] if cooled(t))
                print(
                    f"steady fails every call: first cooldown table v{first['version']} "
                    f"(weights steady {_weight(first, 'steady')}; {first['reason']}); moved off "
                    f"in v{moved['version']} {time.monotonic() - broke:.1f} s and <= {sent} "
                    f"requests later: weights steady {_weight(moved, 'steady')} flaky "
                    f"{_weight(moved, 'flaky')}; reason: {moved['reason']}"
                )
                assert moved["fallback"][-1] == "steady"
        finally:
            with contextlib.suppress(Exception):  # never started if the first phase failed
                await learner.stop()
            stack.stop()
