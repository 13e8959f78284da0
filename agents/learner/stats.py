"""Decayed per-(program, variant) statistics, and the objective and config they are judged by.

Pure: no Kafka, no clock. Guards, because one bad number must never break routing
(LiteLLM #35590): an :class:`Observation` drops non-finite or negative inputs,
stored statistics are sanitized when loaded, and Beta parameters are always
``1 + decayed count >= 1``. :mod:`dspex.agents.learner.bandit` turns them into decisions.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from dspex.schemas import records
from dspex.schemas.records import Record
from dspex.streams.settings import BanditConfig

_LOG2 = math.log(2)
_HIST_BASE = 1.25  # latency histogram: bucket i >= 1 holds [1.25**(i-1), 1.25**i) ms
_HIST_BUCKETS = 64  # the last bucket (>= 1.25**62 ms, about 18 min) is open-ended
TINY = 1e-9
BREAKER_OPEN = "CircuitOpen"
"""The error class a worker reports for a variant it skipped because its breaker is open."""
_MAX = 1e12  # stored statistics beyond this are corrupt, not traffic


def clean(value: object, low: float = 0.0, high: float = math.inf) -> float | None:
    """A finite float clamped to [low, high], else ``None`` (bools and junk included)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return min(max(float(value), low), high)


@dataclass(frozen=True, slots=True)
class Observation:
    """One execution outcome, already sanitized: build it with :meth:`of`."""

    variant: str
    pool: str
    at_s: float | None
    success: bool
    latency_ms: float | None = None
    service_ms: float | None = None
    quality: float | None = None
    cost_usd: float | None = None
    breaker_open: bool = False
    """The variant was not called: its circuit breaker in a worker is open (no measurement)."""

    @classmethod
    def of(
        cls,
        variant: object,
        pool: object,
        at_s: object,
        success: object,
        latency_ms: object = None,
        queue_wait_ms: object = None,
        quality: object = None,
        cost_usd: object = None,
        error_class: object = None,
    ) -> Observation | None:
        """``None`` when the record cannot teach anything (no variant, no outcome)."""
        if not isinstance(variant, str) or not variant or not isinstance(success, bool):
            return None
        latency = clean(latency_ms)
        wait = clean(queue_wait_ms)
        service = None if latency is None else max(latency - (wait or 0.0), 0.0)
        return cls(
            variant=variant,
            pool=pool if isinstance(pool, str) and pool else "general",
            at_s=clean(at_s),
            success=success,
            latency_ms=latency,
            service_ms=service,
            quality=clean(quality, 0.0, 1.0),
            cost_usd=clean(cost_usd),
            breaker_open=not success and error_class == BREAKER_OPEN,
        )


_DECAYED = (
    "n successes reward lat_n lat_sum log_sum log_sq svc_n svc_sum q_n q_sum c_n c_sum".split()
)


