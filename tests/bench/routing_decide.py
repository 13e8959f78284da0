"""``python -m tests.bench.routing_decide [--quick] [--runs N] [--out DIR]``: routing scenarios.

The routing *decision* under scenarios of issue 20, on a SIMULATED clock: no
broker, no processes, nothing is a model. It runs the real learning agent
(:class:`~dspex.agents.learner.learner.Learner`, fed Telemetry records as the worker
writes them, its tables applied by a router after a delay) against the simulated
backends' draws of ``tests/bench/routing_sim.py`` (latency, HTTP error, right or
wrong answer: a pure function of seed, backend, question and call), behind a model
of the worker's fault handling (retries with jittered backoff, a circuit breaker per
backend, fallback to the other backends). ``make bench-routing`` measures the whole
pipeline on real processes; this measures what the decision does with the same
evidence, in seconds, so every scenario can be repeated.

Arms, all on the same question sequence and the same draws, with ``concurrency``
closed-loop callers:

* ``learned`` — the learning agent, ``latency`` objective (correct answers per second
  of a caller's time, the quantity measured); ``learned-balanced`` — its ``balanced``
  objective;
* ``fixed-X`` — every request to backend X (the best of them is "best fixed");
* ``uniform`` — an equal split;
* ``latency-router`` — a MODEL of LiteLLM's latency-based routing: the backend with
  the lowest mean latency over its last 10 successful calls (untried first), cooled
  down for 5 s after 3 failures within a minute (LiteLLM's ``allowed_fails``,
  ``cooldown_time``). It is not LiteLLM itself; the end-to-end benchmark runs that.

Writes ``DIR/routing-scenarios.json`` and ``DIR/routing-share-<scenario>.png``
(traffic share over time per arm) and prints a table.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import os
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dspex.agents.learner.learner import Learner
from dspex.agents.plumbing.catalog import RoutingCatalog
from dspex.schemas import records
from dspex.streams.serde import make_serde
from dspex.streams.settings import LearnerSettings, Objective, load_settings
from tests.bench.routing_sim import Backend, draw

PROGRAM = "routing.qa"
TELEMETRY_DELAY_S = 0.3  # worker -> telemetry topic -> learner
TABLE_DELAY_S = 0.5  # learner -> routing topic -> router
OVERHEAD_S = 0.02  # transport per request, the same for every arm
RETRY_ATTEMPTS, RETRY_BASE_S = 3, 0.2  # the worker's defaults (settings.reliability)
BREAKER_FAIL_MAX, BREAKER_RESET_S = 5, 30.0


def _b(name: str, ms: float, errors: float, quality: float) -> Backend:
    return Backend(name, ms, 0.35, errors, 500, quality)


# The issue's four backends. D's answer quality is not given there; 0.5 makes B the
# best fixed choice before the drift, as it was in the issue's runs.
ISSUE = (
    _b("A", 250, 0.0, 0.45),
    _b("B", 400, 0.0, 0.95),
    _b("C", 1100, 0.0, 0.98),
    _b("D", 160, 0.30, 0.5),
)


@dataclass(frozen=True)
class Change:
    """At ``at_s``, backend ``name`` takes new latency/error/quality (None: unchanged)."""

    at_s: float
    name: str
    latency_factor: float = 1.0
    error_rate: float | None = None
    quality: float | None = None


@dataclass(frozen=True)
class Scenario:
    name: str
    backends: tuple[Backend, ...]
    duration_s: float
    changes: tuple[Change, ...] = ()
    degraded: str | None = None
    """The backend that gets worse at the first change: time and requests to move off it."""
    improved: str | None = None
    """The backend that becomes the best: time until it gets the majority of traffic."""
    recover_at_s: float | None = None


SCENARIOS = {
    "stationary": Scenario("stationary", ISSUE, 120.0),
    "sudden-failure": Scenario(
        "sudden-failure",
        ISSUE,
        180.0,
        (Change(60.0, "B", error_rate=1.0), Change(120.0, "B", error_rate=0.0)),
        degraded="B",
        recover_at_s=120.0,
    ),
    "rare-improves": Scenario(
        "rare-improves", ISSUE, 180.0, (Change(60.0, "A", quality=0.97),), improved="A"
    ),
    "latency-only": Scenario(
        "latency-only",
        (_b("A", 300, 0.02, 0.9), _b("B", 450, 0.02, 0.9), _b("C", 1500, 0.01, 0.9)),
        120.0,
    ),
    "drift": Scenario(
        "drift",
        ISSUE,
        180.0,
        (
            Change(90.0, "B", latency_factor=4.0, error_rate=0.4),
            Change(90.0, "A", quality=0.93),
        ),
        degraded="B",
        improved="A",
    ),
}


@dataclass
class _Breaker:
    fails: int = 0
    open_until: float = 0.0


@dataclass
class _Served:
    """What happened to one question."""

    qid: int
    sent_at: float
    done_at: float
    first: str
    correct: bool
    answered: bool


class _Fleet:
    """Backend profiles over time, the worker's fault model, and the call draws."""

    def __init__(self, scenario: Scenario, seed: int, t0: float) -> None:
        self.scenario = scenario
        self.seed = seed
        self.t0 = t0
        self.names = [b.name for b in scenario.backends]
        self.breakers = {name: _Breaker() for name in self.names}

    def profile(self, name: str, t: float) -> tuple[Backend, float]:
        backend = next(b for b in self.scenario.backends if b.name == name)
        factor = 1.0
        for change in self.scenario.changes:
            if change.name == name and t - self.t0 >= change.at_s:
                factor = change.latency_factor
                if change.error_rate is not None:
                    backend = replace(backend, error_rate=change.error_rate)
                if change.quality is not None:
                    backend = replace(backend, quality=change.quality)
        return backend, factor

    def run(self, qid: int, first: str, t: float) -> tuple[float, list[dict[str, Any]], bool, bool]:
        """(finish time, telemetry records, answered, correct) of one request from ``t``."""
        order = [first, *[n for n in self.names if n != first]]
        rng = random.Random(f"{self.seed}|backoff|{qid}")
        now = t + OVERHEAD_S
        attempts: list[dict[str, Any]] = []
        for name in order:
            breaker = self.breakers[name]
            if breaker.open_until > now:
                attempts.append(_attempt(name, "CircuitOpen", now))
                continue
            for call in range(RETRY_ATTEMPTS):
                backend, factor = self.profile(name, now)
                fate = draw(self.seed, backend, qid, call)
                latency = fate.latency_s * factor
                now += latency * (0.1 if fate.error else 1.0)
                if not fate.error:
                    breaker.fails = 0
                    done = _execution(name, now, (now - t) * 1000, True, fate.correct)
                    return now, [*attempts, done], True, fate.correct
                breaker.fails += 1
                if breaker.fails >= BREAKER_FAIL_MAX:
                    breaker.open_until, breaker.fails = now + BREAKER_RESET_S, 0
                    break
                if call + 1 < RETRY_ATTEMPTS:
                    now += rng.uniform(0.0, RETRY_BASE_S * 2**call)
            attempts.append(_attempt(name, "InternalServerError", now))
        done = _execution(first, now, (now - t) * 1000, False, False)
        others = [a for a in attempts if a["variant"] != first]  # as the worker reports them
        return now, [*others, done], False, False


