"""``python -m tests.bench.ab --arm NAME:VAR=VALUE,... --arm ... [--rounds N]``: an alternated A/B.

Measures one lever the way ``docs/benchmarks.md`` asks: every arm in the same run,
on the same broker and topics, alternated (A B A B ...) so that a change in the
machine's load hits every arm alike. An arm is a set of environment variables for
the router and worker processes (``DSPEX_...`` settings). Each arm: router + one
general worker (as processes), a warm-up, cache-miss saturation, cache-hit
saturation and cache misses paced at 100/s, with the CPU of every process. The
pseudo-variable ``PARTITIONS=N`` gives an arm topics of its own with N partitions
on the request path (requests, pool.general, responses, executions, telemetry, cache). Prints
and writes (``--out``) per arm and round: requests/s, CPU ms per request by process,
paced p50/p99, and the machine's load average before and after; the figures to
compare are the ratios between arms, never the absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from tests.bench import pipeline
from tests.bench.config import BenchConfig
from tests.bench.evaluate import phase_cpu_ms
from tests.bench.stack import Broker, bench_broker, bench_settings, catalog_topics
from tests.bench.stages import Stack, measured


def parse_arm(text: str) -> tuple[str, dict[str, str]]:
    """``name:VAR=VALUE,VAR=VALUE`` (no variables: the defaults)."""
    name, _, assignments = text.partition(":")
    env = dict(pair.split("=", 1) for pair in assignments.split(",") if pair)
    return name, env


async def measure_arm(
    stack: Stack,
    admin: Any,
    cfg: BenchConfig,
    env: dict[str, str],
    offset: int,
    keep_logs: Path | None = None,
) -> dict[str, Any]:
    """One arm: start the agents with ``env``, measure, stop them."""
    stack.env = {**stack.env, **env}
    load_before = os.getloadavg()[0]
    stack.start_router()
    stack.add_workers(1)
    from dspex.streams.client.client import AsyncClient

    try:
        await stack.wait_ready(admin)
        async with AsyncClient(stack.settings) as client:
            await pipeline.warm_up(client, cfg.warm_up_requests, offset=offset)
            miss = await measured(
                stack, pipeline.saturate(client, cfg.miss_requests, cache_hits=False, offset=offset)
            )
            await pipeline.warm_cache(client)
            hit = await measured(
                stack, pipeline.saturate(client, cfg.hit_requests, cache_hits=True)
            )
            paced = await pipeline.paced(
                client, cfg.paced_rate, cfg.paced_s, cache_hits=False, offset=offset + 10**5
            )
    finally:
        codes = stack.stop()
        if keep_logs is not None:  # the agents' logs, before the scratch dir goes
            keep_logs.mkdir(parents=True, exist_ok=True)
            for log in stack.workdir.glob("*.log"):
                (keep_logs / f"{offset}-{log.name}").write_bytes(log.read_bytes())
    return {
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "miss_per_s": miss["per_s"],
        "hit_per_s": hit["per_s"],
        "miss_cpu_ms": _own(miss),
        "hit_cpu_ms": _own(hit),
        "paced_miss_p50_ms": paced["p50"],
        "paced_miss_p99_ms": paced["p99"],
        "failed": miss["failed"] + hit["failed"] + paced["failed"],
        "exit_codes": codes,
    }


def _own(phase: dict[str, Any]) -> dict[str, float]:
    costs = {p: ms for p, ms in phase_cpu_ms(phase).items() if p not in ("machine", "other")}
    return {**costs, "total": round(sum(costs.values()), 3)}


async def run(
    arms: list[tuple[str, dict[str, str]]],
    rounds: int,
    cfg: BenchConfig,
    broker: Broker,
    tmp: Path,
    keep_logs: Path | None = None,
) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    with contextlib.ExitStack() as topics:
        # an arm with PARTITIONS=N gets topics of its own (its request path at N partitions)
        shared = bench_settings(broker.bootstrap)
        admin = topics.enter_context(catalog_topics(shared))
        own = {name: _own_topics(broker, env, topics) for name, env in arms}
        for n in range(rounds):
            order = arms if n % 2 == 0 else arms[::-1]  # A B, then B A: alternated
            for name, env in order:
                settings = own[name] or shared
                agents_env = {k: v for k, v in env.items() if k != "PARTITIONS"}
                stack = Stack(settings, cfg, broker, tmp)
                offset = (len(results) + 1) * 10**6
                figures = await measure_arm(stack, admin, cfg, agents_env, offset, keep_logs)
                results.append({"arm": name, "round": n + 1, "env": env, **figures})
                print(json.dumps(results[-1]), flush=True)
    return results


REQUEST_PATH = ("requests", "pool.general", "responses", "executions", "telemetry", "cache")


def _own_topics(broker: Broker, env: dict[str, str], stack: contextlib.ExitStack) -> Any:
    if "PARTITIONS" not in env:
        return None
    count = int(env["PARTITIONS"])
    settings = bench_settings(broker.bootstrap, partitions=dict.fromkeys(REQUEST_PATH, count))
    stack.enter_context(catalog_topics(settings))
    return settings


def summary(results: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Per arm, each figure over the rounds (to read as ranges)."""
    keys = ("miss_per_s", "hit_per_s", "paced_miss_p50_ms", "paced_miss_p99_ms")
    table: dict[str, dict[str, list[float]]] = {}
    for r in results:
        arm = table.setdefault(r["arm"], {k: [] for k in (*keys, "miss_cpu", "hit_cpu")})
        for k in keys:
            arm[k].append(r[k])
        arm["miss_cpu"].append(r["miss_cpu_ms"]["total"])
        arm["hit_cpu"].append(r["hit_cpu_ms"]["total"])
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.ab", description=__doc__)
    parser.add_argument("--arm", action="append", required=True, help="NAME:VAR=VALUE,...")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--bootstrap", help="an existing broker (default: start a local one)")
    parser.add_argument("--out", type=Path, default=Path("bench-results/ab.json"))
    parser.add_argument("--paced-s", type=float, default=10.0)
    parser.add_argument("--keep-logs", type=Path, help="copy the agents' logs here")
    args = parser.parse_args(argv)
    arms = [parse_arm(a) for a in args.arm]
    full = BenchConfig.full()
    cfg = BenchConfig(**{**full.__dict__, "paced_s": args.paced_s, "warm_up_requests": 1000})
    with (
        tempfile.TemporaryDirectory(prefix="dspex-ab-") as tmp,
        bench_broker(Path(tmp) / "broker", args.bootstrap) as broker,
    ):
        results = asyncio.run(run(arms, args.rounds, cfg, broker, Path(tmp), args.keep_logs))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table = summary(results)
    report = {"arms": dict(arms), "results": results, "summary": table}
    args.out.write_text(json.dumps(report, indent=2))
    for name, figures in table.items():
        print(name, json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
