"""The Thompson-sampling decision behind a routing table.

Pure: no Kafka, no clock, no global random state (pass a ``random.Random``), so
every decision is reproducible. :mod:`dspex.agents.learner.learner` feeds it the statistics of
:mod:`dspex.agents.learner.stats` and publishes what :func:`decide` returns as a RoutingTable;
``docs/learning.md`` explains the algorithm. Every weight is at least
``min_weight`` and finite.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from dspex.agents.learner.stats import TINY, ArmStats, ProgramStats, clean
from dspex.schemas.records import Record
from dspex.streams.settings import BanditConfig, Objective

_LOG2 = math.log(2)


@dataclass(frozen=True, slots=True)
class Decision:
    """What a new table says: weights, fallback order, why, and the statistics behind it."""

    weights: dict[str, float]
    p_best: dict[str, float]
    fallback: list[str]
    pools: dict[str, str]
    demoted: dict[str, str]
    reason: str
    learned_from: list[Record]
    cooling: dict[str, str] = field(default_factory=dict)
    """Variants cooling down (failures in a row, breaker open) and why."""
    wake_at: float | None = None
    """When the first of those cooldowns ends: the decision is due again then."""


@dataclass(frozen=True, slots=True)
class _Posterior:
    """One arm's posterior: Beta over reward, Normal over mean log-latency, point cost."""

    a: float
    b: float
    mu: float
    sd: float
    log2_cost: float
    penalty: float

    def draw(self, rng: random.Random, weights: tuple[float, float, float]) -> float:
        q, lat, c = weights
        utility = q * math.log2(max(rng.betavariate(self.a, self.b), TINY)) if q else 0.0
        if lat:
            utility -= lat * rng.gauss(self.mu, self.sd) / _LOG2
        return utility - c * self.log2_cost - self.penalty


def decide(
    stats: ProgramStats,
    candidates: Mapping[str, str],
    objective: Objective,
    cfg: BanditConfig,
    rng: random.Random,
    now_s: float,
    previous: Mapping[str, float] | None = None,
    previously_demoted: Iterable[str] = (),
    previously_cooling: Iterable[str] = (),
    since_s: float | None = None,
) -> Decision:
    """Weights by Thompson sampling over ``candidates`` (variant -> pool) and every seen arm.

    ``since_s`` is when the previous table was decided: change points after it are
    named in the reason.
    """
    arms = _arms_at(stats, candidates, now_s, cfg)
    pools = {name: candidates.get(name) or arm.pool for name, arm in arms.items()}
    learned = [arm.summary(name, cfg) for name, arm in arms.items()]
    demoted = {name: arm.demoted for name, arm in arms.items() if arm.demoted}
    cooling = {name: arm.cooling(now_s) for name, arm in arms.items() if arm.cooling(now_s)}
    probing = sorted(name for name, arm in arms.items() if arm.probing(now_s))
    wake = min((arms[name].cooldown_until for name in cooling), default=None)
    total = sum(arm.n for arm in arms.values())
    if total < 1e-6:
        even = dict.fromkeys(arms, 1.0 / len(arms)) if arms else {}
        reason = f"cold start: uniform over {len(arms)} variants (no executions yet)"
        if cooling:
            reason += "; " + "; ".join(_cooling_notes(cooling, arms, now_s))
        return Decision(even, even, sorted(arms), pools, {}, reason, learned, cooling, wake)
    posteriors = _posteriors(arms, objective, cfg)
    out = set(demoted) | set(cooling) | set(probing)
    # who may win a draw: healthy variants, else demoted or half-open ones, else (every
    # variant cooling) the one failing the fewest calls in a row right now, then the one
    # whose cooldown ends first: a variant with a long good history that fails every call
    # now must not keep the traffic on that history (an open breaker skips calls: it
    # extends a cooldown but adds no failure in a row)
    eligible = [n for n in arms if n not in out] or [n for n in arms if n not in cooling]
    all_cooling = not eligible
    if all_cooling:
        fewest = min(arm.fails_in_row for arm in arms.values())
        least = [name for name, arm in arms.items() if arm.fails_in_row <= fewest]
        first = min(arms[name].cooldown_until for name in least)
        eligible = [name for name in least if arms[name].cooldown_until <= first + 1e-9]
    wins, means = _thompson(posteriors, eligible, cfg.samples, rng, objective.weights())
    p_best = {name: wins[name] / cfg.samples for name in arms}
    floors = _floors(arms, cfg)
    for name in probing:  # half-open: probed at the full floor, so it proves itself soon
        floors[name] = max(floors[name], cfg.min_weight)
    weights = _floor_mix(p_best, floors)
    fallback = sorted(
        arms, key=lambda name: (name not in eligible, name in out, -means[name], name)
    )
    notes = [
        f"variant {n} penalized: breaks {objective.label()}"
        for n, p in posteriors.items()
        if p.penalty
    ]
    changes = [
        f"variant {name} change point: {arm.change}"
        for name, arm in sorted(arms.items())
        if arm.change and (since_s is None or arm.change_at > since_s)
    ]
    why = _reason(weights, p_best, demoted, previous, set(previously_demoted), total)
    over = [
        f"variant {name} cooldown over" for name in sorted(set(previously_cooling) - set(cooling))
    ]
    if all_cooling:
        why.insert(0, f"every variant cooling: {', '.join(sorted(eligible))} fails least now")
    half = [
        f"variant {name} half-open: {arms[name].half_open:.0f} more successes to win draws"
        for name in probing
    ]
    parts = [*_cooling_notes(cooling, arms, now_s), *over, *half, *changes, *why, *notes]
    return Decision(
        weights, p_best, fallback, pools, demoted, "; ".join(parts), learned, cooling, wake
    )


