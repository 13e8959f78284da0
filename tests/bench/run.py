"""``python -m tests.bench.run [--quick] [--out DIR] [--bootstrap HOST:PORT] [--profile WHEN]``.

Runs every figure in one go against one broker (``--bootstrap``, else
``KAFKA_BOOTSTRAP_SERVERS``, else a fresh local KRaft broker in a temp dir on free
ports), writes ``DIR/report.json`` and ``DIR/report.png``, prints a short table.
Targets are reported as met / not met, never asserted. When one is missed (or with
``--profile always``), the router, a worker and the client are profiled with
pyinstrument and the text profiles land in ``DIR``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.bench import composition, evaluate, inprocess, output, serde_bench
from tests.bench.config import BenchConfig
from tests.bench.stack import Broker, bench_broker, bench_settings, catalog_topics
from tests.bench.stages import (
    Stack,
    probe_consume_batch,
    run_ceiling,
    run_pipeline,
    run_profiles,
)

logger = logging.getLogger("tests.bench")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny counts (the smoke test)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="report dir")
    parser.add_argument("--bootstrap", help="an existing broker (default: start a local one)")
    parser.add_argument("--profile", choices=("auto", "always", "never"), default="auto")
    return parser.parse_args(argv)


def collect(cfg: BenchConfig, out: Path, bootstrap: str | None, profile: str) -> dict[str, Any]:
    """Every figure, in one run, against one broker."""
    with (
        tempfile.TemporaryDirectory(prefix="dspex-bench-") as tmp,
        bench_broker(Path(tmp) / "broker", bootstrap) as broker,
    ):
        return _measure(cfg, out, broker, Path(tmp), profile)


def _measure(
    cfg: BenchConfig, out: Path, broker: Broker, tmp: Path, profile: str
) -> dict[str, Any]:
    settings = bench_settings(broker.bootstrap)
    report: dict[str, Any] = {
        "machine": output.machine_info(broker),
        "config": dataclasses.asdict(cfg),
    }
    started = time.monotonic()
    _step("serde")
    from dspex.streams.serde import make_serde

    report["serde"] = serde_bench.measure(make_serde(settings), cfg.serde_records, "bench.requests")
    _step("in-process DSPy")
    report["in_process"] = inprocess.measure(
        cfg.in_process_calls,
        cfg.async_concurrency,
        cfg.paced_rate,
        max(1, int(cfg.paced_rate * cfg.paced_s)),
    )
    with catalog_topics(settings) as admin:
        _step("Kafka ceiling")
        report["ceiling"] = run_ceiling(settings, cfg, broker)
        report["diagnostics"] = {
            "worker_consume_batch": probe_consume_batch(settings, cfg.worker_in_flight, 0.1)
        }
        _step("DSPex pipeline and scaling")
        stack = Stack(settings, cfg, broker, tmp)
        report["pipeline"], report["scaling"] = asyncio.run(run_pipeline(stack, admin, cfg))
        _step("pipeline overhead per stage")
        report["composition"] = asyncio.run(composition.measure(settings, cfg, broker, tmp, admin))
        report["ratios"] = evaluate.ratios(report)
        report["targets"] = evaluate.targets(report["ratios"])
        report["saturated"] = evaluate.saturations(report)
        report["cpu_ms_per_request"] = evaluate.cpu_ms_per_request(report)
        missed = not all(t["met"] for t in report["targets"].values())
        output.write_json(report, out)  # a failing profile run must not lose the figures
        if profile == "always" or (profile == "auto" and missed):
            _step("profiling the hot path")
            report["profiles"] = _profiles(stack, admin, cfg, out)
    report["duration_s"] = round(time.monotonic() - started, 1)
    return report


def _profiles(stack: Stack, admin: Any, cfg: BenchConfig, out: Path) -> dict[str, str]:
    """Profile files by process; a failure is recorded, the figures are kept."""
    try:
        files = asyncio.run(run_profiles(stack, admin, cfg, out))
    except Exception as exc:
        logger.exception("profiling failed")
        files = {"error": f"{type(exc).__name__}: {exc}"}
    (out / "profile-in-process.txt").write_text(inprocess.profile_text(cfg.in_process_calls))
    return {**files, "in_process": "profile-in-process.txt"}


def _step(name: str) -> None:
    print(f"-- {name}", flush=True)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds the context managers: agents and broker stop


def main(argv: list[str] | None = None) -> int:
    """Run the suite; write the report and chart; print the table."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cfg = BenchConfig.quick_run() if args.quick else BenchConfig.full()
    args.out.mkdir(parents=True, exist_ok=True)
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        report = collect(cfg, args.out, args.bootstrap, args.profile)
    finally:
        signal.signal(signal.SIGTERM, previous)
    json_path = output.write_json(report, args.out)
    png_path = output.write_chart(report, args.out)
    output.print_table(report)
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
