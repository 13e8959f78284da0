"""The run's outputs: machine info, ``report.json``, ``report.png`` and the printed table."""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import confluent_kafka
import dspy

from tests.bench.stack import Broker


def machine_info(broker: Broker) -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "kafka_version": broker.kafka_version,
        "broker": broker.source,
        "bootstrap": broker.bootstrap,
        "confluent_kafka": confluent_kafka.__version__,
        "librdkafka": confluent_kafka.libversion()[0],
        "dspy": dspy.__version__,
        "load_average": os.getloadavg(),
    }


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def write_json(report: dict[str, Any], out: Path) -> Path:
    path = out / "report.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path


def write_chart(report: dict[str, Any], out: Path) -> Path:
    """Throughput, latency, CPU per process and serde cost, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    _throughput(axes[0][0], report)
    _latency(axes[0][1], report)
    _cpu(axes[1][0], report)
    _serde(axes[1][1], report)
    machine = report["machine"]
    fig.suptitle(
        f"DSPex benchmarks - {machine['cpu_count']} x {machine['cpu_model']}, "
        f"{machine['timestamp']}"
    )
    fig.tight_layout()
    path = out / "report.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _throughput(ax: Any, report: dict[str, Any]) -> None:
    inproc, pipe = report["in_process"], report["pipeline"]
    bars = {
        "Kafka ceiling\n(3-hop relay)": report["ceiling"]["saturation"]["per_s"],
        "in-process\nsync loop": inproc["sync_loop"]["per_s"],
        "in-process\nrun() x1": inproc["run_sequential"]["per_s"],
        "in-process\nrun() async": inproc["run_concurrent"]["per_s"],
        **{f"pipeline miss\n{s['workers']} worker(s)": s["per_s"] for s in report["scaling"]},
        "pipeline\ncache hit": pipe["hit_saturation"]["per_s"],
    }
    ax.bar(list(bars), list(bars.values()), color="tab:blue")
    ax.set_yscale("log")
    ax.set_ylabel("requests (messages) / s, log scale")
    ax.set_title("Throughput at saturation")
    ax.tick_params(axis="x", labelsize=7)
    for i, value in enumerate(bars.values()):
        ax.annotate(f"{value:,.0f}", (i, value), ha="center", va="bottom", fontsize=7)


def _latency(ax: Any, report: dict[str, Any]) -> None:
    pipe = report["pipeline"]
    rate = f"{report['config']['paced_rate']:g}/s"
    groups = {
        f"ceiling\n@{rate}": report["ceiling"]["paced"],
        f"ceiling linger 5 ms\n@{rate}": report["ceiling"]["linger_5ms"]["paced"],
        f"pipeline miss\n@{rate}": pipe["miss_paced"],
        f"pipeline hit\n@{rate}": pipe["hit_paced"],
        "in-process\ncall": report["in_process"]["sync_loop"]["latency_ms"],
        f"in-process run()\n@{rate}": report["in_process"]["run_paced"]["latency_ms"],
    }
    width = 0.25
    for j, q in enumerate(("p50", "p95", "p99")):
        xs = [i + (j - 1) * width for i in range(len(groups))]
        ax.bar(xs, [g[q] for g in groups.values()], width, label=q)
    ax.set_xticks(range(len(groups)), list(groups), fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms, log scale")
    ax.set_title("Latency (open loop at a fixed rate)")
    ax.legend()


def _cpu(ax: Any, report: dict[str, Any]) -> None:
    phases = {
        "ceiling": report["ceiling"]["saturation"]["cpu_percent"],
        "miss 1w": report["pipeline"]["miss_saturation"]["cpu_percent"],
        "hit": report["pipeline"]["hit_saturation"]["cpu_percent"],
        **{f"miss {s['workers']}w": s["cpu_percent"] for s in report["scaling"][1:]},
    }
    names = sorted({k for cpu in phases.values() for k in cpu if k != "machine"})
    bottom = [0.0] * len(phases)
    for name in names:
        values = [(cpu.get(name) or 0.0) for cpu in phases.values()]
        ax.bar(list(phases), values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    cores = (report["machine"]["cpu_count"] or 1) * 100
    ax.axhline(cores, color="black", linestyle="--", linewidth=1)
    ax.set_ylabel("% of one core (dashed: all cores)")
    ax.set_title("CPU per process during saturation")
    ax.legend(fontsize=7, ncol=2)


def _serde(ax: Any, report: dict[str, Any]) -> None:
    serde = report["serde"]
    ax.bar([f"{serde['serde']}\n(Avro)", "json"], [serde["serde_us"], serde["json_us"]])
    ax.set_ylabel("µs per encode + decode")
    ax.set_title(f"Serde of a typical Request ({serde['serde_bytes']} B Avro)")


def print_table(report: dict[str, Any]) -> None:
    """The short table: headline figures and targets."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="DSPex benchmarks (ratios are the result; absolute figures are noisy)")
    for column in ("figure", "value", "target"):
        table.add_column(column)
    for name, value in headline(report):
        table.add_row(name, value, "")
    for name, check in report["targets"].items():
        status = "[green]met[/green]" if check["met"] else "[red]not met[/red]"
        table.add_row(name, f"{check['value']:g}", f"{check['target']}  {status}")
    Console().print(table)


