"""The whole benchmark suite with ``--quick`` counts, so it never rots.

It checks the report's structure only — every section present, every figure a
positive number, the chart written — never timings: those belong to a full run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.bench import run
from tests.bench.trace import STAGES

pytestmark = pytest.mark.integration

SECTIONS = (
    "machine",
    "config",
    "serde",
    "in_process",
    "ceiling",
    "pipeline",
    "scaling",
    "composition",
)
DERIVED = ("ratios", "targets", "saturated", "diagnostics", "cpu_ms_per_request")


def test_quick_run_writes_a_complete_report(bench_bootstrap: str, tmp_path: Path) -> None:
    code = run.main(["--quick", "--out", str(tmp_path), "--bootstrap", bench_bootstrap])

    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    for section in (*SECTIONS, *DERIVED):
        assert report[section], section
    assert_positive(report["serde"], "serde_us", "json_us", "serde_bytes")
    for figure in ("sync_loop", "run_sequential", "run_concurrent"):
        assert_positive(report["in_process"][figure], "per_s")
    assert_positive(report["in_process"]["run_paced"]["latency_ms"], "p50", "p99")
    relays = (report["ceiling"], report["ceiling"]["linger_5ms"], report["ceiling"]["two_hop"])
    for ceiling in relays:
        assert_positive(ceiling["saturation"], "per_s")
        assert_positive(ceiling["paced"], "p50", "p99")
    pipeline = report["pipeline"]
    for phase in ("miss_saturation", "hit_saturation"):
        assert_positive(pipeline[phase], "per_s")
        assert_positive(pipeline[phase]["cpu_percent"], "router", "client")
    # Cache hits never reach a pool, so an idle worker may honestly read 0 CPU there.
    assert_positive(pipeline["miss_saturation"]["cpu_percent"], "worker-1")
    assert pipeline["hit_saturation"]["cpu_percent"]["worker-1"] >= 0
    for phase in ("miss_paced", "hit_paced"):
        assert_positive(pipeline[phase], "p50", "p95", "p99")
    stages = pipeline["miss_paced"]["stages_ms"]
    assert stages["traced"] == stages["of"] == pipeline["miss_paced"]["samples"]
    assert set(stages["all"]) == {name for name, _, _ in STAGES}
    assert stages["all"]["router"]["p50"] >= 0 and stages["all"]["run"]["p99"] >= 0
    assert set(pipeline["exit_codes"]) == {"router", "worker-1", "worker-2"}
    assert [step["workers"] for step in report["scaling"]] == [1, 2]
    assert all(step["per_s"] > 0 for step in report["scaling"])
    assert set(report["targets"]) == {
        "pipeline_over_in_process",
        "overhead_p50_ms",
        "overhead_p99_ms",
        "cache_hit_over_two_hop_relay",
    }
    assert all(isinstance(t["met"], bool) for t in report["targets"].values())
    assert_composition(report["composition"], report["config"]["composition_runs"])
    assert (tmp_path / "report.png").stat().st_size > 10_000


def assert_composition(comp: dict[str, Any], runs: int) -> None:
    """The pipeline-overhead figure: both sides ran every run, with the same outputs."""
    assert comp["stages"] == 5 and comp["stage_executions"] == 7
    assert comp["same_outputs"] is True
    for side in ("pipeline", "in_process"):
        assert comp[side]["sequential_ms"]["samples"] == runs, side
        assert_positive(comp[side]["sequential_ms"], "p50", "p95", "p99")
        assert comp[side]["concurrent"]["runs"] == runs, side
        assert_positive(comp[side]["concurrent"], "runs_per_s")
    assert_positive(comp, "latency_ratio_p50", "throughput_ratio")
    assert isinstance(comp["overhead_per_stage_p50_ms"], float)
    assert set(comp["exit_codes"]) == {"pipeline", "router", "worker-1"}


def assert_positive(figures: dict[str, Any], *names: str) -> None:
    for name in names:
        value = figures[name]
        assert isinstance(value, int | float) and value > 0, (name, value)
