"""``python -m tests.bench.routing_run [--quick] [--out DIR] [--bootstrap HOST:PORT]``.

The routing benchmark (``make bench-routing``): DSPex's learned routing against
static uniform routing and LiteLLM's latency-based router, on SIMULATED LM
backends (``tests/bench/routing_sim.py``) that differ in latency, error rate and
answer quality. Each arm answers the same seeded questions with the same
concurrency: a steady phase, then the backend carrying most of that arm's
traffic degrades (latency and error rate jump) for the drift phase. Writes
``DIR/routing.json`` and prints a table; see ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.bench import output, routing_dspex, routing_litellm, routing_report
from tests.bench.routing_dspex import ArmSetup
from tests.bench.routing_sim import Backend, Degradation, SimFleet
from tests.bench.routing_workload import Outcome, tasks
from tests.bench.stack import Broker, bench_broker


def _sim(name: str, median_ms: float, error_rate: float, quality: float) -> Backend:
    return Backend(name, median_ms, 0.35, error_rate, error_status=500, quality=quality)


SCENARIOS = {
    # a fast but sloppy model, a balanced one, a slow careful one
    "quality-spread": (
        _sim("sim-small", 300, 0.02, quality=0.40),
        _sim("sim-medium", 450, 0.02, quality=0.92),
        _sim("sim-large", 1500, 0.01, quality=0.97),
    ),
    # the control: every backend answers equally well, only speed differs
    "latency-only": (
        _sim("sim-small", 300, 0.02, quality=0.90),
        _sim("sim-medium", 450, 0.02, quality=0.90),
        _sim("sim-large", 1500, 0.01, quality=0.90),
    ),
}


@dataclass(frozen=True)
class RoutingConfig:
    """How much work one run does, and the simulation it runs against."""

    quick: bool
    scenario: str
    backends: tuple[Backend, ...]
    degradation: Degradation
    concurrency: int
    steady_requests: int
    drift_requests: int
    time_scale: float
    window: int
    threshold: float
    seed: int
    workers: int
    in_flight: int

    @classmethod
    def make(cls, quick: bool, scenario: str, seed: int) -> RoutingConfig:
        return cls(
            quick=quick,
            scenario=scenario,
            backends=SCENARIOS[scenario],
            degradation=Degradation(latency_factor=4.0, error_rate=0.25, error_status=429),
            concurrency=8 if quick else 16,
            steady_requests=240 if quick else 1500,
            drift_requests=120 if quick else 750,
            time_scale=0.3 if quick else 1.0,
            window=20 if quick else 50,
            threshold=0.15,
            seed=seed,
            workers=1,
            in_flight=32,
        )


def learner_env(cfg: RoutingConfig) -> dict[str, str]:
    """The learning agent's settings: the benchmark's objective for the program, seeded draws.

    The ``latency`` objective scores log2(reward) - log2(latency), i.e. correct answers
    per second of a caller's time: the quantity the benchmark measures.
    """
    objectives = {routing_dspex.PROGRAM_ID: {"kind": "latency"}}
    return {
        "DSPEX_LEARNER__OBJECTIVES": json.dumps(objectives),
        "DSPEX_LEARNER__SEED": str(cfg.seed),
    }


class Degrader:
    """The mid-run event: degrade the arm's busiest backend just before the drift phase."""

    def __init__(self, fleet: SimFleet, cfg: RoutingConfig) -> None:
        self.fleet = fleet
        self.cfg = cfg
        self.degraded: str | None = None

    def hooks(self) -> dict[int, Callable[[], Awaitable[None]]]:
        return {self.cfg.steady_requests: self._degrade}

    async def _degrade(self) -> None:
        fleet, cfg = self.fleet, self.cfg
        self.degraded = await asyncio.to_thread(fleet.degrade, cfg.degradation, cfg.window)
        print(f"   degraded {self.degraded} at request {cfg.steady_requests}", flush=True)


