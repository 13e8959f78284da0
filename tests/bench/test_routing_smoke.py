"""The routing benchmark with ``--quick`` counts, so it never rots.

It checks the report's structure only — every arm and phase present, counts that
add up, a shift result per arm, both targets reported — never timings and never
whether a target is met: those belong to a full run (``docs/benchmarks.md``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.bench import routing_run

pytestmark = pytest.mark.integration

ARMS = {"learned", "static", "litellm"}
PHASES = ("steady", "converged", "drift")


def test_quick_routing_run_writes_a_complete_report(bench_bootstrap: str, tmp_path: Path) -> None:
    code = routing_run.main(["--quick", "--out", str(tmp_path), "--bootstrap", bench_bootstrap])

    assert code == 0
    report = json.loads((tmp_path / "routing.json").read_text())
    for section in ("machine", "config", "simulation", "arms", "comparison", "targets"):
        assert report[section], section
    assert set(report["arms"]) == ARMS
    backends = {b["name"] for b in report["config"]["backends"]}
    config = report["config"]
    for arm, figures in report["arms"].items():
        for phase in PHASES:
            assert_phase(figures[phase], backends, (arm, phase))
        assert figures["steady"]["requests"] == config["steady_requests"]
        assert figures["drift"]["requests"] == config["drift_requests"]
        shift = figures["shift"]
        assert shift["degraded"] in backends and shift["at_request"] == config["steady_requests"]
        assert shift["requests_to_shift"] is None or shift["requests_to_shift"] >= 0
    for arm in ("learned", "static"):
        assert report["arms"][arm]["quality_source"] in ("worker", "client")
        assert set(report["arms"][arm]["exit_codes"]) >= {"router", "worker-1"}
    assert "learner" in report["arms"]["learned"]["exit_codes"]
    assert report["arms"]["learned"]["tables"][0]["version"] == 1
    assert report["arms"]["litellm"]["router"]["routing_strategy"] == "latency-based-routing"
    assert set(report["targets"]) == {"learned_vs_static", "learned_vs_litellm"}
    assert all(isinstance(t["met"], bool) for t in report["targets"].values())
    assert isinstance(report["warnings"], list)


def assert_phase(phase: dict[str, Any], backends: set[str], where: tuple[str, str]) -> None:
    assert phase["requests"] > 0, where
    assert phase["answered"] + phase["failed"] == phase["requests"], where
    assert 0 <= phase["correct"] <= phase["answered"], where
    assert phase["elapsed_s"] > 0 and phase["correct_per_s"] >= 0, where
    assert set(phase["share"]) == backends, where
    assert abs(sum(phase["share"].values()) - 1.0) < 0.01, where
    assert phase["backend_calls_per_request"] > 0, where
    for q in ("p50", "p95", "p99"):
        assert phase["latency_ms"][q] >= 0, (where, q)
