"""Small numeric helpers shared by the workloads: percentiles and rates."""

from __future__ import annotations

from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_ms(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/max and mean in milliseconds, with the sample count."""
    ms = [s * 1000 for s in seconds]
    summary = {f"p{q}": round(percentile(ms, q), 3) for q in (50, 95, 99)}
    summary["max"] = round(max(ms, default=0.0), 3)
    summary["mean"] = round(sum(ms) / len(ms), 3) if ms else 0.0
    summary["samples"] = len(ms)
    return summary


def rate(count: int, elapsed_s: float) -> float:
    """Events per second, rounded to one decimal."""
    return round(count / elapsed_s, 1) if elapsed_s > 0 else 0.0