def _stamp(at_s: float) -> datetime:
    return datetime.fromtimestamp(at_s, UTC)


def _attempt(variant: str, error_class: str, at_s: float) -> dict[str, Any]:
    return records.telemetry(
        kind="attempt",
        program_id=PROGRAM,
        pool="general",
        variant=variant,
        emitted_at=_stamp(at_s),
        success=False,
        error_class=error_class,
    )


def _execution(variant: str, at_s: float, ms: float, ok: bool, correct: bool) -> dict[str, Any]:
    return records.telemetry(
        kind="execution",
        program_id=PROGRAM,
        pool="general",
        variant=variant,
        emitted_at=_stamp(at_s),
        latency_ms=ms,
        success=ok,
        error_class=None if ok else "BackendsExhausted",
        quality=(1.0 if correct else 0.0) if ok else None,
    )


Chooser = Callable[[int, float], str]


class _LearnedRouter:
    """The learning agent on the simulated clock; the router applies its tables late."""

    def __init__(self, names: Sequence[str], seed: int, objective: str, t0: float) -> None:
        self.clock = t0
        settings = load_settings()
        config = LearnerSettings(
            objectives={"*": Objective(kind=objective)},  # type: ignore[arg-type]
            candidates=dict.fromkeys(names, "general"),
            seed=seed,
        )
        self.learner = Learner(
            settings,
            config,
            make_serde(settings),
            {},
            RoutingCatalog(),
            lambda: self.clock,
            random.Random(seed),
        )
        self.weights = dict.fromkeys(names, 1.0 / len(names))
        self.pending: list[tuple[float, dict[str, float]]] = []
        self.tables: list[dict[str, Any]] = []
        self.seed = seed

    def observe(self, record: dict[str, Any]) -> None:
        self.learner.observe(record)

    def tick(self, now: float) -> None:
        self.clock = now
        for _, table in self.learner.due_tables():
            weights = {v["name"]: v["weight"] for v in table["variants"]}
            self.pending.append((now + TABLE_DELAY_S, weights))
            self.tables.append({"at": now, "weights": weights, "reason": table["reason"]})
        while self.pending and self.pending[0][0] <= now:
            self.weights = self.pending.pop(0)[1]

    def choose(self, qid: int, _: float) -> str:
        names = sorted(self.weights)
        rng = random.Random(f"{self.seed}|route|{qid}")
        return rng.choices(names, [self.weights[n] for n in names])[0]


