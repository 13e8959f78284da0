"""What faust costs the router: the product router (A) against a confluent-kafka request loop (B).

Both arms run the same :class:`~dspex.agents.router.router.RouterHandler` with one pool worker
on one broker; B is the experiment in :mod:`tests.bench.ckrouter`. The arms take
turns (A, B, A, B, ...) so a noisy shared machine hurts both alike. Per turn:
cache-hit saturation (requests/s and each process's CPU per hit), then 100
requests/s of cache misses (latency and the router stage from the records'
timestamps) and of cache hits. Writes ``<out>/router-ab.json`` and prints a table.

    python -m tests.bench.router_ab [--quick] [--rounds N] [--out DIR] [--bootstrap HOST:PORT]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from confluent_kafka.admin import AdminClient

from dspex.streams.client.client import AsyncClient
from tests.bench import pipeline, trace
from tests.bench.config import BenchConfig
from tests.bench.evaluate import phase_cpu_ms
from tests.bench.stack import bench_broker, bench_settings, catalog_topics
from tests.bench.stages import Stack, measured
from tests.bench.stats import percentile

ARMS = {"faust": None, "confluent": "tests.bench.ckrouter"}
"""Arm name -> the module run in the router's place (None: ``python -m dspex.agents router``)."""


@dataclasses.dataclass(frozen=True)
class AbConfig:
    rounds: int
    hits: int
    paced_s: float
    warm_up: int

    @classmethod
    def of(cls, quick: bool, rounds: int | None) -> AbConfig:
        if quick:
            return cls(rounds=rounds or 1, hits=200, paced_s=1.0, warm_up=10)
        return cls(rounds=rounds or 2, hits=6_000, paced_s=10.0, warm_up=200)


async def one_turn(stack: Stack, admin: AdminClient, module: str | None, cfg: AbConfig) -> Any:
    """One arm's figures: hit saturation with CPU per hit, paced misses and hits."""
    stack.start_router(module=module)
    stack.add_workers(1)
    try:
        async with AsyncClient(stack.settings) as client:
            await stack.wait_ready(admin)
            await pipeline.warm_up(client, cfg.warm_up, offset=10**6)
            await pipeline.warm_cache(client)
            await pipeline.saturate(client, cfg.hits // 3, cache_hits=True)
            hits = await measured(stack, pipeline.saturate(client, cfg.hits, cache_hits=True))
            traced: list[trace.Sample] = []
            miss = await pipeline.paced(client, 100.0, cfg.paced_s, cache_hits=False, traced=traced)
            stages = await asyncio.to_thread(trace.breakdown, stack.settings, traced)
            hit = await pipeline.paced(client, 100.0, cfg.paced_s, cache_hits=True)
    finally:
        codes = stack.stop()
    return {
        "hit_per_s": hits["per_s"],
        "cpu_ms_per_hit": phase_cpu_ms(hits),
        "miss_paced_ms": {q: miss[q] for q in ("p50", "p99")},
        "router_stage_ms": stages.get("all", {}).get("router", {}),
        "hit_paced_ms": {q: hit[q] for q in ("p50", "p99")},
        "failures": {"hits": hits["failed"], "misses": miss["failed"], "hit_paced": hit["failed"]},
        "exit_codes": codes,
    }


async def run_turns(stack_of: Any, admin: AdminClient, cfg: AbConfig) -> dict[str, list[Any]]:
    turns: dict[str, list[Any]] = {arm: [] for arm in ARMS}
    for _ in range(cfg.rounds):
        for arm, module in ARMS.items():
            turns[arm].append(await one_turn(stack_of(), admin, module, cfg))
    return turns


def summary(turns: dict[str, list[Any]]) -> dict[str, Any]:
    """Per arm the median over turns; and confluent/faust ratios of the medians."""
    medians = {
        arm: {
            "hit_per_s": _median([t["hit_per_s"] for t in runs]),
            "router_cpu_ms_per_hit": _median([t["cpu_ms_per_hit"]["router"] for t in runs]),
            "machine_cpu_ms_per_hit": _median([t["cpu_ms_per_hit"]["machine"] for t in runs]),
            "miss_p50_ms": _median([t["miss_paced_ms"]["p50"] for t in runs]),
            "miss_p99_ms": _median([t["miss_paced_ms"]["p99"] for t in runs]),
            "router_stage_p50_ms": _median([t["router_stage_ms"].get("p50", 0) for t in runs]),
            "hit_p50_ms": _median([t["hit_paced_ms"]["p50"] for t in runs]),
        }
        for arm, runs in turns.items()
    }
    a, b = medians["faust"], medians["confluent"]
    ratios = {name: round(b[name] / a[name], 2) if a[name] else None for name in a}
    return {"median": medians, "confluent_over_faust": ratios}


def _median(values: list[float]) -> float:
    return round(percentile(values, 50), 3)


def print_table(result: dict[str, Any]) -> None:
    median, ratios = result["summary"]["median"], result["summary"]["confluent_over_faust"]
    print(f"{'figure (median of turns)':28} {'faust':>10} {'confluent':>10} {'ratio':>7}")
    for name in median["faust"]:
        row = (median["faust"][name], median["confluent"][name], ratios[name])
        print(f"{name:28} {row[0]:>10} {row[1]:>10} {row[2]!s:>7}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.router_ab", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny counts (the smoke test)")
    parser.add_argument("--rounds", type=int, help="turns per arm (default 2)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--bootstrap", help="an existing broker (default: start a local one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cfg = AbConfig.of(args.quick, args.rounds)
    bench = BenchConfig.quick_run() if args.quick else BenchConfig.full()
    with (
        tempfile.TemporaryDirectory(prefix="dspex-router-ab-") as tmp,
        bench_broker(Path(tmp) / "broker", args.bootstrap) as broker,
    ):
        settings = bench_settings(broker.bootstrap)
        with catalog_topics(settings) as admin:

            def stack_of() -> Stack:
                return Stack(settings, bench, broker, Path(tmp))

            turns = asyncio.run(run_turns(stack_of, admin, cfg))
    result = {"config": dataclasses.asdict(cfg), "turns": turns, "summary": summary(turns)}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "router-ab.json"
    path.write_text(json.dumps(result, indent=2))
    print_table(result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