def floor(arm: ArmStats, cfg: BanditConfig) -> float:
    """A variant's exploration floor: ``min_weight`` with no evidence, down to ``min_floor``.

    ``min_weight * k / (k + n)`` with ``k = confident_events`` and ``n`` the variant's
    decayed count: certain evidence needs few probes, and evidence that decays away
    (or that a change point dropped) brings the probes back by itself.
    """
    high = max(cfg.min_weight, cfg.min_floor)
    shrunk = cfg.min_weight * cfg.confident_events / (cfg.confident_events + arm.n)
    return min(max(shrunk, cfg.min_floor), high)


def _floors(arms: Mapping[str, ArmStats], cfg: BanditConfig) -> dict[str, float]:
    """Each variant's floor, scaled down for a slow variant by the square of the fastest's
    mean latency over its own (to SLOW_FLOOR_SCALE at most): probes are paid in callers'
    time, not in requests, so the caller-time a slow variant's probes take still falls
    with its slowness (a variant 5x slower gets 1/25 of the floor, 1/5 of the time)."""
    means = {name: arm.mean_latency_ms for name, arm in arms.items() if arm.lat_n >= 1.0}
    fastest = min(means.values(), default=0.0)
    floors = {}
    for name, arm in arms.items():
        mean = means.get(name, 0.0)
        speed = fastest / mean if fastest > TINY and mean > TINY else 1.0
        floors[name] = floor(arm, cfg) * min(max(speed * speed, SLOW_FLOOR_SCALE), 1.0)
    return floors


SLOW_FLOOR_SCALE = 0.04
"""A slow variant's floor is scaled by at most this: it never drops below min_floor / 25."""


def _cooling_notes(
    cooling: Mapping[str, str], arms: Mapping[str, ArmStats], now_s: float
) -> list[str]:
    return [
        f"variant {name} cooling down {arms[name].cooldown_until - now_s:.0f} s: {why}"
        for name, why in sorted(cooling.items())
    ]


def _arms_at(
    stats: ProgramStats, candidates: Mapping[str, str], now_s: float, cfg: BanditConfig
) -> dict[str, ArmStats]:
    aged = stats.at(now_s, cfg).arms
    names = sorted(set(candidates) | set(aged))
    return {name: aged.get(name) or ArmStats(pool=candidates[name]) for name in names}


def _posteriors(
    arms: Mapping[str, ArmStats], objective: Objective, cfg: BanditConfig
) -> dict[str, _Posterior]:
    lat_n = sum(arm.lat_n for arm in arms.values())
    lat_sum = sum(arm.lat_sum for arm in arms.values())
    prior_mu = math.log(max(lat_sum / lat_n, 1e-3)) if lat_n > TINY else math.log(1e3)
    costs = [arm.c_sum / arm.c_n for arm in arms.values() if arm.c_n > TINY]
    # costs under a tenth of the priciest count as about equal: free must not dominate
    floor = 0.1 * max(costs) if costs and max(costs) > 0 else 1.0
    fill = sum(costs) / len(costs) if costs else 0.0
    return {
        name: _posterior(arm, prior_mu, floor, fill, objective, cfg) for name, arm in arms.items()
    }


def _posterior(
    arm: ArmStats, prior_mu: float, floor: float, fill: float, obj: Objective, cfg: BanditConfig
) -> _Posterior:
    k = arm.lat_n
    # the log of the MEAN latency: answers per second of a caller's time go with the mean
    # (a variant fast 90 % of the time and very slow otherwise is not as fast as its median)
    log_mean = arm.log_sum / k if k > TINY else prior_mu
    mean = math.log(max(arm.lat_sum / k, 1e-3)) if k > TINY else prior_mu
    var = max(arm.log_sq / k - log_mean * log_mean, 0.0) if k > TINY else 1.0
    mu = (prior_mu + k * mean) / (1.0 + k)  # a Normal prior worth one observation, sd e
    sd = math.sqrt((1.0 + k * var) / (1.0 + k) / (1.0 + k))
    cost = arm.c_sum / arm.c_n if arm.c_n > TINY else fill
    p95 = arm.p95_ms(cfg.p95_min_count)
    broken = (obj.max_p95_ms is not None and p95 is not None and p95 > obj.max_p95_ms) or (
        obj.max_cost_usd is not None and arm.c_n > TINY and cost > obj.max_cost_usd
    )
    failures = max(arm.n - arm.reward, 0.0)
    return _Posterior(
        a=1.0 + arm.reward,
        b=1.0 + failures,
        mu=mu,
        sd=sd,
        log2_cost=math.log2(cost + floor),
        penalty=obj.penalty if broken else 0.0,
    )