class _LatencyRouter:
    """A model of LiteLLM's latency-based routing with its cooldown (see the module doc)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.latencies: dict[str, list[float]] = {n: [] for n in names}
        self.failures: dict[str, list[float]] = {n: [] for n in names}
        self.cool_until = dict.fromkeys(names, 0.0)

    def observe(self, record: dict[str, Any], now: float) -> None:
        name = record["variant"]
        if record["kind"] == "execution" and record["success"]:
            self.latencies[name] = [*self.latencies[name], record["latency_ms"]][-10:]
        elif record.get("error_class") != "CircuitOpen":
            recent = [t for t in self.failures[name] if t > now - 60.0] + [now]
            self.failures[name] = recent
            if len(recent) > 3:
                self.cool_until[name] = now + 5.0
                self.failures[name] = []

    def choose(self, _: int, now: float) -> str:
        ready = [n for n in self.names if self.cool_until[n] <= now] or self.names
        untried = [n for n in ready if not self.latencies[n]]
        if untried:
            return untried[0]
        return min(ready, key=lambda n: statistics.fmean(self.latencies[n]))


def simulate(scenario: Scenario, arm: str, seed: int, concurrency: int) -> list[_Served]:
    """One arm through one scenario: every question's fate, in send order."""
    t0 = 1_000_000.0  # seconds on the simulated clock (the learner's decay uses it)
    fleet = _Fleet(scenario, seed, t0)
    names = fleet.names
    learned = None
    latency = None
    if arm.startswith("learned"):
        objective = "balanced" if arm == "learned-balanced" else "latency"
        learned = _LearnedRouter(names, seed, objective, t0)
    elif arm == "latency-router":
        latency = _LatencyRouter(names)
    events: list[tuple[float, int, str, Any]] = []
    order = 0

    def push(at: float, kind: str, payload: Any) -> None:
        nonlocal order
        order += 1
        heapq.heappush(events, (at, order, kind, payload))

    for caller in range(concurrency):
        push(t0 + caller * 0.01, "send", None)
    if learned is not None:
        push(t0, "tick", None)
    served: list[_Served] = []
    qid = 0
    end = t0 + scenario.duration_s
    while events:
        at, _, kind, payload = heapq.heappop(events)
        if kind == "tick" and learned is not None:
            learned.tick(at)
            if at < end:
                push(at + 0.25, "tick", None)
        elif kind == "telemetry":
            if learned is not None:  # the agent decides right after each record, as it does
                learned.clock = at
                learned.observe(payload)
                learned.tick(at)
            elif latency is not None:
                latency.observe(payload, at - t0)
        elif kind == "send" and at < end:
            first = _choose(arm, names, qid, at - t0, learned, latency)
            done, telemetry, answered, correct = fleet.run(qid, first, at)
            for record in telemetry:
                push(done + TELEMETRY_DELAY_S, "telemetry", record)
            served.append(_Served(qid, at - t0, done - t0, first, correct, answered))
            push(done, "send", None)
            qid += 1
    if learned is not None:
        _TABLES[(scenario.name, arm, seed)] = [
            {**t, "at": round(t["at"] - t0, 2)} for t in learned.tables
        ]
    return served


_TABLES: dict[tuple[str, str, int], list[dict[str, Any]]] = {}


def _choose(
    arm: str,
    names: Sequence[str],
    qid: int,
    t: float,
    learned: _LearnedRouter | None,
    latency: _LatencyRouter | None,
) -> str:
    if learned is not None:
        return learned.choose(qid, t)
    if latency is not None:
        return latency.choose(qid, t)
    if arm.startswith("fixed-"):
        return arm.removeprefix("fixed-")
    return random.Random(f"uniform|{qid}").choice(list(names))