@dataclass
class ArmStats:
    """Decayed statistics of one variant (an "arm"), plus its fast anomaly window."""

    pool: str = "general"
    first_at: float = 0.0
    updated_at: float = 0.0
    n: float = 0.0
    successes: float = 0.0
    reward: float = 0.0
    lat_n: float = 0.0
    lat_sum: float = 0.0
    log_sum: float = 0.0
    log_sq: float = 0.0
    svc_n: float = 0.0
    svc_sum: float = 0.0
    q_n: float = 0.0
    q_sum: float = 0.0
    c_n: float = 0.0
    c_sum: float = 0.0
    hist: list[float] = field(default_factory=lambda: [0.0] * _HIST_BUCKETS)
    fast_n: float = 0.0
    fast_fail: float = 0.0
    fast_lat_n: float = 0.0
    fast_lat_sum: float = 0.0
    demoted: str = ""  # why the variant is demoted; empty = healthy
    recent: list[list[float]] = field(default_factory=list)
    """The last ``fast_window_events`` outcomes as [ok, reward, latency ms or -1], oldest first."""
    cusum: list[float] = field(default_factory=lambda: [0.0] * 8)
    """Page-Hinkley sums and run lengths: reward up, reward down, log-latency up, down."""
    fails_in_row: float = 0.0
    cooldown_until: float = 0.0
    cooldown: str = ""  # why the variant cools down (until cooldown_until)
    half_open: float = 0.0
    """Successes still needed after a cooldown before the variant may win draws again."""
    change_at: float = 0.0
    change: str = ""  # the last change point: what moved, and from what to what

    def decay_to(self, t: float, half_life_s: float) -> None:
        """Age the slow statistics to time ``t`` (never backwards: late events just count)."""
        if self.updated_at <= 0.0:
            self.first_at = self.updated_at = t
            return
        if t <= self.updated_at:
            return
        factor = 0.5 ** ((t - self.updated_at) / half_life_s)
        for name in _DECAYED:
            setattr(self, name, getattr(self, name) * factor)
        self.hist = [h * factor for h in self.hist]
        self.updated_at = t

    def observe(self, obs: Observation, t: float, cfg: BanditConfig) -> None:
        """Add one outcome at time ``t``: change points, cooldown and anomaly state follow.

        A skipped call (breaker open) measures nothing about the backend: it only
        starts or extends the variant's cooldown.
        """
        self.decay_to(t, cfg.half_life_s)
        if obs.breaker_open:
            self._cool(t, cfg, "breaker open in a worker")
            return
        ok = 1.0 if obs.success else 0.0
        reward = ok * (1.0 if obs.quality is None else obs.quality)
        base_error = self.error_rate
        change = self._change_point(ok, reward, obs.quality is not None, obs.latency_ms, cfg)
        self.recent = [
            *self.recent,
            [ok, reward, -1.0 if obs.latency_ms is None else obs.latency_ms],
        ]
        self.recent = self.recent[-cfg.fast_window_events :]
        self.n += 1.0
        self.successes += ok
        self.reward += reward
        keep = 1.0 - 1.0 / cfg.fast_window_events
        self.fast_n = self.fast_n * keep + 1.0
        self.fast_fail = self.fast_fail * keep + (1.0 - ok)
        if obs.latency_ms is not None:
            self._latency(obs.latency_ms, obs.service_ms, keep)
        if obs.quality is not None:
            self.q_n, self.q_sum = self.q_n + 1.0, self.q_sum + obs.quality
        if obs.cost_usd is not None:
            self.c_n, self.c_sum = self.c_n + 1.0, self.c_sum + obs.cost_usd
        self.demoted = _anomaly(self, cfg)
        if change is not None:
            self._rebase(change[0], change[1], t, cfg)
            # fewer good answers: out of the draws at once (a latency change only rebuilds
            # the statistics: the objective decides what latency is worth)
            if change[2] and change[1] == "reward" and not self.demoted:
                self.demoted = f"change point: {self.change}"
        self.fails_in_row = 0.0 if ok else self.fails_in_row + 1.0
        if ok and t >= self.cooldown_until:
            self.half_open = max(self.half_open - 1.0, 0.0)
        if self.fails_in_row >= _surprising_run(base_error, cfg):
            self._cool(t, cfg, f"{self.fails_in_row:.0f} failures in a row")

    def cooling(self, now_s: float) -> str:
        """Why the variant is cooling down at ``now_s``; "" when it is not."""
        return self.cooldown if now_s < self.cooldown_until else ""

    def probing(self, now_s: float) -> bool:
        """Half-open: the cooldown is over but too few calls since have succeeded."""
        return self.half_open > 0 and now_s >= self.cooldown_until

    def _cool(self, t: float, cfg: BanditConfig, why: str) -> None:
        self.cooldown_until = max(self.cooldown_until, t + cfg.cooldown_s)
        self.cooldown = why
        self.half_open = float(cfg.cooldown_failures)

    def _change_point(
        self, ok: float, reward: float, scored: bool, latency_ms: float | None, cfg: BanditConfig
    ) -> tuple[int, str, bool] | None:
        """Two-sided Page-Hinkley tests of this outcome against the slow means.

        An unscored outcome (its quality may come later, as feedback) is tested by
        its success against the success rate, a scored one by its reward against
        the mean reward. Returns (outcomes since the change began, what changed)
        and whether it is for the worse) when a sum crosses its threshold, else None.
        Nothing is tested before
        ``min_baseline_events``.
        """
        if self.n < cfg.min_baseline_events:
            self.cusum = [0.0] * 8
            return None
        cusum = self.cusum
        deviation = reward - self.reward / self.n if scored else ok - self.successes / self.n
        _page_hinkley(cusum, 0, deviation, cfg.change_reward_delta)
        if latency_ms is not None and self.lat_n >= 1.0:
            log_mean = self.log_sum / self.lat_n
            _page_hinkley(
                cusum, 4, math.log(max(latency_ms, 1e-3)) - log_mean, cfg.change_latency_delta
            )
        limits = (
            cfg.change_reward_h,
            cfg.change_reward_h,
            cfg.change_latency_h,
            cfg.change_latency_h,
        )
        for which, limit in enumerate(limits):
            if cusum[2 * which] > limit:
                what = ("reward", "reward", "latency", "latency")[which]
                return int(cusum[2 * which + 1]), what, which in (1, 2)
        return None

    def _rebase(self, length: int, what: str, t: float, cfg: BanditConfig) -> None:
        """A change point: the evidence since the change replaces everything before it."""
        length = max(length, int(cfg.min_fast_events))
        segment = self.recent[-length:]
        old_reward = self.reward / self.n if self.n > TINY else 0.0
        old_log = self.log_sum / self.lat_n if self.lat_n > TINY else 0.0
        old_n, n = self.n, float(len(segment))
        scale = n / old_n if old_n > TINY else 0.0
        for name in ("svc_n", "svc_sum", "q_n", "q_sum", "c_n", "c_sum"):
            setattr(self, name, getattr(self, name) * scale)
        self.n = n
        self.successes = sum(row[0] for row in segment)
        self.reward = sum(row[1] for row in segment)
        if self.q_n > TINY:
            self.q_n, self.q_sum = self.successes, self.reward
        latencies = [row[2] for row in segment if row[2] >= 0.0]
        self.hist = [0.0] * _HIST_BUCKETS
        self.lat_n = self.lat_sum = self.log_sum = self.log_sq = 0.0
        for latency in latencies:
            log = math.log(max(latency, 1e-3))
            self.lat_n, self.lat_sum = self.lat_n + 1.0, self.lat_sum + latency
            self.log_sum, self.log_sq = self.log_sum + log, self.log_sq + log * log
            self.hist[_bucket(latency)] += 1.0
        self.cusum = [0.0] * 8
        if what == "reward":
            new = self.reward / n if n > TINY else 0.0
            self.change = f"reward {new:.2f} vs {old_reward:.2f} over the last {len(segment)}"
        else:
            new_ms = math.exp(self.log_sum / self.lat_n) if self.lat_n > TINY else 0.0
            self.change = (
                f"latency {new_ms:.0f} ms vs {math.exp(old_log):.0f} ms"
                f" over the last {len(segment)}"
            )
        self.change_at = t

    def feedback(self, quality: float, t: float, cfg: BanditConfig) -> None:
        """A client's late quality score for one answered request of this arm.

        The execution counted a full reward of 1 when it had no score; the
        feedback replaces that 1 with ``quality`` and joins the quality mean.
        """
        self.decay_to(t, cfg.half_life_s)
        self.reward = min(max(self.reward + quality - 1.0, 0.0), self.successes)
        for row in reversed(self.recent):  # the newest unscored answer takes the score
            if row[0] == 1.0 and row[1] == 1.0:
                row[1] = quality
                break
        self.q_n, self.q_sum = self.q_n + 1.0, self.q_sum + quality

    def _latency(self, latency: float, service: float | None, keep: float) -> None:
        log = math.log(max(latency, 1e-3))
        self.lat_n += 1.0
        self.lat_sum += latency
        self.log_sum += log
        self.log_sq += log * log
        self.hist[_bucket(latency)] += 1.0
        self.svc_n += 1.0
        self.svc_sum += latency if service is None else service
        self.fast_lat_n = self.fast_lat_n * keep + 1.0
        self.fast_lat_sum = self.fast_lat_sum * keep + latency

    @property
    def error_rate(self) -> float:
        return 1.0 - self.successes / self.n if self.n > TINY else 0.0

    @property
    def mean_latency_ms(self) -> float:
        return self.lat_sum / self.lat_n if self.lat_n > TINY else 0.0

    def p95_ms(self, min_count: float) -> float | None:
        """95th percentile latency from the decayed histogram (about +-12%)."""
        total = sum(self.hist)
        if total < min_count:
            return None
        target, seen = 0.95 * total, 0.0
        for index, count in enumerate(self.hist):
            if count > 0 and seen + count >= target:
                return _bucket_value(index, (target - seen) / count)
            seen += count
        return _bucket_value(_HIST_BUCKETS - 1, 0.0)

    def rate_per_s(self, half_life_s: float) -> float:
        """Arrival rate: decayed count over the decay kernel's mass since the first event."""
        elapsed = max(self.updated_at - self.first_at, 0.0)
        decay = _LOG2 / half_life_s
        window = (1.0 - math.exp(-decay * elapsed)) / decay
        return self.n / max(window, 1.0)

    def summary(self, name: str, cfg: BanditConfig) -> Record:
        """The Avro ``VariantStats`` record of this arm."""
        return records.variant_stats(
            variant=name,
            count=round(self.n, 3),
            successes=round(self.successes, 3),
            mean_latency_ms=round(self.mean_latency_ms, 3),
            p95_latency_ms=_round(self.p95_ms(cfg.p95_min_count)),
            mean_quality=_round(self.q_sum / self.q_n if self.q_n > TINY else None),
            mean_cost_usd=_round(self.c_sum / self.c_n if self.c_n > TINY else None, 9),
        )

    def to_dict(self) -> Record:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "hist"}
        data["hist"] = {str(i): h for i, h in enumerate(self.hist) if h > 0}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ArmStats:
        """Load stored statistics; any non-finite or negative number becomes 0."""
        arm = cls()
        for f in fields(cls):
            if f.name in _NOT_NUMBERS:
                continue
            setattr(arm, f.name, clean(data.get(f.name), 0.0, _MAX) or 0.0)
        arm.pool = str(data.get("pool") or "general")
        arm.demoted = str(data.get("demoted") or "")
        arm.cooldown = str(data.get("cooldown") or "")
        arm.change = str(data.get("change") or "")
        arm.recent = _rows(data.get("recent"))
        cusum = data.get("cusum")
        if isinstance(cusum, list) and len(cusum) == 8:
            arm.cusum = [clean(value, 0.0, _MAX) or 0.0 for value in cusum]
        hist = data.get("hist")
        for key, value in hist.items() if isinstance(hist, Mapping) else ():
            if str(key).isdigit() and int(key) < _HIST_BUCKETS:
                arm.hist[int(key)] = clean(value, 0.0, _MAX) or 0.0
        arm.successes = min(arm.successes, arm.n)
        arm.reward = min(arm.reward, arm.successes)
        return arm


