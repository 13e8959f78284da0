"""The router A/B (faust vs the confluent-kafka experiment) with ``--quick`` counts.

Structure only: both arms ran, every request of both arms was answered, the
experiment's process exited cleanly on SIGTERM. Never timings (``docs/benchmarks.md``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bench import router_ab

pytestmark = pytest.mark.integration


def test_quick_router_ab_writes_both_arms(bench_bootstrap: str, tmp_path: Path) -> None:
    code = router_ab.main(["--quick", "--out", str(tmp_path), "--bootstrap", bench_bootstrap])

    assert code == 0
    result = json.loads((tmp_path / "router-ab.json").read_text())
    assert set(result["turns"]) == set(router_ab.ARMS)
    for arm, turns in result["turns"].items():
        assert len(turns) == 1, arm
        turn = turns[0]
        assert turn["hit_per_s"] > 0 and turn["cpu_ms_per_hit"]["router"] > 0, arm
        assert turn["failures"] == {"hits": 0, "misses": 0, "hit_paced": 0}, arm
        assert turn["miss_paced_ms"]["p50"] > 0 and turn["router_stage_ms"], arm
        assert turn["exit_codes"] == {"router": 0, "worker-1": 0}, arm
    assert set(result["summary"]["confluent_over_faust"]) == set(
        result["summary"]["median"]["faust"]
    )