def figures(scenario: Scenario, served: Sequence[_Served]) -> dict[str, Any]:
    """Correct answers/s per phase, share over time, and the time to react to each change."""
    bounds = sorted({0.0, *(c.at_s for c in scenario.changes), scenario.duration_s})
    phases = {}
    for start, stop in itertools.pairwise(bounds):
        done = [s for s in served if start <= s.done_at < stop]
        phases[f"{start:.0f}-{stop:.0f}s"] = round(sum(s.correct for s in done) / (stop - start), 3)
    total = sum(s.correct for s in served if s.done_at < scenario.duration_s)
    out: dict[str, Any] = {
        "correct_per_s": round(total / scenario.duration_s, 3),
        "phases": phases,
        "requests": len(served),
        "share_over_time": _shares(scenario, served),
    }
    if scenario.degraded is not None and scenario.changes:
        out["move_off"] = _move_off(served, scenario.degraded, scenario.changes[0].at_s)
    if scenario.recover_at_s is not None and scenario.degraded is not None:
        out["back_after_recovery_s"] = _majority_after(
            served, scenario.degraded, scenario.recover_at_s
        )
    if scenario.improved is not None and scenario.changes:
        out["improved_majority_after_s"] = _majority_after(
            served, scenario.improved, scenario.changes[0].at_s
        )
    return out


BIN_S = 5.0


