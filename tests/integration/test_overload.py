"""Three times the sustainable rate on the real stack: bounded memory, answers for all.

One general-pool worker with 4 requests in flight runs a SIMULATED model that
takes 0.1 s per call (``dspex/sim?task=echo&delay=0.1``): it sustains about
4 / 0.1 = 40 requests/s. The test sends 120 requests/s for 10 s with 3 s
deadlines. Requests wait in Kafka, not in RAM (the worker pauses its partitions
at its in-flight limit); those whose deadline passes before a worker reaches them
are answered ``overloaded``, those that started but could not finish in time
``timeout``. Counted: sent, ok, overloaded, other, lost, the
resident memory of the router and the worker before and during the run, and the
largest in-flight count the worker reported. Run with ``-s`` to see them.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from pathlib import Path

from dspex.streams.client.client import AsyncClient, Program, RequestFailed, Result
from dspex.streams.errors import DSPexError
from dspex.streams.settings import Settings, load_settings
from tests.integration.tail import OpenTail
from tests.integration.test_end_to_end import (  # noqa: F401 - the fixture is used by name
    StartStack,
    start_stack,
)

RATE, SECONDS, DEADLINE_S, IN_FLIGHT, DELAY_S = 120, 10, 3.0, 4, 0.1
SLOW = f"dspex/sim?task=echo&delay={DELAY_S}"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def overload_settings(settings: Settings) -> Settings:
    return load_settings(
        kafka={"bootstrap_servers": settings.kafka.bootstrap_servers},
        topics={"prefix": settings.topics.prefix},
        lm={"backends": {"slow": {"model": SLOW}}, "default_variant": "slow", "pool_variants": {}},
        pools={"general": {"processes": 1, "in_flight": IN_FLIGHT, "max_processes": 1}},
        router={"cache_enabled": False},
    )


async def test_three_times_the_sustainable_rate_stays_bounded_and_answers_everyone(
    settings: Settings,
    start_stack: StartStack,  # noqa: F811 - the fixture imported above
    tails: OpenTail,
) -> None:
    settings = overload_settings(settings)
    stack = start_stack(settings, ["general"])
    pids = {name: process.pid for name, process in stack.processes.items()}
    before = {name: rss_mb(pid) for name, pid in pids.items()}
    peak = dict(before)
    tail = tails(["telemetry"], settings=settings)
    program = Program.inline("question -> answer")

    async def one(client: AsyncClient, question: str) -> Result | DSPexError:
        try:
            return await client.submit(program, {"question": question}, deadline_s=DEADLINE_S)
        except DSPexError as exc:
            return exc

    async with AsyncClient(settings) as client:
        tasks = []
        started = time.monotonic()
        for tick in range(RATE * SECONDS // 10):  # 10 requests every 1/12 s
            questions = [f"load {tick}.{n} {uuid.uuid4().hex[:6]}" for n in range(10)]
            tasks += [asyncio.create_task(one(client, q)) for q in questions]
            for name, pid in pids.items():
                peak[name] = max(peak[name], rss_mb(pid))
            await asyncio.sleep(max(0.0, started + (tick + 1) * 10 / RATE - time.monotonic()))
        outcomes = await asyncio.gather(*tasks)
    stack.check_alive()
    health = [r["health"] for r in tail.of("telemetry") if r["kind"] == "health"]

    statuses = Counter(
        "ok"
        if isinstance(o, Result)
        else (o.status if isinstance(o, RequestFailed) else type(o).__name__)
        for o in outcomes
    )
    growth = {name: round(peak[name] - before[name], 1) for name in pids}
    most_in_flight = max((h["in_flight"] for h in health), default=0)
    print(
        f"\noverload: sent {len(outcomes)} at {RATE}/s (~3x the ~{IN_FLIGHT / DELAY_S:.0f}/s a "
        f"worker sustains), answered {dict(statuses)}; RSS MB before {before} peak {peak} "
        f"(growth {growth}); worker in flight at most {most_in_flight} (limit {IN_FLIGHT})"
    )
    assert len(outcomes) == RATE * SECONDS
    # every request answered: ok, overloaded (expired waiting in Kafka) or timeout
    # (started in time, cut off at its deadline); no client gave up waiting
    assert set(statuses) <= {"ok", "overloaded", "timeout"}, statuses
    assert statuses["ok"] > 0 and statuses["overloaded"] > 0
    assert all(g < 200 for g in growth.values()), growth  # waiting happens in Kafka
    assert most_in_flight <= IN_FLIGHT