async def run_arms(
    cfg: RoutingConfig, broker: Broker, fleet: SimFleet, logs: Path, quality: str
) -> dict[str, Any]:
    """Static, then learned, then LiteLLM, on the same questions; figures per arm."""
    work = tasks(cfg.steady_requests + cfg.drift_requests, cfg.seed)
    base = f"routing{uuid.uuid4().hex[:8]}."
    arms: dict[str, Any] = {}
    for arm in ("static", "learned", "litellm"):
        print(f"-- {routing_report.LABELS[arm]}", flush=True)
        degrader = Degrader(fleet, cfg)
        started = time.monotonic()
        if arm == "litellm":
            outcomes, details = await routing_litellm.run_arm(
                fleet, cfg.backends, work, cfg.concurrency, degrader.hooks()
            )
        else:
            setup = _setup(cfg, broker, fleet, logs, f"{base}{arm}.")
            learn = arm == "learned"
            outcomes, details = await routing_dspex.run_arm(
                setup, work, learn=learn, quality_source=quality, hooks=degrader.hooks()
            )
            quality = details["quality_source"]
        arms[arm] = {
            **_figures(cfg, outcomes, fleet.calls(), degrader.degraded),
            **details,
            "wall_s": round(time.monotonic() - started, 1),
        }
    return arms


def _setup(
    cfg: RoutingConfig, broker: Broker, fleet: SimFleet, logs: Path, prefix: str
) -> ArmSetup:
    return ArmSetup(
        bootstrap=broker.bootstrap,
        prefix=prefix,
        workdir=logs,
        backends=cfg.backends,
        fleet=fleet,
        concurrency=cfg.concurrency,
        workers=cfg.workers,
        in_flight=cfg.in_flight,
        learner_env=learner_env(cfg),
    )


def _figures(
    cfg: RoutingConfig, outcomes: list[Outcome], calls: list[dict[str, Any]], degraded: str | None
) -> dict[str, Any]:
    names = [b.name for b in cfg.backends]
    shift = {
        "degraded": degraded or "-",
        "at": cfg.steady_requests,
        "window": cfg.window,
        "threshold": cfg.threshold,
    }
    return routing_report.arm_figures(outcomes, calls, names, cfg.steady_requests, shift)


def collect(cfg: RoutingConfig, out: Path, bootstrap: str | None, quality: str) -> dict[str, Any]:
    """The whole run against one broker and one set of simulated backends.

    The agents' logs are kept in ``out/routing-logs/<arm>/``.
    """
    started = time.monotonic()
    logs = out / "routing-logs"
    shutil.rmtree(logs, ignore_errors=True)
    with (
        tempfile.TemporaryDirectory(prefix="dspex-routing-") as tmp,
        bench_broker(Path(tmp) / "broker", bootstrap) as broker,
        SimFleet(list(cfg.backends), cfg.seed, cfg.time_scale) as fleet,
    ):
        report: dict[str, Any] = {
            "machine": output.machine_info(broker),
            "config": dataclasses.asdict(cfg),
            "simulation": "every backend is a SIMULATION (tests/bench/routing_sim.py)",
        }
        report["arms"] = asyncio.run(run_arms(cfg, broker, fleet, logs, quality))
    report["comparison"] = routing_report.comparison(report)
    report["targets"] = routing_report.targets(report["comparison"])
    report["warnings"] = routing_report.warnings(report)
    report["duration_s"] = round(time.monotonic() - started, 1)
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.routing_run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny counts (the smoke test)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="report dir")
    parser.add_argument("--bootstrap", help="an existing broker (default: start a local one)")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="quality-spread")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--quality",
        choices=("auto", "worker", "client"),
        default="auto",
        help="who tells the learner an answer's quality: the worker (gold in the request), "
        "the client (send_feedback), or auto: the worker when it scores, else the client",
    )
    return parser.parse_args(argv)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds the context managers: agents, sims, broker stop


def main(argv: list[str] | None = None) -> int:
    """Run the three arms; write ``routing.json``; print the table."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cfg = RoutingConfig.make(args.quick, args.scenario, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        report = collect(cfg, args.out, args.bootstrap, args.quality)
    finally:
        signal.signal(signal.SIGTERM, previous)
    path = routing_report.write_json(report, args.out)
    routing_report.print_table(report)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