def headline(report: dict[str, Any]) -> list[tuple[str, str]]:
    pipe, inproc, ceil = report["pipeline"], report["in_process"], report["ceiling"]
    miss, hit = pipe["miss_paced"], pipe["hit_paced"]
    rows = [
        ("Kafka ceiling msgs/s", f"{ceil['saturation']['per_s']:,.0f}"),
        ("ceiling latency p50/p99 ms", f"{ceil['paced']['p50']:.2f} / {ceil['paced']['p99']:.2f}"),
        (
            "ceiling at linger 5 ms: msgs/s, p50/p99 ms",
            f"{ceil['linger_5ms']['saturation']['per_s']:,.0f}, "
            f"{ceil['linger_5ms']['paced']['p50']:.2f} / {ceil['linger_5ms']['paced']['p99']:.2f}",
        ),
        (
            "2-hop relay (a hit's path) msgs/s, p50 ms",
            f"{ceil['two_hop']['saturation']['per_s']:,.0f}, {ceil['two_hop']['paced']['p50']:.2f}",
        ),
        ("in-process sync loop calls/s", f"{inproc['sync_loop']['per_s']:,.0f}"),
        ("in-process run() async calls/s", f"{inproc['run_concurrent']['per_s']:,.0f}"),
        (
            "in-process p50 ms: tight loop / run() paced",
            f"{inproc['sync_loop']['latency_ms']['p50']:.2f} / "
            f"{inproc['run_paced']['latency_ms']['p50']:.2f}",
        ),
        ("pipeline miss req/s (1 worker)", f"{pipe['miss_saturation']['per_s']:,.0f}"),
        ("pipeline hit req/s", f"{pipe['hit_saturation']['per_s']:,.0f}"),
        (
            "pipeline miss p50/p95/p99 ms",
            f"{miss['p50']:.1f} / {miss['p95']:.1f} / {miss['p99']:.1f}",
        ),
        ("pipeline hit p50/p95/p99 ms", f"{hit['p50']:.1f} / {hit['p95']:.1f} / {hit['p99']:.1f}"),
        *_stage_rows(miss.get("stages_ms") or {}),
        ("pipeline / ceiling", f"{report['ratios']['pipeline_over_ceiling']:.3f}"),
        (
            "scaling (x of 1 worker)",
            ", ".join(f"{k}w {v:.2f}" for k, v in report["ratios"]["scaling"].items()),
        ),
        (
            "serde / json µs",
            f"{report['serde']['serde_us']:.1f} / {report['serde']['json_us']:.1f}",
        ),
        ("agent exit codes (-9: killed)", str(pipe["exit_codes"])),
        *_composition_rows(report.get("composition") or {}),
    ]
    return rows


def _composition_rows(comp: dict[str, Any]) -> list[tuple[str, str]]:
    """Figure 6: a pipeline against the same composition in-process (same run)."""
    if not comp:
        return []
    piped, local = comp["pipeline"], comp["in_process"]
    stages = f"{comp['stages']} stages, {comp['stage_executions']} executions"
    return [
        (
            f"pipeline run p50 ms: DSPex / in-process ({stages})",
            f"{piped['sequential_ms']['p50']:.1f} / {local['sequential_ms']['p50']:.1f}",
        ),
        ("pipeline overhead per stage, p50 ms", f"{comp['overhead_per_stage_p50_ms']:.2f}"),
        (
            "pipeline / in-process: latency p50, throughput",
            f"{comp['latency_ratio_p50']:.2f}, {comp['throughput_ratio']:.2f}",
        ),
        (
            "pipeline runs/s: DSPex / in-process",
            f"{piped['concurrent']['runs_per_s']:,.1f} / {local['concurrent']['runs_per_s']:,.1f}",
        ),
    ]


def _stage_rows(stages: dict[str, Any]) -> list[tuple[str, str]]:
    """The paced misses' time per stage: p50 of all, p50 of the slowest 1 %."""
    if not stages.get("all"):
        return []
    every, slow = stages["all"], stages["slowest_1pct"]
    cells = [f"{name} {every[name]['p50']:g} / {slow[name]['p50']:g}" for name in every]
    return [("miss stages ms, p50 all / slowest 1%", ", ".join(cells))]