_NOT_NUMBERS = frozenset({"pool", "demoted", "hist", "recent", "cusum", "cooldown", "change"})


def _rows(value: object) -> list[list[float]]:
    """Stored recent outcomes: rows of three finite numbers, anything else dropped."""
    rows = []
    for row in value if isinstance(value, list) else ():
        if isinstance(row, list) and len(row) == 3:
            ok, reward, latency = (clean(v, -1.0, _MAX) for v in row)
            if ok is not None and reward is not None and latency is not None:
                rows.append([min(max(ok, 0.0), 1.0), min(max(reward, 0.0), 1.0), latency])
    return rows[-1000:]


def _surprising_run(error_rate: float, cfg: BanditConfig) -> float:
    """Failures in a row that the variant's own error rate makes unlikely (``cooldown_surprise``).

    At least ``cooldown_failures``: a variant that often fails anyway is not cooled
    down by its usual runs of failures (it already gets little traffic).
    """
    if error_rate <= TINY:
        return float(cfg.cooldown_failures)
    if error_rate >= 0.99:
        return math.inf
    return max(
        float(cfg.cooldown_failures),
        math.ceil(math.log(cfg.cooldown_surprise) / math.log(error_rate)),
    )


def _page_hinkley(cusum: list[float], at: int, deviation: float, delta: float) -> None:
    """Update the upward (``at``) and downward (``at + 2``) sums and their run lengths."""
    for index, step in ((at, deviation - delta), (at + 2, -deviation - delta)):
        cusum[index] = max(0.0, cusum[index] + step)
        cusum[index + 1] = cusum[index + 1] + 1.0 if cusum[index] > 0.0 else 0.0


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _bucket(latency_ms: float) -> int:
    if latency_ms < 1.0:
        return 0
    return min(int(math.log(latency_ms) / math.log(_HIST_BASE)) + 1, _HIST_BUCKETS - 1)