def _shares(scenario: Scenario, served: Sequence[_Served]) -> dict[str, list[float]]:
    names = [b.name for b in scenario.backends]
    bins = int(scenario.duration_s // BIN_S)
    counts = [[0] * len(names) for _ in range(bins)]
    for s in served:
        index = min(int(s.sent_at // BIN_S), bins - 1)
        counts[index][names.index(s.first)] += 1
    return {
        name: [round(row[i] / max(sum(row), 1), 3) for row in counts]
        for i, name in enumerate(names)
    }


def _move_off(served: Sequence[_Served], name: str, at_s: float) -> dict[str, Any]:
    """Requests and seconds after ``at_s`` until ``name`` gets < 10 % of the next 20 requests
    and of all the requests until 60 s after the change (a lucky window does not count)."""
    after = [s for s in served if s.sent_at >= at_s]
    horizon = [s for s in after if s.sent_at < at_s + 60.0]
    for i in range(len(horizon) - 20):
        window = sum(s.first == name for s in horizon[i : i + 20]) / 20
        rest = sum(s.first == name for s in horizon[i:]) / max(len(horizon) - i, 1)
        if window < 0.1 and rest < 0.1:
            return {"requests": i, "seconds": round(horizon[i].sent_at - at_s, 2)}
    return {"requests": None, "seconds": None}


def _majority_after(served: Sequence[_Served], name: str, at_s: float) -> float | None:
    """Seconds after ``at_s`` until ``name`` gets over half of a 5 s bin's requests, for good
    (every later 5 s bin until the end of the phase, or 60 s, has it over half too)."""
    after = [s for s in served if s.sent_at >= at_s]
    if not after:
        return None
    bins: dict[int, list[_Served]] = {}
    for s in after:
        bins.setdefault(int((s.sent_at - at_s) // BIN_S), []).append(s)
    keys = sorted(bins)
    majority = {k: sum(s.first == name for s in bins[k]) / len(bins[k]) > 0.5 for k in keys}
    for k in keys:
        if all(majority[j] for j in keys if k <= j < k + 12):
            return k * BIN_S
    return None


def run(scenarios: Sequence[str], runs: int, concurrency: int, quick: bool) -> dict[str, Any]:
    report: dict[str, Any] = {
        "simulation": "SIMULATED clock, backends and worker; the learner is the real code",
        "concurrency": concurrency,
        "runs": runs,
        "load_average": os.getloadavg(),
        "scenarios": {},
    }
    for name in scenarios:
        scenario = SCENARIOS[name]
        if quick:
            scenario = _shortened(scenario)
        arms = ["learned", "learned-balanced", "latency-router", "uniform"]
        arms += [f"fixed-{b.name}" for b in scenario.backends]
        per_arm: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
        for r in range(runs):
            for arm in arms:
                per_arm[arm].append(figures(scenario, simulate(scenario, arm, 7 + r, concurrency)))
        report["scenarios"][name] = _summary(scenario, per_arm, runs)
    return report


def _shortened(scenario: Scenario) -> Scenario:
    scale = 0.25
    changes = tuple(replace(c, at_s=c.at_s * scale) for c in scenario.changes)
    recover = None if scenario.recover_at_s is None else scenario.recover_at_s * scale
    return replace(
        scenario, duration_s=scenario.duration_s * scale, changes=changes, recover_at_s=recover
    )


def _summary(
    scenario: Scenario, per_arm: Mapping[str, list[dict[str, Any]]], runs: int
) -> dict[str, Any]:
    fixed = [arm for arm in per_arm if arm.startswith("fixed-")]
    best_fixed = [max(per_arm[a][r]["correct_per_s"] for a in fixed) for r in range(runs)]
    learned = [f["correct_per_s"] for f in per_arm["learned"]]
    router = [f["correct_per_s"] for f in per_arm["latency-router"]]
    uniform = [f["correct_per_s"] for f in per_arm["uniform"]]
    out: dict[str, Any] = {
        "config": {
            "duration_s": scenario.duration_s,
            "backends": [b.__dict__ for b in scenario.backends],
            "changes": [c.__dict__ for c in scenario.changes],
        },
        "arms": {arm: _mean_figures(figs) for arm, figs in per_arm.items()},
        "per_run": {arm: [f["correct_per_s"] for f in figs] for arm, figs in per_arm.items()},
        "best_fixed_per_run": best_fixed,
        "learned_vs_best_fixed": [
            round(a / b, 3) for a, b in zip(learned, best_fixed, strict=True)
        ],
        "learned_vs_latency_router": [
            round(a / b, 3) for a, b in zip(learned, router, strict=True)
        ],
        "learned_vs_uniform": [round(a / b, 3) for a, b in zip(learned, uniform, strict=True)],
        "tables_run_1": _TABLES.get((scenario.name, "learned", 7), [])[:40],
    }
    return out


def _mean_figures(figs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "correct_per_s": round(statistics.fmean(f["correct_per_s"] for f in figs), 3),
        "phases": {
            phase: round(statistics.fmean(f["phases"][phase] for f in figs), 3)
            for phase in figs[0]["phases"]
        },
        "share_over_time": {
            name: [
                round(statistics.fmean(v), 3)
                for v in zip(*(f["share_over_time"][name] for f in figs), strict=True)
            ]
            for name in figs[0]["share_over_time"]
        },
    }
    for key in ("move_off", "back_after_recovery_s", "improved_majority_after_s"):
        if key in figs[0]:
            out[key] = [f[key] for f in figs]
    return out


def write_charts(report: dict[str, Any], out: Path) -> list[Path]:
    """One PNG per scenario: traffic share over time per backend, one panel per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, scenario in report["scenarios"].items():
        arms = [a for a in scenario["arms"] if not a.startswith("fixed-")]
        fig, axes = plt.subplots(len(arms), 1, figsize=(9, 2.2 * len(arms)), sharex=True)
        for ax, arm in zip(axes, arms, strict=True):
            shares = scenario["arms"][arm]["share_over_time"]
            xs = [i * BIN_S for i in range(len(next(iter(shares.values()))))]
            ax.stackplot(xs, *shares.values(), labels=list(shares), step="post")
            ax.set_ylabel(arm, fontsize=8)
            ax.set_ylim(0, 1)
            for change in scenario["config"]["changes"]:
                ax.axvline(change["at_s"], color="k", linestyle="--", linewidth=0.8)
        axes[0].legend(loc="upper right", fontsize=7, ncol=len(shares))
        axes[0].set_title(f"{name}: share of requests per backend (mean of {report['runs']} runs)")
        axes[-1].set_xlabel("seconds (simulated)")
        fig.tight_layout()
        path = out / f"routing-share-{name}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths


def print_table(report: dict[str, Any]) -> None:
    for name, scenario in report["scenarios"].items():
        print(f"\n{name}: correct answers/s (mean of {report['runs']}), per phase")
        for arm, figs in scenario["arms"].items():
            extra = {
                k: figs[k]
                for k in figs
                if k in ("move_off", "back_after_recovery_s", "improved_majority_after_s")
            }
            print(f"  {arm:18s} {figs['correct_per_s']:7.2f}  {figs['phases']}  {extra or ''}")
        print(f"  learned / best fixed per run: {scenario['learned_vs_best_fixed']}")
        print(f"  learned / latency router per run: {scenario['learned_vs_latency_router']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.routing_decide", description=__doc__
    )
    parser.add_argument("--quick", action="store_true", help="short scenarios, one run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS))
    args = parser.parse_args(argv)
    runs = 1 if args.quick else args.runs
    started = time.monotonic()
    report = run(args.scenario or list(SCENARIOS), runs, args.concurrency, args.quick)
    report["duration_s"] = round(time.monotonic() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "routing-scenarios.json"
    path.write_text(json.dumps(report, indent=1))
    charts = write_charts(report, args.out)
    print_table(report)
    print(f"wrote {path} and {len(charts)} charts; load average {report['load_average']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
