"""Figure 3, in-process DSPy: the same Predict program called directly with EchoLM.

The module is built the way the worker builds it (``ProgramBuilder``), with DSPy's
LM cache off, so every call runs the adapter, the simulated LM and the parser.
Four ways: a plain synchronous loop (the throughput reference), a sequential loop
through ``dspex.agents.runtime.programs.run`` (the worker's code path), ``run`` with asyncio
concurrency, and ``run`` one call at a time at the pipeline's paced rate (the latency
reference for the orchestration overhead: a call after 10 ms of idleness took about
twice as long here as one in a tight loop, and the pipeline's paced requests pay that
too, so subtracting the tight loop's latency would count it as orchestration).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import dspy

from dspex.agents.runtime.lms.echo import EchoLM
from dspex.agents.runtime.programs import ProgramBuilder, ProgramSpec, run
from dspex.agents.runtime.tools import default_tools
from tests.bench.config import SIGNATURE, question
from tests.bench.stats import latency_ms, rate


def build_module() -> dspy.Module:
    """The Predict ``question -> answer`` module, built like the worker builds it."""
    return ProgramBuilder(default_tools()).build(ProgramSpec(SIGNATURE))


def sync_loop(calls: int) -> dict[str, Any]:
    """A plain ``module(question=...)`` loop: the reference in-process throughput."""
    module, lm = build_module(), EchoLM()
    durations: list[float] = []
    with dspy.context(lm=lm, disable_history=True):
        module(question=question(-1))
        started = time.perf_counter()
        for i in range(calls):
            t0 = time.perf_counter()
            module(question=question(i))
            durations.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - started
    return {"calls": calls, "per_s": rate(calls, elapsed), "latency_ms": latency_ms(durations)}


async def _run_loop(calls: int) -> dict[str, Any]:
    module, lm = build_module(), EchoLM()
    await run(module, {"question": question(-1)}, lm=lm)
    durations: list[float] = []
    started = time.perf_counter()
    for i in range(calls):
        t0 = time.perf_counter()
        await run(module, {"question": question(i)}, lm=lm)
        durations.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - started
    return {"calls": calls, "per_s": rate(calls, elapsed), "latency_ms": latency_ms(durations)}


async def _run_concurrent(calls: int, concurrency: int) -> dict[str, Any]:
    module, lm = build_module(), EchoLM()
    slots = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with slots:
            await run(module, {"question": question(i)}, lm=lm)

    await one(-1)
    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(calls)))
    elapsed = time.perf_counter() - started
    return {"calls": calls, "concurrency": concurrency, "per_s": rate(calls, elapsed)}


async def _run_paced(calls: int, per_s: float) -> dict[str, Any]:
    """``run`` one call at a time, open loop at ``per_s`` calls/s (the pipeline's paced rate)."""
    module, lm = build_module(), EchoLM()
    await run(module, {"question": question(-1)}, lm=lm)
    durations: list[float] = []
    due = time.perf_counter()
    for i in range(calls):
        due += 1.0 / per_s
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        t0 = time.perf_counter()
        await run(module, {"question": question(i)}, lm=lm)
        durations.append(time.perf_counter() - t0)
    return {"calls": calls, "rate": per_s, "latency_ms": latency_ms(durations)}


def measure(calls: int, concurrency: int, paced_rate: float, paced_calls: int) -> dict[str, Any]:
    """All four in-process figures."""
    return {
        "sync_loop": sync_loop(calls),
        "run_sequential": asyncio.run(_run_loop(calls)),
        "run_concurrent": asyncio.run(_run_concurrent(calls, concurrency)),
        "run_paced": asyncio.run(_run_paced(paced_calls, paced_rate)),
    }


def profile_text(calls: int) -> str:
    """A pyinstrument text profile of the sequential ``run`` loop."""
    from pyinstrument import Profiler

    profiler = Profiler(async_mode="disabled")
    with profiler:
        asyncio.run(_run_loop(calls))
    return str(profiler.output_text(unicode=True, color=False, show_all=False))