def _bucket_value(index: int, fraction: float) -> float:
    if index == 0:
        return fraction
    low = _HIST_BASE ** (index - 1)
    return float(low * _HIST_BASE**fraction)


def _anomaly(arm: ArmStats, cfg: BanditConfig) -> str:
    """Why the fast window says this arm jumped from its slow baseline; "" when healthy."""
    if arm.n < cfg.min_baseline_events or arm.fast_n < cfg.min_fast_events:
        return arm.demoted
    base_err, fast_err = arm.error_rate, arm.fast_fail / arm.fast_n
    base_lat = arm.mean_latency_ms
    fast_lat = arm.fast_lat_sum / arm.fast_lat_n if arm.fast_lat_n >= 1.0 else base_lat
    if arm.demoted:  # hysteresis: leave only once both are back well inside the thresholds
        calm_err = fast_err <= base_err + cfg.error_jump / 2
        calm_lat = fast_lat <= base_lat * (1.0 + (cfg.latency_ratio - 1.0) / 2)
        return "" if calm_err and calm_lat else arm.demoted
    if fast_err >= max(base_err + cfg.error_jump, base_err * cfg.error_ratio):
        return f"error rate {fast_err:.2f} vs {base_err:.2f}"
    if fast_lat >= max(base_lat * cfg.latency_ratio, base_lat + cfg.latency_jump_ms):
        return f"latency {fast_lat:.0f} ms vs {base_lat:.0f} ms"
    return ""


