"""The routing scenarios on the simulated clock, shortened, so they never rot.

Structure only: every arm and figure present, shares that add up, a chart per
scenario. Never whether a target is met: that belongs to a full run.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.bench import routing_decide


def test_quick_scenarios_write_a_complete_report_and_charts(tmp_path: Path) -> None:
    code = routing_decide.main(["--quick", "--out", str(tmp_path), "--scenario", "drift"])

    assert code == 0
    report = json.loads((tmp_path / "routing-scenarios.json").read_text())
    assert set(report["scenarios"]) == {"drift"}
    for name, scenario in report["scenarios"].items():
        assert {"learned", "latency-router", "uniform", "fixed-B"} <= set(scenario["arms"])
        for arm, figures in scenario["arms"].items():
            assert figures["correct_per_s"] > 0, (name, arm)
            bins = list(zip(*figures["share_over_time"].values(), strict=True))
            assert bins and all(abs(sum(b) - 1.0) < 0.01 for b in bins if sum(b)), (name, arm)
        assert len(scenario["learned_vs_best_fixed"]) == report["runs"] == 1
        assert scenario["tables_run_1"], name  # the learner published tables
        assert (tmp_path / f"routing-share-{name}.png").stat().st_size > 10_000
    learned = report["scenarios"]["drift"]["arms"]["learned"]
    assert "move_off" in learned and "improved_majority_after_s" in learned