def _thompson(
    posteriors: Mapping[str, _Posterior],
    eligible: list[str],
    samples: int,
    rng: random.Random,
    weights: tuple[float, float, float],
) -> tuple[dict[str, int], dict[str, float]]:
    """How often each arm wins a joint posterior draw, and its mean drawn utility."""
    wins = dict.fromkeys(posteriors, 0)
    totals = dict.fromkeys(posteriors, 0.0)
    for _ in range(samples):
        draws = {name: _finite(post.draw(rng, weights)) for name, post in posteriors.items()}
        for name, utility in draws.items():
            totals[name] += utility
        wins[max(eligible, key=draws.__getitem__)] += 1
    return wins, {name: totals[name] / samples for name in posteriors}


def _finite(utility: float) -> float:
    return utility if math.isfinite(utility) else -1e9


def _floor_mix(p_best: Mapping[str, float], floors: Mapping[str, float]) -> dict[str, float]:
    """``floor_i + (1 - sum(floors)) * p_best_i``: sums to 1, nobody below their floor."""
    k = len(p_best)
    if k == 0:
        return {}
    spent = sum(floors[name] for name in p_best)
    if spent >= 1.0:
        return dict.fromkeys(p_best, 1.0 / k)
    mixed = {name: round(floors[name] + (1.0 - spent) * p, 4) for name, p in p_best.items()}
    if any(not math.isfinite(w) or w <= 0 for w in mixed.values()):
        return dict.fromkeys(p_best, 1.0 / k)  # unreachable by construction; never ship NaN
    return mixed


def _reason(
    weights: Mapping[str, float],
    p_best: Mapping[str, float],
    demoted: Mapping[str, str],
    previous: Mapping[str, float] | None,
    previously_demoted: set[str],
    total: float,
) -> list[str]:
    parts = [f"variant {name} demoted: {why}" for name, why in sorted(demoted.items())]
    parts += [f"variant {name} recovered" for name in sorted(previously_demoted - set(demoted))]
    top = max(sorted(weights), key=weights.__getitem__)
    old = _normalized(previous or {}).get(top)
    if old is None:
        parts.append(f"favouring {top}: p_best {p_best[top]:.2f} over {total:.0f} executions")
    elif weights[top] > old:
        parts.append(
            f"shifted toward {top}: p_best {p_best[top]:.2f} ({old:.2f} -> {weights[top]:.2f})"
        )
    else:
        parts.append(f"{top} stays ahead: p_best {p_best[top]:.2f}")
    return parts


def _normalized(weights: Mapping[str, float]) -> dict[str, float]:
    finite = {name: clean(w) or 0.0 for name, w in weights.items()}
    total = sum(finite.values())
    return {name: w / total for name, w in finite.items()} if total > 0 else finite


def changed(old: Mapping[str, float] | None, new: Mapping[str, float], threshold: float) -> bool:
    """True when a variant appeared or vanished, or any share moved more than ``threshold``,
    or a share of at least 0.01 moved to or from half or double (small shares are the
    exploration floors: 0.06 -> 0.02 is a third of the probes, not noise)."""
    if old is None or set(old) != set(new):
        return True
    before, after = _normalized(old), _normalized(new)
    for name in after:
        low, high = sorted((before[name], after[name]))
        if high - low > threshold or (high - low >= 0.01 and high >= 2 * low):
            return True
    return False


def pool_hints(
    arms: Iterable[ArmStats], in_flight: Mapping[str, int], cfg: BanditConfig
) -> dict[str, int]:
    """Consumers per pool by Little's law: rate x service time / (in-flight x utilization)."""
    load: dict[str, float] = {}
    for arm in arms:
        service_s = arm.svc_sum / arm.svc_n / 1000.0 if arm.svc_n > TINY else 0.0
        load[arm.pool] = load.get(arm.pool, 0.0) + arm.rate_per_s(cfg.half_life_s) * service_s
    hints = {}
    for pool, busy in sorted(load.items()):
        per_consumer = max(in_flight.get(pool, 1), 1) * cfg.target_utilization
        need = clean(busy / per_consumer, 0.0, float(cfg.max_consumers)) or 0.0
        hints[pool] = min(max(math.ceil(need), 1), cfg.max_consumers)
    return hints
