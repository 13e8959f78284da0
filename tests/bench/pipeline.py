"""Figure 2, the DSPex pipeline: AsyncClient -> router -> pool worker(s) -> client.

Workloads on one started client: saturation with unique inputs and ``cache=False``
(every request runs DSPy on a worker), saturation with one deterministic request
repeated (answered by the router's cache), and open-loop latency at a fixed rate
(latency counted from each request's scheduled send time, so a slow system
cannot hide its queueing).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from dspex.streams.client.client import AsyncClient, Result
from dspex.streams.errors import DSPexError
from tests.bench.config import question
from tests.bench.messages import PROGRAM
from tests.bench.stats import latency_ms, rate
from tests.bench.trace import Sample

logger = logging.getLogger(__name__)

DEADLINE_S = 60.0
"""Far beyond any latency seen here: a request unanswered by then was lost, and is counted."""
HIT_QUESTION = "What is the capital of France? (the cached question)"


def _failures(results: list[Result | DSPexError], cached: bool) -> dict[str, Any]:
    """Requests that failed or timed out (lost), and answers not (or wrongly) cached."""
    failed = [r for r in results if isinstance(r, DSPexError)]
    wrong = [r for r in results if isinstance(r, Result) and r.cached != cached]
    found: dict[str, Any] = {"failed": len(failed), "wrong_cache_flag": len(wrong)}
    if failed:
        found["first_error"] = f"{type(failed[0]).__name__}: {failed[0]}"
        logger.warning("%d/%d requests failed: %s", len(failed), len(results), found["first_error"])
    return found


async def saturate(
    client: AsyncClient, count: int, *, cache_hits: bool, offset: int = 0
) -> dict[str, Any]:
    """Submit ``count`` requests at once (``submit_many``); requests/s until the last answer."""
    if cache_hits:
        requests = [(PROGRAM, {"question": HIT_QUESTION})] * count
    else:
        requests = [(PROGRAM, {"question": question(offset + i)}) for i in range(count)]
    started = time.perf_counter()
    results = await client.submit_many(requests, cache=cache_hits, deadline_s=DEADLINE_S)
    elapsed = time.perf_counter() - started
    return {
        "requests": count,
        "elapsed_s": round(elapsed, 3),
        "per_s": rate(count, elapsed),
        **_failures(results, cache_hits),
    }


async def warm_cache(client: AsyncClient, attempts: int = 100) -> int:
    """Ask the cached question until the router answers it from its cache; return the tries."""
    for attempt in range(1, attempts + 1):
        try:
            result = await client.submit(PROGRAM, {"question": HIT_QUESTION}, deadline_s=10)
        except DSPexError as exc:  # e.g. a request lost by a restarting router: ask again
            logger.warning("cache warm-up request failed: %s", exc)
            continue
        if result.cached:
            return attempt
        await asyncio.sleep(0.1)
    raise RuntimeError(f"the router did not cache the answer after {attempts} requests")


async def warm_up(client: AsyncClient, count: int, offset: int) -> None:
    """A few cache misses so every worker has built the program and the LM."""
    await saturate(client, count, cache_hits=False, offset=offset)


async def paced(
    client: AsyncClient,
    per_s: float,
    duration_s: float,
    *,
    cache_hits: bool,
    offset: int = 0,
    traced: list[Sample] | None = None,
) -> dict[str, Any]:
    """Open loop at ``per_s`` for ``duration_s``: latency percentiles, scheduled send to answer.

    ``traced`` collects every answered request's id, scheduled and answer times
    (for :func:`tests.bench.trace.breakdown`).
    """
    loop = asyncio.get_running_loop()
    wall_offset_s = time.time() - loop.time()
    count = max(int(per_s * duration_s), 1)
    start = loop.time() + 0.05
    tasks = []
    for i in range(count):
        scheduled = start + i / per_s
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        inputs = {"question": HIT_QUESTION if cache_hits else question(offset + i)}
        tasks.append(asyncio.create_task(_timed(client, inputs, cache_hits, scheduled)))
    outcomes = await asyncio.gather(*tasks)
    timed = [o for o in outcomes if isinstance(o, tuple)]
    if traced is not None:
        for request_id, scheduled, answered in timed:
            wall = [(t + wall_offset_s) * 1000 for t in (scheduled, answered)]
            traced.append(Sample(request_id, *wall))
    late = loop.time() - (start + count / per_s)
    latencies = [answered - scheduled for _, scheduled, answered in timed]
    failures = _failures([o for o in outcomes if not isinstance(o, tuple)], cache_hits)
    summary = {"rate_per_s": per_s, "lag_at_end_s": round(late, 3), **latency_ms(latencies)}
    return {**summary, **failures}


async def _timed(
    client: AsyncClient, inputs: dict[str, str], cache_hits: bool, scheduled: float
) -> tuple[str, float, float] | Result | DSPexError:
    """(request id, scheduled, answered) in loop time, or the failure / the wrongly
    cached answer (counted, not timed)."""
    try:
        result = await client.submit(PROGRAM, inputs, cache=cache_hits, deadline_s=DEADLINE_S)
    except DSPexError as exc:
        return exc
    if result.cached != cache_hits:
        return result
    return result.request_id, scheduled, asyncio.get_running_loop().time()
