"""The learning agent's statistics and decisions: seeded simulations, no broker, no clock."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field

import pytest

from dspex.agents.learner.bandit import (
    SLOW_FLOOR_SCALE,
    Decision,
    changed,
    decide,
    pool_hints,
)
from dspex.agents.learner.stats import ArmStats, Observation, ProgramStats
from dspex.streams.settings import BanditConfig, Objective

CFG = BanditConfig(half_life_s=60.0)
QUALITY = Objective(kind="quality")


@dataclass
class Sim:
    """Routes events by the current weights and feeds their seeded outcomes back."""

    specs: dict[str, tuple[float, float]]  # variant -> (success probability, latency ms)
    objective: Objective = QUALITY
    seed: int = 1
    t: float = 1_000.0
    dt: float = 0.1
    stats: ProgramStats = field(default_factory=ProgramStats)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.decision = self.decide()
        self.routed: dict[str, int] = dict.fromkeys(self.specs, 0)

    @property
    def candidates(self) -> dict[str, str]:
        return dict.fromkeys(self.specs, "general")

    def decide(self, previous: Decision | None = None) -> Decision:
        weights = previous.weights if previous else None
        demoted = previous.demoted if previous else ()
        return decide(
            self.stats, self.candidates, self.objective, CFG, self.rng, self.t, weights, demoted
        )

    def step(self) -> str:
        names = sorted(self.decision.weights)
        variant = self.rng.choices(names, [self.decision.weights[n] for n in names])[0]
        success_p, latency = self.specs[variant]
        latency *= self.rng.lognormvariate(0.0, 0.2)
        obs = Observation.of(variant, "general", self.t, self.rng.random() < success_p, latency)
        assert obs is not None
        self.stats.observe(obs, self.t, CFG)
        self.routed[variant] += 1
        self.t += self.dt
        return variant

    def run(self, events: int, every: int = 10) -> Decision:
        for i in range(events):
            self.step()
            if (i + 1) % every == 0:
                self.decision = self.decide(self.decision)
        return self.decision


def test_converges_on_a_clearly_better_variant() -> None:
    sim = Sim({"good": (0.95, 200.0), "bad": (0.5, 200.0)})
    decision = sim.run(500)
    print(f"\n500 events routed={sim.routed} weights={decision.weights} ({decision.reason})")
    assert decision.weights["good"] >= 0.8
    # the floor shrank with the evidence, but never below min_floor
    assert CFG.min_floor <= decision.weights["bad"] < CFG.min_weight
    assert decision.fallback == ["good", "bad"]
    stats = {s["variant"]: s for s in decision.learned_from}
    assert stats["good"]["successes"] / stats["good"]["count"] > 0.9
    assert stats["good"]["p95_latency_ms"] is not None


def test_latency_objective_prefers_the_faster() -> None:
    sim = Sim({"fast": (0.95, 100.0), "slow": (0.95, 400.0)}, Objective(kind="latency"))
    decision = sim.run(300)
    print(f"\nlatency objective weights={decision.weights}")
    assert decision.weights["fast"] >= 0.8
    assert "latency" in Objective(kind="latency").label()


def test_p95_constraint_penalizes_the_violating_variant() -> None:
    objective = Objective(kind="quality", max_p95_ms=500.0)
    sim = Sim({"accurate": (0.97, 900.0), "quick": (0.9, 200.0)}, objective)
    decision = sim.run(300)
    print(f"\np95<=500ms weights={decision.weights} ({decision.reason})")
    assert decision.weights["quick"] >= 0.8
    assert "variant accurate penalized" in decision.reason
    assert decision.fallback[0] == "quick"


def test_degraded_variant_is_demoted_quickly_and_recovers() -> None:
    sim = Sim({"a": (0.98, 200.0), "b": (0.8, 200.0)})
    sim.run(600)
    assert sim.decision.weights["a"] >= 0.8
    sim.specs["a"] = (0.2, 200.0)  # error rate 0.02 -> 0.8
    events = 0
    while "a" not in sim.decision.demoted and "a" not in sim.decision.cooling:
        sim.step()
        events += 1
        sim.decision = sim.decide(sim.decision)
        assert events <= 30, "not demoted within 30 events"
    print(f"\ndemoted after {events} events: {sim.decision.reason}")
    assert sim.decision.weights["a"] <= CFG.min_weight
    assert (
        "variant a cooling down" in sim.decision.reason
        or "variant a demoted" in sim.decision.reason
    )
    assert sim.decision.fallback[-1] == "a"

    sim.run(100)  # still degraded: the floor keeps probing it
    assert CFG.min_floor * SLOW_FLOOR_SCALE <= sim.decision.weights["a"] <= CFG.min_weight
    sim.specs["a"] = (0.98, 200.0)
    sim.run(3_000)
    print(f"recovered: weights={sim.decision.weights} routed={sim.routed}")
    assert "a" not in sim.decision.demoted
    assert sim.decision.weights["a"] >= 0.8


def test_latency_jump_is_a_change_point_with_a_reason() -> None:
    sim = Sim({"a": (0.98, 100.0), "b": (0.9, 100.0)})
    sim.run(400)
    sim.specs["a"] = (0.98, 2_000.0)
    for _ in range(30):
        sim.step()
        sim.decision = sim.decide(sim.decision)
        if "change point" in sim.decision.reason:
            break
    print(f"\nlatency jump: {sim.decision.reason}")
    assert "variant a change point: latency" in sim.decision.reason


def test_decay_follows_drift() -> None:
    sim = Sim({"a": (0.9, 200.0), "b": (0.6, 200.0)})
    first = sim.run(600)
    sim.specs = {"a": (0.6, 200.0), "b": (0.9, 200.0)}
    second = sim.run(1_500)
    print(f"\nbefore swap {first.weights}, 150 s after {second.weights}")
    assert first.weights["a"] >= 0.8
    assert second.weights["b"] >= 0.8


def test_cold_start_is_uniform_over_candidates() -> None:
    candidates = {"x": "general", "y": "gpu", "z": "general"}
    decision = decide(ProgramStats(), candidates, QUALITY, CFG, random.Random(0), 10.0)
    assert decision.weights == {"x": 1 / 3, "y": 1 / 3, "z": 1 / 3}
    assert decision.pools == candidates
    assert decision.reason.startswith("cold start")
    assert all(s["count"] == 0.0 and s["p95_latency_ms"] is None for s in decision.learned_from)


def test_a_new_variant_is_explored_next_to_known_ones() -> None:
    sim = Sim({"old": (0.9, 200.0)})
    sim.run(200)
    both = {"old": "general", "new": "general"}
    decision = decide(sim.stats, both, QUALITY, CFG, random.Random(3), sim.t)
    assert decision.weights["new"] >= CFG.min_weight


BAD = [math.nan, math.inf, -math.inf, -1.0, 0.0, None, "12", True, 1e308]


@pytest.mark.parametrize("bad", BAD)
def test_bad_inputs_never_produce_nan_or_zero_weights(bad: object) -> None:
    stats = ProgramStats()
    for i in range(50):
        for obs in (
            Observation.of("a", "general", bad, True, bad, bad, bad, bad),
            Observation.of("b", bad, 1_000.0 + i, i % 2 == 0, 100.0, bad, bad, bad),
            Observation.of(bad, "general", 1_000.0, True),
            Observation.of("c", "general", 1_000.0, bad),
        ):
            if obs is not None:
                stats.observe(obs, 1_000.0 + i, CFG)
    decision = decide(stats, {"a": "general"}, Objective(), CFG, random.Random(0), 2_000.0)
    _assert_sane(decision)


def test_poisoned_stored_statistics_are_sanitized() -> None:
    poison = {
        "a": {
            "n": math.nan,
            "successes": -5,
            "reward": math.inf,
            "lat_n": 1e300,
            "hist": {"3": -1},
        },
        "b": {"n": 0, "successes": 0, "log_sum": math.nan, "c_n": 3, "c_sum": -2, "pool": None},
        "c": {"n": 10, "successes": 50, "hist": {"999": 5, "x": 1}, "demoted": None},
        "e": {
            "n": 30,
            "recent": [[1, 1, 5], [math.nan, 0, 1], "x", [1, 2]],
            "cusum": [1, math.inf],
        },
        "f": {"n": 30, "cusum": [math.nan, -1, 2, 3, 4, 5, 6, 1e300], "cooldown_until": math.inf},
        "d": "not a dict",
    }
    stats = ProgramStats.from_json(json.dumps(poison))
    assert set(stats.arms) == {"a", "b", "c", "e", "f"}
    assert stats.arms["e"].recent == [[1.0, 1.0, 5.0]] and stats.arms["e"].cusum == [0.0] * 8
    assert stats.arms["f"].cusum[:2] == [0.0, 0.0] and stats.arms["f"].cusum[7] == 1e12
    assert stats.arms["c"].successes == 10  # never more successes than executions
    for objective in (Objective(), Objective(kind="latency"), Objective(kind="cost")):
        decision = decide(stats, {}, objective, CFG, random.Random(0), 5.0)
        _assert_sane(decision)
    assert ProgramStats.from_json("{not json").arms == {}
    assert ProgramStats.from_json("[1, 2]").arms == {}


def _assert_sane(decision: Decision) -> None:
    weights = list(decision.weights.values())
    lowest = CFG.min_floor * SLOW_FLOOR_SCALE - 1e-9
    assert weights and all(math.isfinite(w) and w >= lowest for w in weights)
    assert sum(weights) == pytest.approx(1.0, abs=1e-3)
    for row in decision.learned_from:
        for key, value in row.items():
            assert key == "variant" or value is None or math.isfinite(value), (key, value)
    json.dumps(decision.learned_from, allow_nan=False)


def test_stats_roundtrip_through_json() -> None:
    sim = Sim({"a": (0.9, 150.0), "b": (0.7, 300.0)})
    sim.run(200)
    loaded = ProgramStats.from_json(sim.stats.to_json())
    assert loaded == sim.stats


def test_pool_hints_follow_littles_law_and_stay_bounded() -> None:
    def arm(pool: str, per_s: float, service_ms: float) -> ArmStats:
        stats = ArmStats(pool=pool)
        for i in range(int(per_s * 60)):
            obs = Observation.of("v", pool, i / per_s, True, service_ms, 0.0)
            assert obs is not None
            stats.observe(obs, i / per_s, CFG)
        return stats

    in_flight = {"general": 1, "gpu": 1, "optimizer": 4}
    busy = arm("general", 10.0, 300.0)  # 10/s x 0.3 s = 3 busy / 0.7 -> 5
    assert pool_hints([busy], in_flight, CFG) == {"general": 5}
    flood = arm("gpu", 100.0, 5_000.0)
    idle = arm("optimizer", 0.2, 10.0)
    poisoned = ArmStats.from_dict({"pool": "general", "n": math.inf, "svc_n": 1, "svc_sum": 1e12})
    hints = pool_hints([flood, idle, poisoned], in_flight, CFG)
    print(f"\npool hints {hints}")
    assert hints == {"general": 1, "gpu": 16, "optimizer": 1}  # inf is no count


def test_material_change() -> None:
    assert changed(None, {"a": 1.0}, 0.05)
    assert changed({"a": 0.5, "b": 0.5}, {"a": 0.5, "c": 0.5}, 0.05)
    assert changed({"a": 0.5, "b": 0.5}, {"a": 0.6, "b": 0.4}, 0.05)
    assert not changed({"a": 0.5, "b": 0.5}, {"a": 0.53, "b": 0.47}, 0.05)
    # a floor that shrank to a third is worth a table: 4 % of traffic back to the best
    assert changed({"a": 0.9, "b": 0.06, "c": 0.04}, {"a": 0.96, "b": 0.02, "c": 0.02}, 0.05)
    assert not changed(
        {"a": 0.985, "b": 0.01, "c": 0.005}, {"a": 0.99, "b": 0.006, "c": 0.004}, 0.05
    )
    assert not changed({"a": 2.0, "b": 2.0}, {"a": 0.5, "b": 0.5}, 0.05)  # shares, not raw
    assert changed({"a": math.nan, "b": 1.0}, {"a": 0.5, "b": 0.5}, 0.05)


def test_objective_labels() -> None:
    assert Objective(kind="quality").label() == "quality"
    mixed = Objective(kind="balanced", latency_weight=0.5, max_p95_ms=2000)
    assert mixed.label() == "balanced(quality=1,latency=0.5,cost=0.25); p95<=2000ms"


def test_feedback_replaces_the_default_reward_with_the_score() -> None:
    stats = ProgramStats()
    t = 1_000.0
    for i in range(200):
        variant = "terse" if i % 2 else "thorough"
        obs = Observation.of(variant, "general", t, True, 100.0)
        assert obs is not None
        stats.observe(obs, t, CFG)
        score = 0.2 if variant == "terse" else 0.9
        assert stats.feedback(variant, score, t, t, CFG)
        t += 0.1
    decision = decide(
        stats,
        {"terse": "general", "thorough": "general"},
        QUALITY,
        CFG,
        random.Random(3),
        t,
        None,
        (),
    )
    learned = {s["variant"]: s for s in decision.learned_from}
    print(f"\nfeedback-only difference: weights={decision.weights}")
    assert learned["terse"]["mean_quality"] == pytest.approx(0.2, abs=0.01)
    assert learned["thorough"]["mean_quality"] == pytest.approx(0.9, abs=0.01)
    assert decision.weights["thorough"] >= 0.8


@pytest.mark.parametrize("bad", [math.nan, math.inf, "0.5", None, True])
def test_feedback_with_a_bad_score_or_unknown_variant_changes_nothing(bad: object) -> None:
    stats = ProgramStats()
    obs = Observation.of("a", "general", 10.0, True, 100.0)
    assert obs is not None
    stats.observe(obs, 10.0, CFG)
    before = stats.to_json()
    assert not stats.feedback("a", bad, 10.0, 10.0, CFG)
    assert not stats.feedback("nobody", 0.5, 10.0, 10.0, CFG)
    assert stats.to_json() == before
