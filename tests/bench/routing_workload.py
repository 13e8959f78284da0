"""The routing benchmark's workload and its figures: toy questions with gold answers.

Every arm answers the same sequence of questions ("#000123 What is 17 + 25? ..."),
built from the run's seed, with the same number of concurrent callers
(closed loop: each caller sends its next question when the previous one is
answered). :func:`drive` runs one arm's sequence and can run a hook, with
sending paused, just before a given question (the mid-run degradation).
:func:`phase_figures` and :func:`traffic_shift` turn the outcomes and the
simulated backends' call log into the report's figures.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tests.bench.routing_sim import iter_first_calls
from tests.bench.stats import latency_ms, percentile


@dataclass(frozen=True)
class Task:
    """One question of the workload and its gold answer."""

    qid: int
    question: str
    gold: str


@dataclass(frozen=True)
class Outcome:
    """What one question got: the answer (None when it failed), whether it is right, when."""

    qid: int
    sent_at: float
    done_at: float
    answer: str | None
    correct: bool
    error: str | None = None


Ask = Callable[[Task], Awaitable[str]]
"""Sends one question through an arm and returns the answer text; raises when it fails."""


def tasks(count: int, seed: int, first_qid: int = 0) -> list[Task]:
    """``count`` questions from ``seed``: two-digit sums, each with a unique id."""
    rng = random.Random(seed)
    out = []
    for qid in range(first_qid, first_qid + count):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        question = f"#{qid:06d} What is {a} + {b}? Reply with the number only."
        out.append(Task(qid, question, str(a + b)))
    return out


def is_correct(answer: str | None, gold: str) -> bool:
    """Exact match after trimming whitespace (the toy task's metric)."""
    return answer is not None and answer.strip() == gold


async def drive(
    work: Sequence[Task],
    concurrency: int,
    ask: Ask,
    hooks: dict[int, Callable[[], Awaitable[None]]] | None = None,
) -> list[Outcome]:
    """Ask every question with ``concurrency`` callers; ``hooks[i]`` runs before question ``i``.

    Questions are sent in order; while a hook runs nobody sends, so the hook's
    effect (a degraded backend) is in place for question ``i`` and every later one.
    """
    hooks = dict(hooks or {})
    queue = iter(enumerate(work))
    gate = asyncio.Lock()
    outcomes: list[Outcome] = []

    async def caller() -> None:
        while True:
            async with gate:
                nxt = next(queue, None)
                if nxt is None:
                    return
                hook = hooks.pop(nxt[0], None)
                if hook is not None:
                    await hook()
            outcomes.append(await _ask_one(ask, nxt[1]))

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return sorted(outcomes, key=lambda o: o.qid)


async def _ask_one(ask: Ask, task: Task) -> Outcome:
    sent = time.monotonic()
    try:
        answer = await ask(task)
    except Exception as exc:  # a failed request is a figure, not a crash
        return Outcome(task.qid, sent, time.monotonic(), None, False, type(exc).__name__)
    return Outcome(task.qid, sent, time.monotonic(), answer, is_correct(answer, task.gold))


def phase_figures(
    outcomes: Sequence[Outcome], calls: Sequence[dict[str, Any]], backends: Sequence[str]
) -> dict[str, Any]:
    """The objective and what is behind it, for one phase of one arm."""
    if not outcomes:
        return {"requests": 0}
    qids = {o.qid for o in outcomes}
    elapsed = max(o.done_at for o in outcomes) - min(o.sent_at for o in outcomes)
    answered = [o for o in outcomes if o.answer is not None]
    correct = sum(o.correct for o in outcomes)
    mine = [c for c in calls if c["qid"] in qids]
    return {
        "requests": len(outcomes),
        "answered": len(answered),
        "failed": len(outcomes) - len(answered),
        "correct": correct,
        "elapsed_s": round(elapsed, 3),
        "correct_per_s": round(correct / elapsed, 3) if elapsed > 0 else 0.0,
        "answered_per_s": round(len(answered) / elapsed, 3) if elapsed > 0 else 0.0,
        "accuracy": round(correct / len(answered), 4) if answered else 0.0,
        "latency_ms": latency_ms([o.done_at - o.sent_at for o in answered]),
        "share": first_call_share(mine, backends),
        "backend_calls_per_request": round(len(mine) / len(outcomes), 3),
        "correct_per_backend_s": _per_backend_second(correct, mine),
        "backend_errors": sum(1 for c in mine if c["status"] != 200),
        "outside_backend_ms": _outside_backend(answered, mine),
        "errors": _error_counts(outcomes),
    }


def first_call_share(calls: Sequence[dict[str, Any]], backends: Sequence[str]) -> dict[str, float]:
    """Share of questions whose first call went to each backend (the routing decision)."""
    firsts = [backend for _, backend in iter_first_calls(list(calls))]
    total = len(firsts) or 1
    return {name: round(firsts.count(name) / total, 4) for name in backends}


def _outside_backend(
    answered: Sequence[Outcome], calls: Sequence[dict[str, Any]]
) -> dict[str, float]:
    """End-to-end latency minus time spent inside the backends: transport, queueing, retry waits."""
    inside: dict[int, float] = {}
    for call in calls:
        inside[call["qid"]] = inside.get(call["qid"], 0.0) + call["service_s"]
    outside = [(o.done_at - o.sent_at - inside.get(o.qid, 0.0)) * 1000 for o in answered]
    figures = {f"p{q}": round(percentile(outside, q), 1) for q in (50, 95, 99)}
    figures["mean"] = round(sum(outside) / len(outside), 1) if outside else 0.0
    return figures


def _per_backend_second(correct: int, calls: Sequence[dict[str, Any]]) -> float:
    """Correct answers per second spent inside backends: the routing choice without transport."""
    busy = sum(call["service_s"] for call in calls)
    return round(correct / busy, 3) if busy > 0 else 0.0


def _error_counts(outcomes: Sequence[Outcome]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in outcomes:
        if o.error:
            counts[o.error] = counts.get(o.error, 0) + 1
    return counts


def traffic_shift(
    outcomes: Sequence[Outcome],
    calls: Sequence[dict[str, Any]],
    degraded: str,
    at: int,
    window: int,
    threshold: float,
) -> dict[str, Any]:
    """How many questions after ``at`` until ``degraded`` gets under ``threshold`` of traffic.

    ``requests_to_shift`` is the first offset from ``at`` (in send order) from
    which ``degraded`` gets under ``threshold`` of the first calls both in the
    next ``window`` questions and in all the rest of the run — so a lucky window
    of a router that never moved does not count. None when there is no such offset.
    """
    firsts = dict(iter_first_calls(list(calls)))
    order = [o.qid for o in outcomes if o.qid in firsts]
    sent = {o.qid: o.sent_at for o in outcomes}
    start = next((i for i, qid in enumerate(order) if qid >= at), len(order))
    hits = [firsts[q] == degraded for q in order[start:]]
    found = _first_low(hits, window, threshold)
    seconds = None
    if found is not None:
        seconds = round(sent[order[start + found]] - sent[order[start]], 2)
    before = [firsts[q] == degraded for q in order[max(start - window, 0) : start]]
    return {
        "degraded": degraded,
        "at_request": at,
        "window": window,
        "threshold": threshold,
        "share_before": round(sum(before) / len(before), 3) if before else None,
        "share_after_shift": _share(hits[found:]) if found is not None else None,
        "share_at_end": _share(hits[-window:]),
        "requests_to_shift": found,
        "seconds_to_shift": seconds,
    }


def _first_low(hits: Sequence[bool], window: int, threshold: float) -> int | None:
    """The first offset where the next ``window`` and the whole rest are under ``threshold``."""
    rest = [0] * (len(hits) + 1)  # rest[i] = hits from i to the end
    for i in range(len(hits) - 1, -1, -1):
        rest[i] = rest[i + 1] + hits[i]
    for offset in range(len(hits) - window + 1):
        next_share = sum(hits[offset : offset + window]) / window
        if next_share < threshold and rest[offset] / (len(hits) - offset) < threshold:
            return offset
    return None


def _share(hits: Sequence[bool]) -> float | None:
    return round(sum(hits) / len(hits), 3) if hits else None
