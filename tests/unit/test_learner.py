"""The learner's publication rhythm, without faust or a broker (a fake clock)."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from typing import Any

from dspex.agents.learner.learner import Learner
from dspex.agents.learner.stats import ProgramStats
from dspex.agents.plumbing.catalog import RoutingCatalog
from dspex.schemas import records
from dspex.streams.serde import make_serde
from dspex.streams.settings import BanditConfig, LearnerSettings, load_settings


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def _learner(clock: Clock) -> Learner:
    settings = load_settings()
    config = LearnerSettings(
        bandit=BanditConfig(half_life_s=3_600.0),
        seed=7,
        publish_interval_s=0.5,
        refresh_interval_s=2.0,
        candidates={"good": "general", "bad": "general"},
    )
    stats: dict[str, str] = {}
    return Learner(
        settings, config, make_serde(settings), stats, RoutingCatalog(), clock, random.Random(7)
    )


def _execution(variant: str, quality: float) -> dict[str, Any]:
    return records.telemetry(
        kind="execution",
        program_id="qa",
        pool="general",
        variant=variant,
        emitted_at=datetime.now(UTC),
        latency_ms=100.0,
        success=True,
        quality=quality,
    )


def _counted(table: dict[str, Any]) -> float:
    return float(sum(row["count"] for row in table["learned_from"]))


def test_evidence_that_moves_nothing_is_published_with_the_next_refresh() -> None:
    clock = Clock()
    learner = _learner(clock)
    tables = []
    for i in range(300):  # a burst, as a busy consumer reads it: one decision at the end
        learner.observe(_execution("good" if i % 2 == 0 else "bad", 0.95 if i % 2 == 0 else 0.5))
    tables += learner.due_tables()
    assert tables and _counted(tables[-1][1]) >= 299  # the burst moved the weights
    for _ in range(20):  # more of the same: nothing moves materially
        learner.observe(_execution("good", 0.95))
    clock.now += 0.6
    assert learner.due_tables() == []  # not published at once ...
    clock.now += 0.6
    assert learner.due_tables() == []  # ... nor before the refresh interval ...
    clock.now += 1.0
    ((program_id, refreshed),) = learner.due_tables()  # ... but then, with every observation
    assert program_id == "qa" and _counted(refreshed) >= 319
    clock.now += 5.0
    assert learner.due_tables() == []  # nothing new since: no table


def test_a_failed_attempt_teaches_its_variant_but_feedback_goes_to_who_answered() -> None:
    from dspex.agents.learner.stats import ProgramStats

    learner = _learner(Clock())
    failed = {**_execution("bad", 0.0), "kind": "attempt", "success": False}
    answered = _execution("good", 0.9)
    for record in (failed, answered):
        learner.observe({**record, "request_id": "r-1", "error_class": record.get("error_class")})
    arms = ProgramStats.from_json(learner.stats["qa"]).arms
    assert arms["bad"].n == 1 and arms["bad"].successes == 0
    assert arms["good"].successes == 1
    assert learner.answered.get("r-1") == "good"


def test_an_open_breaker_is_published_at_once_and_its_end_without_new_telemetry() -> None:
    clock = Clock()
    learner = _learner(clock)
    for i in range(100):
        learner.observe(_execution("good" if i % 2 == 0 else "bad", 0.9))
    clock.now += 1.0
    assert learner.due_tables()
    skipped = {
        **_execution("good", 0.0),
        "kind": "attempt",
        "success": False,
        "error_class": "CircuitOpen",
    }
    learner.observe(skipped)
    clock.now += 1.0
    ((_, table),) = learner.due_tables()
    print(f"\nbreaker open: {table['reason']}")
    assert "variant good cooling down 9 s: breaker open in a worker" in table["reason"]
    good = next(v for v in table["variants"] if v["name"] == "good")
    assert good["weight"] <= 0.05
    assert table["fallback"][-1] == "good"
    clock.now += 10.0  # no telemetry at all: the cooldown's end is a table of its own
    ((_, after),) = learner.due_tables()
    print(f"after the cooldown: {after['reason']}")
    assert "variant good cooldown over" in after["reason"]


def test_an_attempt_lends_no_latency_to_the_variant_that_gave_up() -> None:
    from dspex.agents.learner.stats import ProgramStats

    learner = _learner(Clock())
    learner.observe(_execution("bad", 1.0))  # 100 ms
    slow_request = {**_execution("bad", 0.0), "kind": "attempt", "success": False}
    learner.observe({**slow_request, "latency_ms": 9_000.0, "error_class": "APIError"})
    arm = ProgramStats.from_json(learner.stats["qa"]).arms["bad"]
    assert arm.n == 2 and arm.successes == 1
    assert arm.mean_latency_ms == 100.0  # the 9 s were the whole request, fallback included


def test_a_cooldown_is_published_at_once_not_after_the_publish_interval() -> None:
    clock = Clock()
    learner = _learner(clock)
    for i in range(100):
        learner.observe(_execution("good" if i % 2 == 0 else "bad", 0.9))
    assert learner.due_tables()
    clock.now += 0.1  # well inside publish_interval_s (0.5 s)
    for _ in range(3):
        learner.observe({**_execution("good", 0.0), "success": False, "error_class": "APIError"})
    ((_, table),) = learner.due_tables()
    assert "variant good cooling down" in table["reason"]
    learner.observe(_execution("bad", 0.9))
    assert learner.due_tables() == []  # ordinary evidence still waits for the interval


def test_a_telemetry_record_redelivered_after_a_rebalance_counts_once() -> None:
    """faust redelivers what was not committed when a rebalance moves the partition; the
    counts live in the table's changelog, so without the offsets beside them a redelivery
    counted twice (the learner-kill test on a busy machine: 20 fresh events, 39.9 counted)."""
    learner = _learner(Clock())
    for offset in range(5):
        learner.observe(_execution("good", 0.9), source="telemetry:0", offset=offset)
    for offset in range(5):  # the same five again, then one new
        learner.observe(_execution("good", 0.9), source="telemetry:0", offset=offset)
    learner.observe(_execution("good", 0.9), source="telemetry:0", offset=5)
    learner.observe(_execution("good", 0.9), source="telemetry:1", offset=0)  # another partition
    stats = ProgramStats.from_json(learner.stats["qa"])
    assert round(stats.arms["good"].n) == 7
    assert stats.seen == {"telemetry:0": 5, "telemetry:1": 0}