SEEN_KEY = "__offsets__"
"""The key of the counted offsets in a program's stored statistics (never a variant name)."""


@dataclass
class ProgramStats:
    """Every arm of one program; serialized as JSON into the learner's table."""

    arms: dict[str, ArmStats] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)
    """Per telemetry partition (``topic:partition``), the last offset counted here: a
    record redelivered after a rebalance or a restart is not counted twice, because
    the offsets travel in the same table value (and changelog record) as the counts."""

    def counted(self, source: str, offset: int) -> bool:
        """Whether the record at ``offset`` of ``source`` is counted already (else note it)."""
        if self.seen.get(source, -1) >= offset:
            return True
        self.seen[source] = offset
        return False

    def observe(self, obs: Observation, now_s: float, cfg: BanditConfig) -> None:
        """Add ``obs`` at its own time (a missing or future time counts as ``now_s``)."""
        t = now_s if obs.at_s is None else min(obs.at_s / 1.0, now_s)
        arm = self.arms.setdefault(obs.variant, ArmStats(pool=obs.pool))
        arm.pool = obs.pool
        arm.observe(obs, t, cfg)

    def feedback(
        self, variant: str, quality: object, at_s: float | None, now_s: float, cfg: BanditConfig
    ) -> bool:
        """Apply a quality score to a known arm; False when it cannot teach anything."""
        score = clean(quality, 0.0, 1.0)
        arm = self.arms.get(variant)
        if score is None or arm is None:
            return False
        arm.feedback(score, now_s if at_s is None else min(at_s, now_s), cfg)
        return True

    def to_json(self) -> str:
        data: dict[str, object] = {name: arm.to_dict() for name, arm in self.arms.items()}
        if self.seen:
            data[SEEN_KEY] = self.seen
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str | None) -> ProgramStats:
        """Stored statistics; unreadable JSON yields empty statistics, never an error."""
        try:
            data = json.loads(text) if text else {}
        except ValueError:
            data = {}
        if not isinstance(data, dict):
            return cls()
        seen = data.pop(SEEN_KEY, {})
        arms = {str(k): ArmStats.from_dict(v) for k, v in data.items() if isinstance(v, dict)}
        offsets = {str(k): int(v) for k, v in seen.items()} if isinstance(seen, dict) else {}
        return cls(arms, offsets)

    def at(self, now_s: float, cfg: BanditConfig) -> ProgramStats:
        """A copy with every arm aged to ``now_s`` (the stored statistics stay untouched)."""
        arms = {name: ArmStats.from_dict(arm.to_dict()) for name, arm in self.arms.items()}
        for arm in arms.values():
            arm.decay_to(now_s, cfg.half_life_s)
        return ProgramStats(arms)
